//! tg-pubsub on Pulsar against the plain `pulsar` crate doing the same, and against the Python
//! framework's Pulsar backend, in one run on one broker.
//!
//! `cargo xtask bench pulsar` (starts pulsar-lite and the checksum relay) or
//! `cargo bench -p tg-backend-pulsar --bench compare` with `PULSAR_URL` set. Each path moves N
//! messages of 200 bytes on a q1 (persistent) topic from a producer task to a consumer task that
//! acknowledges each, both batching (1,000 messages / 128 KiB / 1 ms), in interleaved rounds; the
//! table has each path's median throughput and the ratio to the raw crate, and the latency at a
//! low fixed rate (1,000 msg/s for 2 s). With `PULSAR_PYTHON` and `PULSAR_LITE_URL` set it also
//! runs `benches/python_throughput.py`: trustgraph-base's producer and consumer on the same broker.
//!
//! The batch rows (`q1 batch, Exclusive`, the same rounds), on an Exclusive subscription, where
//! tg-pubsub acknowledges a batch with one cumulative acknowledgement: tg-pubsub's batch API
//! (`send_batch` of `SEND_BATCH` messages, `receive_batch` of up to `RECV_MAX`, one
//! `acknowledge_batch` per batch) against the crate doing the batched equivalent (`send_all` of
//! the same chunks, what the consumer has buffered taken after the first message, one
//! `cumulative_ack` per batch) and against tg-pubsub one message per call on the same kind of
//! subscription.
//!
//! Environment: `BENCH_MESSAGES` (100,000); `BENCH_ROUNDS` (3); `BENCH_PYTHON_MESSAGES` (2,000);
//! `BENCH_SKIP_PYTHON`; `BENCH_VERBOSE` (when each producer finished).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::StreamExt;
use pulsar::{Pulsar, SubType, TokioExecutor};
use tg_backend_api::{Backend, ConsumerOptions, ConsumerType, Qos, Topic};
use tg_backend_pulsar::{PulsarBackend, PulsarConfig};
use tg_testkit::bench::{
    print_table, read_stamp, stamped_payload, BatchApiRun, LatencyRecorder, Row, SingleCallRun,
};

const PAYLOAD: usize = 200;
const IDLE: Duration = Duration::from_secs(10);
const LATENCY_RATE: u64 = 1000;
const LATENCY_SECS: u64 = 2;
/// Messages per `send_batch` (and per `send_all` of the crate), the default `batch_size`.
const SEND_BATCH: usize = 1_000;
/// `max` of `receive_batch` (and the most the crate's consumer takes per acknowledgement).
const RECV_MAX: usize = 256;
/// The longest one path's run may take.
const RUN_LIMIT_SECS: u64 = 120;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn topic(name: &str) -> Topic {
    Topic::new(
        Qos::Q1,
        "tg-bench",
        &format!("run-{}", std::process::id()),
        name,
    )
    .expect("valid topic")
}

/// The same batching settings for both paths.
fn raw_producer_options(config: &PulsarConfig) -> pulsar::ProducerOptions {
    pulsar::ProducerOptions {
        batch_size: Some(config.batch_size),
        batch_byte_size: Some(config.batch_bytes),
        batch_timeout: Some(config.batch_delay),
        block_queue_if_full: true,
        ..Default::default()
    }
}

// ---------------------------------------------------------------- tg-pubsub

/// Moves `n` messages; paced at `rate` msg/s when given. Returns (received, elapsed, latencies).
async fn tg_run(
    backend: &PulsarBackend,
    topic: &Topic,
    n: usize,
    rate: Option<u64>,
    consumer_type: ConsumerType,
) -> (usize, Duration, LatencyRecorder) {
    let run = SingleCallRun {
        payload: PAYLOAD,
        idle: IDLE,
    };
    run.run(
        backend,
        topic,
        ConsumerOptions::new("bench").consumer_type(consumer_type),
        n,
        rate,
    )
    .await
}

/// The batch API end to end on an Exclusive subscription (`tg_testkit::bench::BatchApiRun`):
/// `send_batch` of `SEND_BATCH`, `receive_batch` of up to `RECV_MAX`, one `acknowledge_batch`
/// each. Returns (received, elapsed).
async fn tg_batch_run(backend: &PulsarBackend, topic: &Topic, n: usize) -> (usize, Duration) {
    let run = BatchApiRun {
        payload: PAYLOAD,
        send_batch: SEND_BATCH,
        receive_max: RECV_MAX,
        idle: IDLE,
    };
    run.run(
        backend,
        topic,
        ConsumerOptions::new("bench").consumer_type(ConsumerType::Exclusive),
        n,
    )
    .await
}

// ---------------------------------------------------------------- raw pulsar crate

/// The crate doing what the batch API does: `send_all` of the same chunks, and on an Exclusive
/// subscription what the consumer has buffered after the first message, up to `RECV_MAX`,
/// with one `cumulative_ack` of the last. Returns (received, elapsed).
async fn raw_batch_run(
    client: &Pulsar<TokioExecutor>,
    consumer_client: &Pulsar<TokioExecutor>,
    config: &PulsarConfig,
    topic: &Topic,
    n: usize,
) -> (usize, Duration) {
    let name = format!(
        "persistent://{}/{}/{}",
        topic.tenant(),
        topic.namespace(),
        topic.queue()
    );
    let mut consumer: pulsar::Consumer<Vec<u8>, TokioExecutor> = consumer_client
        .consumer()
        .with_topic(&name)
        .with_subscription("bench")
        .with_subscription_type(SubType::Exclusive)
        .with_batch_size(config.receiver_queue)
        .build()
        .await
        .expect("raw consumer");
    let verbose = std::env::var_os("BENCH_VERBOSE").is_some();
    if verbose {
        println!("  raw batched: subscribed");
    }
    let mut producer = client
        .producer()
        .with_topic(&name)
        .with_options(raw_producer_options(config))
        .build()
        .await
        .expect("raw producer");
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        let mut receipts = Vec::with_capacity(n);
        let mut sent = 0;
        while sent < n {
            let k = SEND_BATCH.min(n - sent);
            let chunk = (0..k).map(|_| pulsar::producer::Message {
                payload: stamped_payload(PAYLOAD, t0),
                ..Default::default()
            });
            receipts.extend(producer.send_all(chunk).await.expect("raw send_all"));
            sent += k;
        }
        producer.send_batch().await.expect("raw flush");
        for r in receipts {
            r.await.expect("raw receipt");
        }
        if verbose {
            println!("  raw batched producer done after {:?}", t0.elapsed());
        }
        producer
    });
    let mut got = 0;
    let mut last = t0;
    while got < n {
        let first = match tokio::time::timeout(IDLE, consumer.next()).await {
            Ok(Some(Ok(m))) => m,
            other => {
                eprintln!(
                    "raw pulsar batched: stopped after {got} of {n}: {:?}",
                    other.map(|o| o.map(|r| r.map(|_| ())))
                );
                break;
            }
        };
        let mut newest = first;
        let mut taken = 1;
        while taken < RECV_MAX {
            match consumer.next().now_or_never() {
                Some(Some(Ok(m))) => {
                    newest = m;
                    taken += 1;
                }
                _ => break,
            }
        }
        consumer
            .cumulative_ack(&newest)
            .await
            .expect("raw cumulative ack");
        got += taken;
        last = Instant::now();
    }
    if verbose {
        println!("  raw batched consumer done after {:?}", t0.elapsed());
    }
    let mut producer = sender.await.expect("sender task");
    // measured already; pulsar-lite has left a close of this path unanswered
    let limit = Duration::from_secs(10);
    let closed = tokio::time::timeout(limit, async {
        let _ = producer.close().await;
        let _ = consumer.close().await;
    })
    .await;
    if closed.is_err() {
        println!("  raw batched: producer and consumer not closed within {limit:?}");
    } else if verbose {
        println!("  raw batched closed after {:?}", t0.elapsed());
    }
    (got, last - t0)
}

async fn raw_run(
    client: &Pulsar<TokioExecutor>,
    consumer_client: &Pulsar<TokioExecutor>,
    config: &PulsarConfig,
    topic: &Topic,
    n: usize,
    rate: Option<u64>,
) -> (usize, Duration, LatencyRecorder) {
    let name = format!(
        "persistent://{}/{}/{}",
        topic.tenant(),
        topic.namespace(),
        topic.queue()
    );
    let mut consumer: pulsar::Consumer<Vec<u8>, TokioExecutor> = consumer_client
        .consumer()
        .with_topic(&name)
        .with_subscription("bench")
        .with_subscription_type(SubType::Shared)
        .with_batch_size(config.receiver_queue)
        .build()
        .await
        .expect("raw consumer");
    let mut producer = client
        .producer()
        .with_topic(&name)
        .with_options(raw_producer_options(config))
        .build()
        .await
        .expect("raw producer");
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        let mut receipts = Vec::with_capacity(n);
        for i in 0..n {
            if let Some(rate) = rate {
                let due = t0 + Duration::from_micros(i as u64 * 1_000_000 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let msg = pulsar::producer::Message {
                payload: stamped_payload(PAYLOAD, t0),
                ..Default::default()
            };
            receipts.push(producer.send_non_blocking(msg).await.expect("raw send"));
        }
        producer.send_batch().await.expect("raw flush");
        for r in receipts {
            r.await.expect("raw receipt");
        }
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            println!("  raw producer done after {:?}", t0.elapsed());
        }
        producer
    });
    let mut latency = LatencyRecorder::new();
    let mut got = 0;
    let mut last = t0;
    while got < n {
        match tokio::time::timeout(IDLE, consumer.next()).await {
            Ok(Some(Ok(m))) => {
                if let Some(l) = read_stamp(&m.payload.data, t0) {
                    latency.record(l);
                }
                consumer.ack(&m).await.expect("raw ack");
                got += 1;
                last = Instant::now();
            }
            other => {
                eprintln!(
                    "raw pulsar: stopped after {got} of {n}: {:?}",
                    other.map(|o| o.map(|r| r.map(|_| ())))
                );
                break;
            }
        }
    }
    let mut producer = sender.await.expect("sender task");
    let _ = producer.close().await;
    let _ = consumer.close().await;
    (got, last - t0, latency)
}

// ---------------------------------------------------------------- python

/// trustgraph-base's producer and consumer: (messages, seconds), or why not.
fn python_run(n: usize) -> Result<(usize, Duration), String> {
    let python = std::env::var("PULSAR_PYTHON").map_err(|_| "PULSAR_PYTHON is not set")?;
    let url = std::env::var("PULSAR_LITE_URL")
        .or_else(|_| std::env::var("PULSAR_URL"))
        .map_err(|_| "PULSAR_LITE_URL is not set")?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches")
        .join("python_throughput.py");
    let queue = format!("flow:tg-bench:python-{}", std::process::id());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([
            url.as_str(),
            queue.as_str(),
            &n.to_string(),
            &PAYLOAD.to_string(),
        ])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "python_throughput.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let got: usize = fields
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("no message count")?;
    let secs: f64 = fields
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("no seconds")?;
    Ok((got, Duration::from_secs_f64(secs)))
}

/// A path's run, or `None` (said on stdout) when it did not finish within `RUN_LIMIT`: a run
/// on pulsar-lite once waited for the broker for good (no path bounds every await).
async fn bounded<T>(what: &str, run: impl std::future::Future<Output = T>) -> Option<T> {
    let limit = Duration::from_secs(RUN_LIMIT_SECS);
    let out = tokio::time::timeout(limit, run).await.ok();
    if out.is_none() {
        println!("{what}: no result within {limit:?}; the round is left out of its median");
    }
    out
}

fn median(mut xs: Vec<(usize, Duration)>) -> (usize, Duration) {
    if xs.is_empty() {
        return (0, Duration::from_secs(1));
    }
    xs.sort_by(|a, b| {
        let ra = a.0 as f64 / a.1.as_secs_f64();
        let rb = b.0 as f64 / b.1.as_secs_f64();
        ra.total_cmp(&rb)
    });
    xs[xs.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; nothing else is accepted
    let Ok(url) = std::env::var("PULSAR_URL") else {
        eprintln!("PULSAR_URL is not set: run `cargo xtask bench pulsar`");
        return ExitCode::FAILURE;
    };
    let n = env_usize("BENCH_MESSAGES", 100_000);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let config = PulsarConfig::from_url(&url).expect("PULSAR_URL parses");
    let backend = PulsarBackend::connect(config.clone())
        .await
        .expect("tg-pubsub connects");
    let connect = || async {
        Pulsar::builder(config.service_url(), TokioExecutor)
            .build()
            .await
            .expect("raw client connects")
    };
    // the crate as its documentation shows it: one client for everything; and with a second
    // client for the consumer, as tg-pubsub does (see docs/pulsar.md, Nagle's algorithm)
    let (client, client2) = (connect().await, connect().await);
    println!(
        "{n} messages of {PAYLOAD} bytes, q1 (persistent), batching, {rounds} interleaved rounds, broker {url}"
    );
    let (mut tg, mut raw, mut raw2) = (Vec::new(), Vec::new(), Vec::new());
    let (mut raw_batch, mut tg_batch, mut tg_single_excl) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let t = topic(&format!("raw-{round}"));
        let (got, took, _) = raw_run(&client, &client, &config, &t, n, None).await;
        println!("round {round}: raw pulsar, 1 client  {got} in {took:?}");
        raw.push((got, took));
        let t = topic(&format!("raw2-{round}"));
        let (got, took, _) = raw_run(&client, &client2, &config, &t, n, None).await;
        println!("round {round}: raw pulsar, 2 clients {got} in {took:?}");
        raw2.push((got, took));
        let t = topic(&format!("tg-{round}"));
        let (got, took, _) = tg_run(&backend, &t, n, None, ConsumerType::Shared).await;
        println!("round {round}: tg-pubsub             {got} in {took:?}");
        tg.push((got, took));
        let t = topic(&format!("raw-batch-{round}"));
        let run = raw_batch_run(&client, &client2, &config, &t, n);
        if let Some((got, took)) = bounded("raw pulsar, batched", run).await {
            println!("round {round}: raw pulsar, batched, Exclusive  {got} in {took:?}");
            raw_batch.push((got, took));
        }
        let t = topic(&format!("tg-single-x-{round}"));
        let run = tg_run(&backend, &t, n, None, ConsumerType::Exclusive);
        if let Some((got, took, _)) = bounded("tg-pubsub, single, Exclusive", run).await {
            println!("round {round}: tg-pubsub, single, Exclusive   {got} in {took:?}");
            tg_single_excl.push((got, took));
        }
        let t = topic(&format!("tg-batch-{round}"));
        let run = tg_batch_run(&backend, &t, n);
        if let Some((got, took)) = bounded("tg-pubsub, batch", run).await {
            println!("round {round}: tg-pubsub, batch, Exclusive    {got} in {took:?}");
            tg_batch.push((got, took));
        }
    }
    let (raw_n, raw_t) = median(raw);
    let (raw2_n, raw2_t) = median(raw2);
    let (tg_n, tg_t) = median(tg);
    let (rawb_n, rawb_t) = median(raw_batch);
    let (tgb_n, tgb_t) = median(tg_batch);
    let (tgs_n, tgs_t) = median(tg_single_excl);
    let slow = (LATENCY_RATE * LATENCY_SECS) as usize;
    let rate = Some(LATENCY_RATE);
    let (_, _, raw_lat) = raw_run(&client, &client, &config, &topic("raw-lat"), slow, rate).await;
    let (_, _, raw2_lat) =
        raw_run(&client, &client2, &config, &topic("raw2-lat"), slow, rate).await;
    let (_, _, tg_lat) = tg_run(&backend, &topic("tg-lat"), slow, rate, ConsumerType::Shared).await;

    let low = format!("q1 @ {LATENCY_RATE} msg/s");
    let secs = Duration::from_secs(LATENCY_SECS);
    let mut rows = vec![
        Row::new(
            "q1 throughput",
            "raw pulsar crate, 1 client",
            raw_n as u64,
            raw_t,
        )
        .baseline(),
        Row::new(
            "q1 throughput",
            "raw pulsar crate, 2 clients",
            raw2_n as u64,
            raw2_t,
        ),
        Row::new("q1 throughput", "tg-pubsub", tg_n as u64, tg_t),
        Row::new(&low, "raw pulsar crate, 1 client", slow as u64, secs)
            .baseline()
            .with_latency(raw_lat.summary()),
        Row::new(&low, "raw pulsar crate, 2 clients", slow as u64, secs)
            .with_latency(raw2_lat.summary()),
        Row::new(&low, "tg-pubsub", slow as u64, secs).with_latency(tg_lat.summary()),
        Row::new(
            "q1 batch, Exclusive",
            "raw pulsar crate, batched, 2 clients",
            rawb_n as u64,
            rawb_t,
        )
        .baseline(),
        Row::new(
            "q1 batch, Exclusive",
            "tg-pubsub, batch API",
            tgb_n as u64,
            tgb_t,
        ),
        Row::new(
            "q1 batch, Exclusive",
            "tg-pubsub, one message per call",
            tgs_n as u64,
            tgs_t,
        ),
    ];
    let tg_rate = tg_n as f64 / tg_t.as_secs_f64();
    let python = if std::env::var_os("BENCH_SKIP_PYTHON").is_some() {
        Err("BENCH_SKIP_PYTHON is set".to_owned())
    } else {
        python_run(env_usize("BENCH_PYTHON_MESSAGES", 2_000))
    };
    match &python {
        Ok((pn, pt)) => {
            rows.push(Row::new(
                "q1 throughput",
                "trustgraph-base (Python)",
                *pn as u64,
                *pt,
            ));
        }
        Err(e) => println!("Python run skipped: {e}"),
    }
    print_table("Pulsar: tg-pubsub vs the pulsar crate vs trustgraph-base (pulsar-lite behind the checksum relay)", &rows);
    let ratio = tg_rate / (raw_n as f64 / raw_t.as_secs_f64());
    let ratio2 = tg_rate / (raw2_n as f64 / raw2_t.as_secs_f64());
    println!(
        "tg-pubsub / raw pulsar crate: {ratio:.2} (1 client), {ratio2:.2} (2 clients) \
         (target >= 0.90); tg-pubsub {tg_rate:.0} msg/s (target >= 100,000)"
    );
    let rate_of = |(n, t): (usize, Duration)| n as f64 / t.as_secs_f64();
    println!(
        "tg-pubsub batch API / one message per call (Exclusive): {:.2}; / raw crate batched: {:.2}",
        rate_of((tgb_n, tgb_t)) / rate_of((tgs_n, tgs_t)),
        rate_of((tgb_n, tgb_t)) / rate_of((rawb_n, rawb_t)),
    );
    if let Ok((pn, pt)) = python {
        let py_rate = pn as f64 / pt.as_secs_f64();
        println!(
            "tg-pubsub / trustgraph-base: {:.1}x (target >= 5x); Python {py_rate:.0} msg/s",
            tg_rate / py_rate
        );
    }
    let _ = backend.close().await;
    ExitCode::SUCCESS
}
