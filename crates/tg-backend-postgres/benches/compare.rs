//! tg-pubsub's PostgreSQL backend against plain `tokio-postgres` running the same statements,
//! in the same run: the single-message API, the batch API (`send_batch` / `receive_batch` /
//! `acknowledge_batch`), and the raw crate's loops. `cargo bench -p tg-backend-postgres --bench
//! compare` (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; `BENCH_MESSAGES`,
//! default 50,000; `BENCH_ROUNDS`, default 5: throughput figures are medians of that many rounds,
//! the paths alternating within each round).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use tg_backend_api::{Backend, Consumer, ConsumerOptions, OutboundMessage, Qos, Topic};
use tg_backend_postgres::statements::queue;
use tg_backend_postgres::{channel_name, PostgresBackend, PostgresConfig};
use tokio_postgres::{AsyncMessage, NoTls};

const PAYLOAD: usize = 200;
const RATE: u64 = 1000;
const LATENCY_SECS: u64 = 2;
const RAW_BATCH: usize = 1000;
const RAW_CLAIM: i64 = 64;
/// Messages per `receive_batch` (and per claim of the raw batched loop).
const BATCH_CLAIM: usize = 256;
/// Acknowledgements the tg-pubsub consumer keeps in flight (like a handler pool of this size).
const ACKS_IN_FLIGHT: usize = 128;
/// Acknowledged batches the batch consumers keep in flight while they receive the next.
const BATCH_ACKS_IN_FLIGHT: usize = 2;
const SCHEMA: &str = "tgps";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Row {
    path: String,
    messages: usize,
    secs: f64,
    raw_rate: Option<f64>,
    /// The rate of tg-pubsub's single-message path, for the batch rows.
    single_rate: Option<f64>,
    /// Medians of the per-round ratios (to raw, to tg-pubsub single), where rounds alternated:
    /// steadier than ratios of medians when the machine's load drifts.
    round_ratios: Option<(f64, Option<f64>)>,
    latency: Option<(f64, f64)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn payload(base: Instant) -> Vec<u8> {
    let mut p = format!("{:020}", base.elapsed().as_nanos() as u64).into_bytes();
    p.resize(PAYLOAD, b'x');
    p
}

fn sent_at(base: Instant, payload: &[u8]) -> Option<Duration> {
    let n: u64 = std::str::from_utf8(payload.get(..20)?).ok()?.parse().ok()?;
    base.elapsed().checked_sub(Duration::from_nanos(n))
}

fn topic(qos: Qos, what: &str) -> Topic {
    Topic::new(
        qos,
        "bench",
        &format!("run-{:08x}", rand::random::<u32>()),
        what,
    )
    .expect("valid topic")
}

async fn tg_throughput(
    backend: &Arc<PostgresBackend>,
    qos: Qos,
    n: usize,
) -> Result<f64, BoxError> {
    let topic = topic(qos, "throughput");
    let consumer: Arc<dyn Consumer> = backend
        .create_consumer(&topic, ConsumerOptions::new("bench"))
        .await?
        .into();
    let producer = backend.create_producer(&topic, Default::default()).await?;
    let start = Instant::now();
    let reader = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            let mut got = 0usize;
            let mut acks = FuturesUnordered::new();
            while got < n {
                match consumer.receive(Duration::from_secs(10)).await {
                    Ok(m) => {
                        got += 1;
                        let c = consumer.clone();
                        acks.push(async move { c.acknowledge(&m).await });
                        while acks.len() >= ACKS_IN_FLIGHT {
                            if let Some(r) = acks.next().await {
                                r?;
                            }
                        }
                    }
                    Err(e) => return Err::<usize, BoxError>(format!("after {got}: {e}").into()),
                }
            }
            while let Some(r) = acks.next().await {
                r?;
            }
            Ok(got)
        })
    };
    let body = vec![b'x'; PAYLOAD];
    let mut receipts = FuturesUnordered::new();
    for _ in 0..n {
        receipts.push(producer.send(OutboundMessage::new(body.clone())).await?);
        while receipts.len() >= 4096 {
            if let Some(r) = receipts.next().await {
                r?;
            }
        }
    }
    while let Some(r) = receipts.next().await {
        r?;
    }
    let got = reader.await??;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, n);
    producer.close().await?;
    consumer.close().await?;
    Ok(secs)
}

/// The batch API end to end: `send_batch` of 1,000, `receive_batch` of [`BATCH_CLAIM`],
/// `acknowledge_batch` of each received batch (up to [`BATCH_ACKS_IN_FLIGHT`] in flight).
async fn tg_batch_throughput(backend: &Arc<PostgresBackend>, n: usize) -> Result<f64, BoxError> {
    let topic = topic(Qos::Q1, "batch");
    let consumer: Arc<dyn Consumer> = backend
        .create_consumer(&topic, ConsumerOptions::new("bench"))
        .await?
        .into();
    let producer = backend.create_producer(&topic, Default::default()).await?;
    let start = Instant::now();
    let reader = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            let mut got = 0usize;
            let mut acks = FuturesUnordered::new();
            while got < n {
                let batch = consumer
                    .receive_batch(BATCH_CLAIM, Duration::from_secs(10))
                    .await?;
                if batch.is_empty() {
                    return Err::<usize, BoxError>(format!("nothing after {got}").into());
                }
                got += batch.len();
                let c = consumer.clone();
                acks.push(async move { c.acknowledge_batch(&batch).await });
                while acks.len() >= BATCH_ACKS_IN_FLIGHT {
                    if let Some(r) = acks.next().await {
                        r?;
                    }
                }
            }
            while let Some(r) = acks.next().await {
                r?;
            }
            Ok(got)
        })
    };
    let body = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let mut receipts = FuturesUnordered::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(RAW_BATCH);
        let batch = (0..k).map(|_| OutboundMessage::new(body.clone())).collect();
        receipts.extend(producer.send_batch(batch).await?);
        left -= k;
        while receipts.len() >= 4096 {
            if let Some(r) = receipts.next().await {
                r?;
            }
        }
    }
    while let Some(r) = receipts.next().await {
        r?;
    }
    let got = reader.await??;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, n);
    producer.close().await?;
    consumer.close().await?;
    Ok(secs)
}

async fn tg_latency(backend: &Arc<PostgresBackend>, qos: Qos) -> Result<(f64, f64), BoxError> {
    let topic = topic(qos, "latency");
    let consumer: Arc<dyn Consumer> = backend
        .create_consumer(&topic, ConsumerOptions::new("bench"))
        .await?
        .into();
    let producer = backend.create_producer(&topic, Default::default()).await?;
    let n = (RATE * LATENCY_SECS) as usize;
    let base = Instant::now();
    let reader = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            for _ in 0..n {
                let m = consumer.receive(Duration::from_secs(10)).await?;
                if let Some(d) = sent_at(base, m.payload()) {
                    hist.record(d.as_micros() as u64)?;
                }
                consumer.acknowledge(&m).await?;
            }
            Ok::<_, BoxError>(hist)
        })
    };
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut receipts = FuturesUnordered::new();
    for _ in 0..n {
        tick.tick().await;
        receipts.push(producer.send(OutboundMessage::new(payload(base))).await?);
        while let Some(Some(r)) = futures::FutureExt::now_or_never(receipts.next()) {
            r?;
        }
    }
    while let Some(r) = receipts.next().await {
        r?;
    }
    let hist = reader.await??;
    producer.close().await?;
    consumer.close().await?;
    Ok((
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
    ))
}

// ---- plain tokio-postgres, the backend's own statements (`tg_backend_postgres::statements`) ----

async fn raw_connect(config: &PostgresConfig) -> Result<tokio_postgres::Client, BoxError> {
    let (client, conn) = config.pg_config().connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A connection LISTENing on `channel`; the returned receiver gets each notification's payload.
async fn raw_listen(
    config: &PostgresConfig,
    channel: &str,
) -> Result<(tokio_postgres::Client, tokio::sync::mpsc::Receiver<String>), BoxError> {
    let (client, mut conn) = config.pg_config().connect(NoTls).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(65_536);
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = stream.next().await {
            if let AsyncMessage::Notification(n) = msg {
                if tx.send(n.payload().to_owned()).await.is_err() {
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await?;
    Ok((client, rx))
}

/// Creates topic + subscription through the backend and returns (topic_id, sub_id).
async fn raw_ids(
    backend: &Arc<PostgresBackend>,
    client: &tokio_postgres::Client,
    topic: &Topic,
) -> Result<(i64, i64), BoxError> {
    let c = backend
        .create_consumer(topic, ConsumerOptions::new("raw"))
        .await?;
    c.close().await?;
    let row = client
        .query_one(
            &format!(
                "SELECT t.id, s.id FROM \"{SCHEMA}\".topics t JOIN \"{SCHEMA}\".subscriptions s \
                 ON s.topic_id = t.id WHERE t.name = $1 AND s.name = 'raw'"
            ),
            &[&topic.as_str()],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

async fn raw_consumer(
    config: PostgresConfig,
    sub_id: i64,
    channel: String,
    n: usize,
    base: Option<Instant>,
) -> Result<Histogram<u64>, BoxError> {
    let client = raw_connect(&config).await?;
    let (_listen, mut notes) = raw_listen(&config, &channel).await?;
    let claim = client.prepare(&queue(SCHEMA).claim).await?;
    let ack = client.prepare(&queue(SCHEMA).ack).await?;
    let mut hist = Histogram::<u64>::new(3)?;
    let mut got = 0;
    let token: i64 = 42;
    while got < n {
        let rows = client
            .query(&claim, &[&sub_id, &RAW_CLAIM, &30_000.0f64, &token, &"off"])
            .await?;
        if rows.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), notes.recv()).await;
            continue;
        }
        let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        if let Some(base) = base {
            for r in &rows {
                let p: &[u8] = r.get(2);
                if let Some(d) = sent_at(base, p) {
                    hist.record(d.as_micros() as u64)?;
                }
            }
        }
        got += rows.len();
        client.execute(&ack, &[&sub_id, &seqs, &"off"]).await?;
    }
    Ok(hist)
}

/// The raw batched loop: claims of [`BATCH_CLAIM`] on one connection, each claimed batch's
/// `DELETE` sent on a second connection while the next claim runs (up to
/// [`BATCH_ACKS_IN_FLIGHT`] in flight), as the tg-pubsub batch consumer does.
async fn raw_batch_consumer(
    config: PostgresConfig,
    sub_id: i64,
    channel: String,
    n: usize,
) -> Result<(), BoxError> {
    let client = raw_connect(&config).await?;
    let acker = Arc::new(raw_connect(&config).await?);
    let (_listen, mut notes) = raw_listen(&config, &channel).await?;
    let claim = client.prepare(&queue(SCHEMA).claim).await?;
    let ack = acker.prepare(&queue(SCHEMA).ack).await?;
    let limit = BATCH_CLAIM as i64;
    let token: i64 = 43;
    let mut got = 0;
    let mut acks = FuturesUnordered::new();
    while got < n {
        let rows = client
            .query(&claim, &[&sub_id, &limit, &30_000.0f64, &token, &"off"])
            .await?;
        if rows.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), notes.recv()).await;
            continue;
        }
        got += rows.len();
        let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let (acker, ack) = (acker.clone(), ack.clone());
        acks.push(async move { acker.execute(&ack, &[&sub_id, &seqs, &"off"]).await });
        while acks.len() >= BATCH_ACKS_IN_FLIGHT {
            if let Some(r) = acks.next().await {
                r?;
            }
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    Ok(())
}

/// The raw crate: 1,000-row publishes on one connection; the consumer of `batched` (claims of
/// [`BATCH_CLAIM`], deletes in flight) or else the sequential one (claim 64, delete, claim …).
async fn raw_q1_throughput(
    backend: &Arc<PostgresBackend>,
    config: &PostgresConfig,
    n: usize,
    batched: bool,
) -> Result<f64, BoxError> {
    let topic = topic(Qos::Q1, "raw");
    let producer = raw_connect(config).await?;
    let (topic_id, sub_id) = raw_ids(backend, &producer, &topic).await?;
    let channel = channel_name(SCHEMA, topic.as_str());
    let start = Instant::now();
    let reader = if batched {
        tokio::spawn(raw_batch_consumer(
            config.clone(),
            sub_id,
            channel.clone(),
            n,
        ))
    } else {
        let consumer = raw_consumer(config.clone(), sub_id, channel.clone(), n, None);
        tokio::spawn(async move { consumer.await.map(drop) })
    };
    let publish = producer.prepare(&queue(SCHEMA).publish).await?;
    let body = vec![b'x'; PAYLOAD];
    let mut left = n;
    while left > 0 {
        let k = left.min(RAW_BATCH);
        let payloads: Vec<&[u8]> = (0..k).map(|_| body.as_slice()).collect();
        let nones: Vec<Option<&str>> = vec![None; k];
        producer
            .query(
                &publish,
                &[
                    &topic_id,
                    &payloads,
                    &nones,
                    &nones,
                    &nones,
                    &channel,
                    &None::<&str>,
                ],
            )
            .await?;
        left -= k;
    }
    reader.await??;
    Ok(start.elapsed().as_secs_f64())
}

async fn raw_q1_latency(
    backend: &Arc<PostgresBackend>,
    config: &PostgresConfig,
) -> Result<(f64, f64), BoxError> {
    let topic = topic(Qos::Q1, "raw-latency");
    let producer = raw_connect(config).await?;
    let (topic_id, sub_id) = raw_ids(backend, &producer, &topic).await?;
    let channel = channel_name(SCHEMA, topic.as_str());
    let n = (RATE * LATENCY_SECS) as usize;
    let base = Instant::now();
    let reader = tokio::spawn(raw_consumer(
        config.clone(),
        sub_id,
        channel.clone(),
        n,
        Some(base),
    ));
    let publish = producer.prepare(&queue(SCHEMA).publish).await?;
    let nones: Vec<Option<&str>> = vec![None];
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for _ in 0..n {
        tick.tick().await;
        let p = payload(base);
        let payloads: Vec<&[u8]> = vec![p.as_slice()];
        producer
            .query(
                &publish,
                &[
                    &topic_id,
                    &payloads,
                    &nones,
                    &nones,
                    &nones,
                    &channel,
                    &None::<&str>,
                ],
            )
            .await?;
    }
    let hist = reader.await??;
    Ok((
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
    ))
}

/// The naive loop: one INSERT + NOTIFY per message, one claim + one DELETE per message.
async fn naive_q1_throughput(
    backend: &Arc<PostgresBackend>,
    config: &PostgresConfig,
    n: usize,
) -> Result<f64, BoxError> {
    let topic = topic(Qos::Q1, "naive");
    let producer = raw_connect(config).await?;
    let (topic_id, sub_id) = raw_ids(backend, &producer, &topic).await?;
    let channel = channel_name(SCHEMA, topic.as_str());
    let s = format!("\"{SCHEMA}\"");
    let insert = producer
        .prepare(&format!(
            "WITH m AS (INSERT INTO {s}.messages (topic_id, payload) VALUES ($1, $2) RETURNING seq), \
             d AS (INSERT INTO {s}.deliveries (sub_id, seq) SELECT $3, seq FROM m) \
             SELECT pg_notify($4, '')"
        ))
        .await?;
    let start = Instant::now();
    let reader = {
        let config = config.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            let client = raw_connect(&config).await?;
            let (_l, mut notes) = raw_listen(&config, &channel).await?;
            let claim = client
                .prepare(&format!(
                    "DELETE FROM {s}.deliveries WHERE (sub_id, seq) = (SELECT sub_id, seq FROM \
                     {s}.deliveries WHERE sub_id = $1 ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) \
                     RETURNING seq"
                ))
                .await?;
            let mut got = 0;
            while got < n {
                if client.query(&claim, &[&sub_id]).await?.is_empty() {
                    let _ = tokio::time::timeout(Duration::from_millis(100), notes.recv()).await;
                } else {
                    got += 1;
                }
            }
            Ok::<_, BoxError>(())
        })
    };
    let body = vec![b'x'; PAYLOAD];
    for _ in 0..n {
        producer
            .query(&insert, &[&topic_id, &body, &sub_id, &channel])
            .await?;
    }
    reader.await??;
    Ok(start.elapsed().as_secs_f64())
}

async fn raw_q0(config: &PostgresConfig, n: usize) -> Result<f64, BoxError> {
    let topic = topic(Qos::Q0, "raw");
    let channel = channel_name(SCHEMA, topic.as_str());
    let (_l, mut notes) = raw_listen(config, &channel).await?;
    let producer = raw_connect(config).await?;
    let stmt = producer
        .prepare("SELECT pg_notify($1, x) FROM unnest($2::text[]) AS x")
        .await?;
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(10), notes.recv()).await {
                Ok(Some(_)) => got += 1,
                _ => return Err::<(), BoxError>(format!("raw q0 received {got} of {n}").into()),
            }
        }
        Ok(())
    });
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(RAW_BATCH);
        // distinct payloads: NOTIFY folds identical ones within a transaction
        let texts: Vec<String> = (sent..sent + k)
            .map(|i| format!("{i:020}{}", "x".repeat(PAYLOAD - 20)))
            .collect();
        producer.query(&stmt, &[&channel, &texts]).await?;
        sent += k;
    }
    reader.await??;
    Ok(start.elapsed().as_secs_f64())
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| path | messages | msg/s | ratio to raw | ratio to tg-pubsub single | latency p50 / p99 (ms) @ {RATE} msg/s |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    // throughput rows other than the naive loop and the reference are medians of the rounds; their
    // ratios are medians of the ratios within each round
    for r in rows {
        let rate = r.messages as f64 / r.secs;
        let ratio = |of: Option<f64>| of.map_or("—".to_owned(), |o| format!("{:.2}", rate / o));
        let (to_raw, to_single) = match r.round_ratios {
            Some((raw, single)) => (
                format!("{raw:.2}"),
                single.map_or("—".to_owned(), |s| format!("{s:.2}")),
            ),
            None => (ratio(r.raw_rate), ratio(r.single_rate)),
        };
        let lat = r.latency.map_or("—".to_owned(), |(p50, p99)| {
            format!("{p50:.2} / {p99:.2}")
        });
        println!(
            "| {} | {} | {:.0} | {} | {} | {} |",
            r.path, r.messages, rate, to_raw, to_single, lat
        );
    }
}

async fn run() -> Result<(), BoxError> {
    let url = std::env::var(PostgresConfig::ENV_VAR)
        .unwrap_or_else(|_| PostgresConfig::DEFAULT_URL.to_owned());
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let config = PostgresConfig::from_url(&url)?.application_name("tg-pubsub-bench");
    let sc: String = tokio_postgres_show(&config).await?;
    println!(
        "PostgreSQL {} — synchronous_commit={sc}, {n} messages of {PAYLOAD} bytes, medians of \
         {rounds} rounds",
        config.server()
    );
    let backend = Arc::new(PostgresBackend::connect(config.clone()).await?);

    let mut rows = Vec::new();
    // throughput: the paths alternate within each round (the machine is shared and noisy)
    let (mut tg_q1, mut raw_q1, mut tg_batch, mut raw_batch) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        tg_q1.push(tg_throughput(&backend, Qos::Q1, n).await?);
        raw_q1.push(raw_q1_throughput(&backend, &config, n, false).await?);
        tg_batch.push(tg_batch_throughput(&backend, n).await?);
        raw_batch.push(raw_q1_throughput(&backend, &config, n, true).await?);
        eprintln!(
            "round {}: msg/s tg single {:.0}, raw {:.0}, tg batch {:.0}, raw batched {:.0}",
            round + 1,
            n as f64 / tg_q1[round],
            n as f64 / raw_q1[round],
            n as f64 / tg_batch[round],
            n as f64 / raw_batch[round]
        );
    }
    // a rate ratio a/b within each round is b's time over a's
    let per_round = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(a, b)| b / a).collect());
    let single_to_raw = per_round(&tg_q1, &raw_q1);
    let batch_to_raw = per_round(&tg_batch, &raw_batch);
    let batch_to_single = per_round(&tg_batch, &tg_q1);
    let raw_batch_to_single = per_round(&raw_batch, &tg_q1);
    let (tg_q1, raw_q1, tg_batch, raw_batch) = (
        median(tg_q1),
        median(raw_q1),
        median(tg_batch),
        median(raw_batch),
    );
    let raw_q1_lat = raw_q1_latency(&backend, &config).await?;
    let tg_q1_lat = tg_latency(&backend, Qos::Q1).await?;
    let raw_rate = n as f64 / raw_q1;
    let single_rate = n as f64 / tg_q1;
    let raw_batch_rate = n as f64 / raw_batch;
    rows.push(Row {
        path: "tg-pubsub q1 (durable table, batched)".into(),
        messages: n,
        secs: tg_q1,
        raw_rate: Some(raw_rate),
        single_rate: None,
        round_ratios: Some((single_to_raw, None)),
        latency: Some(tg_q1_lat),
    });
    rows.push(Row {
        path:
            "tokio-postgres q1, same statements (latency: 1 INSERT per tick, stamped at the INSERT)"
                .into(),
        messages: n,
        secs: raw_q1,
        raw_rate: Some(raw_rate),
        single_rate: None,
        round_ratios: None,
        latency: Some(raw_q1_lat),
    });
    rows.push(Row {
        path: format!(
            "tg-pubsub q1 batch API (send_batch {RAW_BATCH}, receive_batch {BATCH_CLAIM}, \
             acknowledge_batch; ratio to the raw batched loop)"
        ),
        messages: n,
        secs: tg_batch,
        raw_rate: Some(raw_batch_rate),
        single_rate: Some(single_rate),
        round_ratios: Some((batch_to_raw, Some(batch_to_single))),
        latency: None,
    });
    rows.push(Row {
        path: format!(
            "tokio-postgres q1 batched (same statements: claim {BATCH_CLAIM}, DELETE of each \
             claim on a 2nd connection while the next claim runs)"
        ),
        messages: n,
        secs: raw_batch,
        raw_rate: Some(raw_batch_rate),
        single_rate: Some(single_rate),
        round_ratios: Some((1.0, Some(raw_batch_to_single))),
        latency: None,
    });
    let naive_n = (n / 25).max(100);
    let naive = naive_q1_throughput(&backend, &config, naive_n).await?;
    rows.push(Row {
        path: "tokio-postgres q1, naive (1 INSERT+NOTIFY / 1 SKIP LOCKED claim per message)".into(),
        messages: naive_n,
        secs: naive,
        raw_rate: Some(raw_rate),
        single_rate: None,
        round_ratios: None,
        latency: None,
    });
    let (mut tg0, mut raw0) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        tg0.push(tg_throughput(&backend, Qos::Q0, n).await?);
        raw0.push(raw_q0(&config, n).await?);
    }
    let (tg0, raw0) = (median(tg0), median(raw0));
    let tg0_lat = tg_latency(&backend, Qos::Q0).await?;
    let raw0_rate = n as f64 / raw0;
    rows.push(Row {
        path: "tg-pubsub q0 (NOTIFY)".into(),
        messages: n,
        secs: tg0,
        raw_rate: Some(raw0_rate),
        single_rate: None,
        round_ratios: None,
        latency: Some(tg0_lat),
    });
    rows.push(Row {
        path: "tokio-postgres q0, same statement".into(),
        messages: n,
        secs: raw0,
        raw_rate: Some(raw0_rate),
        single_rate: None,
        round_ratios: None,
        latency: None,
    });
    backend.close().await?;

    // The same q1 path with publishing not waiting for the WAL flush
    // (`producer_synchronous_commit=off`), to show where the latency goes.
    let async_cfg = config.clone().producer_synchronous_commit(Some(false));
    let async_backend = Arc::new(PostgresBackend::connect(async_cfg).await?);
    let lat = tg_latency(&async_backend, Qos::Q1).await?;
    let secs = tg_throughput(&async_backend, Qos::Q1, n).await?;
    rows.push(Row {
        path: "tg-pubsub q1, producer_synchronous_commit=off (reference)".into(),
        messages: n,
        secs,
        raw_rate: Some(raw_rate),
        single_rate: None,
        round_ratios: None,
        latency: Some(lat),
    });
    async_backend.close().await?;
    print_table(&rows);
    Ok(())
}

async fn tokio_postgres_show(config: &PostgresConfig) -> Result<String, BoxError> {
    let c = raw_connect(config).await?;
    Ok(c.query_one("SHOW synchronous_commit", &[]).await?.get(0))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}
