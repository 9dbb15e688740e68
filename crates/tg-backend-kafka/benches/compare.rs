//! tg-pubsub on Kafka against plain `rdkafka` doing the same, and against the Python framework's
//! Kafka backend, in one run on one broker.
//!
//! `cargo xtask bench kafka` (starts tansu) or `cargo bench -p tg-backend-kafka --bench compare`
//! with `KAFKA_URL` set. Each path moves N messages of 200 bytes on a q1 topic (one partition)
//! from a producer task to a consumer task that acknowledges each, in interleaved rounds; the
//! table has each path's median throughput and the ratio to plain rdkafka, and the latency at a
//! low fixed rate (1,000 msg/s for 2 s). Plain rdkafka does the same work the way its users do:
//! an idempotent `FutureProducer` with `acks=all` and the same `linger.ms`, and a group member
//! (`StreamConsumer`) that stores each message's offset as its acknowledgement and lets
//! librdkafka commit them every 100 ms. With `KAFKA_PYTHON` and `KAFKA_BOOTSTRAP_SERVERS` set it
//! also runs `benches/python_throughput.py`: trustgraph-base's producer and consumer on the same
//! broker.
//!
//! The batch row (`tg-pubsub, batch API`, in the same rounds, taking its turn with the other
//! two paths): tg-pubsub's batch API — `send_batch` of `SEND_BATCH` messages (the receipts
//! awaited at the end, as the single-message path does), `receive_batch` of up to `RECV_MAX`,
//! one `acknowledge_batch` per batch. The consumer's calls are native (what the group member has
//! buffered after the first message, taken at once; a batch's acknowledgements marked under one
//! lock); `send_batch` is the kit's loop over `send`, as librdkafka batches on the wire by
//! itself. Its ratio is to plain rdkafka, and the bench prints its ratio to tg-pubsub one
//! message per call.
//!
//! Environment: `BENCH_MESSAGES` (100,000); `BENCH_ROUNDS` (3); `BENCH_PYTHON_MESSAGES` (2,000);
//! `BENCH_SKIP_PYTHON`; `BENCH_VERBOSE` (when each producer finished).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::ClientConfig;
use tg_backend_api::{Backend, ConsumerOptions, InitialPosition, Qos, Topic};
use tg_backend_kafka::{KafkaBackend, KafkaConfig};
use tg_testkit::bench::{
    print_table, read_stamp, stamped_payload, BatchApiRun, LatencyRecorder, Row, SingleCallRun,
};

const PAYLOAD: usize = 200;
const IDLE: Duration = Duration::from_secs(30);
const LATENCY_RATE: u64 = 1000;
const LATENCY_SECS: u64 = 2;
/// Messages per `send_batch` of the batch path.
const SEND_BATCH: usize = 1_000;
/// `max` of the batch path's `receive_batch`.
const RECV_MAX: usize = 256;

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

fn kafka_name(topic: &Topic) -> String {
    format!("{}.{}.{}", topic.tenant(), topic.namespace(), topic.queue())
}

// ---------------------------------------------------------------- tg-pubsub

/// Moves `n` messages; paced at `rate` msg/s when given. Returns (received, elapsed, latencies).
async fn tg_run(
    backend: &KafkaBackend,
    topic: &Topic,
    n: usize,
    rate: Option<u64>,
) -> (usize, Duration, LatencyRecorder) {
    let run = SingleCallRun {
        payload: PAYLOAD,
        idle: IDLE,
    };
    run.run(
        backend,
        topic,
        ConsumerOptions::new("bench").initial_position(InitialPosition::Earliest),
        n,
        rate,
    )
    .await
}

/// The batch API end to end (`tg_testkit::bench::BatchApiRun`): `send_batch` of `SEND_BATCH`,
/// `receive_batch` of up to `RECV_MAX`, one `acknowledge_batch` each. Returns (received, elapsed).
async fn tg_batch_run(backend: &KafkaBackend, topic: &Topic, n: usize) -> (usize, Duration) {
    let run = BatchApiRun {
        payload: PAYLOAD,
        send_batch: SEND_BATCH,
        receive_max: RECV_MAX,
        idle: IDLE,
    };
    run.run(
        backend,
        topic,
        ConsumerOptions::new("bench").initial_position(InitialPosition::Earliest),
        n,
    )
    .await
}

// ---------------------------------------------------------------- plain rdkafka

async fn raw_run(
    backend: &KafkaBackend,
    config: &KafkaConfig,
    producer: &FutureProducer,
    base: &ClientConfig,
    topic: &Topic,
    n: usize,
    rate: Option<u64>,
) -> (usize, Duration, LatencyRecorder) {
    // the same topic settings as tg-pubsub's (created through it, then used directly)
    drop(
        backend
            .create_producer(topic, Default::default())
            .await
            .expect("topic"),
    );
    let name = kafka_name(topic);
    let consumer: StreamConsumer = base
        .clone()
        .set("group.id", format!("raw-bench-{}", topic.queue()))
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "100")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "fetch.wait.max.ms",
            config.options.fetch_wait.as_millis().to_string(),
        )
        .set(
            "max.partition.fetch.bytes",
            (config.options.max_payload + 65_536)
                .max(1 << 20)
                .to_string(),
        )
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[&name]).expect("subscribe");
    let t0 = Instant::now();
    let sender = {
        let producer = producer.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(n);
            for i in 0..n {
                if let Some(rate) = rate {
                    let due = t0 + Duration::from_micros(i as u64 * 1_000_000 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let payload = stamped_payload(PAYLOAD, t0);
                let mut record = FutureRecord::<(), [u8]>::to(&name).payload(&payload[..]);
                loop {
                    match producer.send_result(record) {
                        Ok(delivery) => {
                            receipts.push(delivery);
                            break;
                        }
                        Err((_, back)) => {
                            record = back;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }
            for r in receipts {
                r.await.expect("raw delivery").expect("raw receipt");
            }
            if std::env::var_os("BENCH_VERBOSE").is_some() {
                println!("  raw producer done after {:?}", t0.elapsed());
            }
        })
    };
    let mut latency = LatencyRecorder::new();
    let mut got = 0;
    let mut last = t0;
    while got < n {
        match tokio::time::timeout(IDLE, consumer.recv()).await {
            Ok(Ok(m)) => {
                use rdkafka::Message as _;
                if let Some(l) = m.payload().and_then(|p| read_stamp(p, t0)) {
                    latency.record(l);
                }
                consumer.store_offset_from_message(&m).expect("raw ack");
                got += 1;
                last = Instant::now();
            }
            other => {
                eprintln!(
                    "raw rdkafka: stopped after {got} of {n}: {:?}",
                    other.map(|r| r.map(|_| ()))
                );
                break;
            }
        }
    }
    sender.await.expect("sender task");
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    (got, last - t0, latency)
}

// ---------------------------------------------------------------- python

/// trustgraph-base's producer and consumer: (messages, seconds), or why not. The topic is
/// created through tg-pubsub first, with the framework's settings: the framework's own
/// `ensure_topic` takes the answer to a description of a missing topic for the topic.
async fn python_run(backend: &KafkaBackend, n: usize) -> Result<(usize, Duration), String> {
    let python = std::env::var("KAFKA_PYTHON").map_err(|_| "KAFKA_PYTHON is not set")?;
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .map_err(|_| "KAFKA_BOOTSTRAP_SERVERS is not set")?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches")
        .join("python_throughput.py");
    let name = format!("python-{}", std::process::id());
    let queue = format!("flow:tg-bench:{name}");
    let topic = Topic::new(Qos::Q1, "tg-bench", "flow", &name).expect("valid topic");
    drop(
        backend
            .create_producer(&topic, Default::default())
            .await
            .map_err(|e| format!("creating {topic}: {e}"))?,
    );
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([
            bootstrap.as_str(),
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

fn median(mut xs: Vec<(usize, Duration)>) -> (usize, Duration) {
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
    let Ok(url) = std::env::var("KAFKA_URL") else {
        eprintln!("KAFKA_URL is not set: run `cargo xtask bench kafka`");
        return ExitCode::FAILURE;
    };
    let n = env_usize("BENCH_MESSAGES", 100_000);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let config = KafkaConfig::from_url(&url).expect("KAFKA_URL parses");
    let backend = KafkaBackend::connect(config.clone())
        .await
        .expect("tg-pubsub connects");
    let base = {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", config.bootstrap_servers());
        c
    };
    let producer: FutureProducer = base
        .clone()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set(
            "linger.ms",
            config.options.batch_delay.as_millis().to_string(),
        )
        .create()
        .expect("raw producer");
    println!("{n} messages of {PAYLOAD} bytes, q1, {rounds} interleaved rounds, broker {url}");
    let (mut tg, mut raw, mut tg_batch) = (Vec::new(), Vec::new(), Vec::new());
    // tansu gets slower as its database grows: the paths take turns at going first
    for round in 0..rounds {
        let mut order = [0, 1, 2];
        order.rotate_left(round % 3);
        for path in order {
            if path == 0 {
                let t = topic(&format!("raw-{round}"));
                let (got, took, _) =
                    raw_run(&backend, &config, &producer, &base, &t, n, None).await;
                println!("round {round}: plain rdkafka {got} in {took:?}");
                raw.push((got, took));
            } else if path == 1 {
                let (got, took, _) =
                    tg_run(&backend, &topic(&format!("tg-{round}")), n, None).await;
                println!("round {round}: tg-pubsub     {got} in {took:?}");
                tg.push((got, took));
            } else {
                let (got, took) =
                    tg_batch_run(&backend, &topic(&format!("tg-batch-{round}")), n).await;
                println!("round {round}: tg-pubsub, batch API {got} in {took:?}");
                tg_batch.push((got, took));
            }
        }
    }
    let (raw_n, raw_t) = median(raw);
    let (tg_n, tg_t) = median(tg);
    let (tgb_n, tgb_t) = median(tg_batch);
    let slow = (LATENCY_RATE * LATENCY_SECS) as usize;
    let rate = Some(LATENCY_RATE);
    let (_, _, raw_lat) = raw_run(
        &backend,
        &config,
        &producer,
        &base,
        &topic("raw-lat"),
        slow,
        rate,
    )
    .await;
    let (_, _, tg_lat) = tg_run(&backend, &topic("tg-lat"), slow, rate).await;
    let _ = producer.flush(Duration::from_secs(10));

    let low = format!("q1 @ {LATENCY_RATE} msg/s");
    let secs = Duration::from_secs(LATENCY_SECS);
    let mut rows = vec![
        Row::new("q1 throughput", "plain rdkafka", raw_n as u64, raw_t).baseline(),
        Row::new("q1 throughput", "tg-pubsub", tg_n as u64, tg_t),
        Row::new("q1 throughput", "tg-pubsub, batch API", tgb_n as u64, tgb_t),
        Row::new(&low, "plain rdkafka", slow as u64, secs)
            .baseline()
            .with_latency(raw_lat.summary()),
        Row::new(&low, "tg-pubsub", slow as u64, secs).with_latency(tg_lat.summary()),
    ];
    let tg_rate = tg_n as f64 / tg_t.as_secs_f64();
    let python = if std::env::var_os("BENCH_SKIP_PYTHON").is_some() {
        Err("BENCH_SKIP_PYTHON is set".to_owned())
    } else {
        python_run(&backend, env_usize("BENCH_PYTHON_MESSAGES", 2_000)).await
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
    print_table(
        "Kafka: tg-pubsub vs plain rdkafka vs trustgraph-base (tansu 0.6.0, SQLite storage)",
        &rows,
    );
    let ratio = tg_rate / (raw_n as f64 / raw_t.as_secs_f64());
    println!(
        "tg-pubsub / plain rdkafka: {ratio:.2} (target >= 0.90); tg-pubsub {tg_rate:.0} msg/s"
    );
    let tgb_rate = tgb_n as f64 / tgb_t.as_secs_f64();
    println!(
        "tg-pubsub batch API / one message per call: {:.2}; / plain rdkafka: {:.2}",
        tgb_rate / tg_rate,
        tgb_rate / (raw_n as f64 / raw_t.as_secs_f64())
    );
    if let Ok((pn, pt)) = python {
        let py_rate = pn as f64 / pt.as_secs_f64();
        println!(
            "tg-pubsub / trustgraph-base: {:.1}x (target >= 10x); Python {py_rate:.0} msg/s",
            tg_rate / py_rate
        );
    }
    let _ = backend.close().await;
    ExitCode::SUCCESS
}
