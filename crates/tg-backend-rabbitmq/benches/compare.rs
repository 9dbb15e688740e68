//! tg-pubsub on RabbitMQ against plain `lapin` doing the same work, and the Python framework's own
//! producer and consumer, on the same broker in one run.
//!
//! `cargo bench -p tg-backend-rabbitmq --bench compare` (`cargo xtask bench rabbitmq`). For q0 and
//! q1 it moves N messages of 200 bytes from a producer task to a consumer task, in interleaved
//! rounds, and prints each path's median throughput, its ratio to plain lapin, and the latency at
//! 1,000 msg/s for 2 s. Both paths do the same AMQP work: a connection for the producer and one
//! for the consumer, the topic's durable fanout exchange, the subscription's queue (durable on q1,
//! auto-delete on q0), `basic.qos` with the same prefetch, publishes with the same properties
//! (content type, delivery mode, message id), publisher confirms on q1 with every send in flight
//! until the final `wait_for_confirms`, one `basic.ack` per message awaited by the consumer.
//!
//! The batch rows (`q1 batch`, the same rounds): tg-pubsub's batch API — `send_batch` of
//! `SEND_BATCH` messages, `receive_batch` of up to `RECV_MAX`, one `acknowledge_batch` per
//! batch — against plain lapin doing the batched equivalent (the chunk's publishes started
//! together and awaited together, the prefetch drained after the first delivery, one
//! `basic.ack` with `multiple` per batch), and against tg-pubsub one message per call (the q1
//! row, repeated for the ratio).
//!
//! The framework's row: trustgraph-base's `AsyncRabbitMQBackend` (aio-pika) producer and consumer
//! in one Python process on a `flow` queue, with its own settings (prefetch 1, a confirm awaited
//! per send), `BENCH_PYTHON_MESSAGES` messages.
//!
//! Environment: `RABBITMQ_URL` (the local broker); `BENCH_MESSAGES` (100,000); `BENCH_ROUNDS` (3);
//! `BENCH_PREFETCH` (the backend's default, 256); `BENCH_PYTHON_MESSAGES` (10,000; 0 skips the
//! framework); `PULSAR_PYTHON` (a python with trustgraph-base; default the venv
//! `target/pulsar-venv`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use tg_backend_api::{Backend, Consumer, ConsumerOptions, OutboundMessage, Producer, Qos, Topic};
use tg_backend_rabbitmq::{RabbitBackend, RabbitConfig};
use tg_testkit::bench::{print_table, read_stamp, stamped_payload, LatencyRecorder, Row};

const PAYLOAD: usize = 200;
const IDLE: Duration = Duration::from_secs(10);
const LATENCY_RATE: u64 = 1_000;
const LATENCY_SECS: u64 = 2;
const DEFAULT_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
/// Messages per `send_batch` (and per chunk of plain lapin's publishes).
const SEND_BATCH: usize = 1_000;
/// `max` of `receive_batch` (and the most plain lapin takes per acknowledgement).
const RECV_MAX: usize = 256;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(xs: &mut [Duration]) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn unique(what: &str) -> String {
    format!(
        "{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    )
}

// ---------------------------------------------------------------- tg-pubsub

/// Moves `n` messages (or sends one per millisecond for `rate` runs, recording latency);
/// returns the messages received, the time from the first send to the last receive, and the
/// latencies.
async fn tg_run(
    backend: &RabbitBackend,
    topic: &Topic,
    n: usize,
    paced: bool,
    batched: bool,
) -> (usize, Duration, LatencyRecorder) {
    let consumer: Arc<dyn Consumer> = backend
        .create_consumer(topic, ConsumerOptions::new("bench"))
        .await
        .expect("consumer")
        .into();
    let producer: Arc<dyn Producer> = backend
        .create_producer(topic, Default::default())
        .await
        .expect("producer")
        .into();
    let t0 = Instant::now();
    let reader = {
        let c = consumer.clone();
        tokio::spawn(async move {
            let mut got = 0usize;
            let mut last = Instant::now();
            let mut latency = LatencyRecorder::new();
            while got < n && batched {
                let batch = c.receive_batch(RECV_MAX, IDLE).await.unwrap_or_default();
                if batch.is_empty() {
                    break;
                }
                c.acknowledge_batch(&batch).await.expect("ack");
                got += batch.len();
                last = Instant::now();
            }
            while got < n && !batched {
                let Ok(m) = c.receive(IDLE).await else { break };
                if paced {
                    latency.record(read_stamp(m.payload(), t0).unwrap_or_default());
                }
                c.acknowledge(&m).await.expect("ack");
                got += 1;
                last = Instant::now();
            }
            (got, last, latency)
        })
    };
    let start = Instant::now();
    let writer = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_RATE));
            let mut sent = 0;
            while sent < n && batched {
                let k = SEND_BATCH.min(n - sent);
                let batch = (0..k)
                    .map(|_| OutboundMessage::new(stamped_payload(PAYLOAD, t0)))
                    .collect();
                drop(producer.send_batch(batch).await.expect("send_batch"));
                sent += k;
            }
            for _ in sent..n {
                if paced {
                    tick.tick().await;
                }
                let receipt = producer
                    .send(OutboundMessage::new(stamped_payload(PAYLOAD, t0)))
                    .await
                    .expect("send");
                drop(receipt);
            }
            producer.flush().await.expect("flush");
        })
    };
    writer.await.expect("producer task");
    let (got, last, latency) = reader.await.expect("reader");
    let _ = producer.close().await;
    let _ = consumer.unsubscribe().await;
    (got, last.duration_since(start), latency)
}

// ---------------------------------------------------------------- plain lapin

async fn raw_run(
    url: &str,
    prefetch: u16,
    topic: &Topic,
    n: usize,
    paced: bool,
    batched: bool,
) -> (usize, Duration, LatencyRecorder) {
    let confirms = topic.qos().is_persistent();
    let exchange = exchange_of(topic);
    let queue = format!("{exchange}.bench");
    let pconn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("producer connection");
    let cconn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("consumer connection");
    let cch = cconn.create_channel().await.expect("channel");
    cch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    let durable_fanout = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    cch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Fanout,
        durable_fanout,
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let queue_options = if confirms {
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        }
    } else {
        QueueDeclareOptions {
            auto_delete: true,
            ..QueueDeclareOptions::default()
        }
    };
    cch.queue_declare(queue.as_str().into(), queue_options, FieldTable::default())
        .await
        .expect("queue");
    cch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        queue.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let mut stream = cch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let pch = pconn.create_channel().await.expect("channel");
    if confirms {
        pch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
    }
    pch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Fanout,
        durable_fanout,
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let t0 = Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        let mut last = Instant::now();
        let mut latency = LatencyRecorder::new();
        while got < n && batched {
            let Ok(Some(Ok(first))) = tokio::time::timeout(IDLE, stream.next()).await else {
                break;
            };
            let mut highest = first;
            let mut taken = 1;
            while taken < RECV_MAX {
                match stream.next().now_or_never() {
                    Some(Some(Ok(d))) => {
                        highest = d;
                        taken += 1;
                    }
                    _ => break,
                }
            }
            let multiple = BasicAckOptions { multiple: true };
            highest.acker.ack(multiple).await.expect("ack");
            got += taken;
            last = Instant::now();
        }
        while got < n && !batched {
            let Ok(Some(Ok(d))) = tokio::time::timeout(IDLE, stream.next()).await else {
                break;
            };
            if paced {
                latency.record(read_stamp(&d.data, t0).unwrap_or_default());
            }
            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
            got += 1;
            last = Instant::now();
        }
        (got, last, latency)
    });
    let start = Instant::now();
    let writer = {
        let pch = pch.clone();
        let exchange = exchange.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_RATE));
            let prefix = format!("{:016x}", rand::random::<u64>());
            let props = |seq: usize| {
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(if confirms { 2 } else { 1 })
                    .with_message_id(format!("{prefix}-{seq}").into())
            };
            let mut seq = 0;
            while seq < n && batched {
                let k = SEND_BATCH.min(n - seq);
                let payloads: Vec<Vec<u8>> = (0..k).map(|_| stamped_payload(PAYLOAD, t0)).collect();
                let publishes = payloads.iter().enumerate().map(|(i, payload)| {
                    pch.basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        BasicPublishOptions::default(),
                        payload,
                        props(seq + i),
                    )
                });
                for confirm in futures::future::join_all(publishes).await {
                    drop(confirm.expect("publish"));
                }
                seq += k;
            }
            for seq in seq..n {
                if paced {
                    tick.tick().await;
                }
                let payload = stamped_payload(PAYLOAD, t0);
                let props = props(seq);
                let confirm = pch
                    .basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        BasicPublishOptions::default(),
                        &payload,
                        props,
                    )
                    .await
                    .expect("publish");
                drop(confirm);
            }
            if confirms {
                pch.wait_for_confirms().await.expect("confirms");
            }
        })
    };
    writer.await.expect("producer task");
    let (got, last, latency) = reader.await.expect("reader");
    let _ = cch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = pch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = pconn.close(200, "bench done".into()).await;
    let _ = cconn.close(200, "bench done".into()).await;
    (got, last.duration_since(start), latency)
}

// ---------------------------------------------------------------- the framework

/// The framework's producer and consumer in Python: (messages, seconds), or why not.
fn framework_run(url: &str, n: usize) -> Result<(usize, Duration), String> {
    let python = std::env::var_os("PULSAR_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/pulsar-venv/bin/python")
        });
    if !python.is_file() {
        return Err(format!(
            "no python with trustgraph-base at {} (`cargo xtask services` creates the venv)",
            python.display()
        ));
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/framework.py");
    let name = unique("bench-framework");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([url, &format!("flow:tg:{name}"), &n.to_string()])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    // its durable queue and exchange stay behind otherwise
    let cleanup = format!(
        "import pika\nc=pika.BlockingConnection(pika.URLParameters({url:?}))\nch=c.channel()\n\
         ch.queue_delete('tg.flow.{name}.bench')\nch.exchange_delete('tg.flow.{name}')\nc.close()\n"
    );
    let _ = std::process::Command::new(&python)
        .args(["-c", &cleanup])
        .output();
    if !out.status.success() {
        return Err(format!(
            "framework.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    let got = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or("no count")?;
    let secs: f64 = words.next().and_then(|w| w.parse().ok()).ok_or("no time")?;
    Ok((got, Duration::from_secs_f64(secs)))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("RABBITMQ_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let n = env_usize("BENCH_MESSAGES", 100_000);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let prefetch = u16::try_from(env_usize(
        "BENCH_PREFETCH",
        usize::from(RabbitConfig::default().options.prefetch),
    ))
    .unwrap_or(u16::MAX);
    let python_n = env_usize("BENCH_PYTHON_MESSAGES", 10_000);
    let config = RabbitConfig::from_url(&url)
        .expect("RABBITMQ_URL")
        .prefetch(prefetch);
    let backend = RabbitBackend::connect(config)
        .await
        .expect("connect to RabbitMQ");
    println!(
        "RabbitMQ bench: {n} messages of {PAYLOAD} bytes per run, {rounds} interleaved rounds, prefetch {prefetch}, {}",
        backend.config().server()
    );
    let mut rows = Vec::new();
    let mut tg_exchanges = Vec::new();
    for qos in [Qos::Q0, Qos::Q1] {
        let (mut raw_times, mut tg_times) = (Vec::new(), Vec::new());
        let (mut raw_batch_times, mut tg_batch_times) = (Vec::new(), Vec::new());
        // q1 on the framework's `flow` class (durable queues); q0 on a namespace of its own
        // (auto-delete queues)
        let ns = if qos == Qos::Q0 { "bench" } else { "flow" };
        for round in 0..rounds {
            let topic = Topic::new(qos, "bench", ns, &unique("raw")).unwrap();
            let (got, took, _) = raw_run(&url, prefetch, &topic, n, false, false).await;
            assert_eq!(got, n, "plain lapin {qos}: {got} of {n} received");
            raw_times.push(took);
            let topic = Topic::new(qos, "bench", ns, &unique("tg")).unwrap();
            tg_exchanges.push(exchange_of(&topic));
            let (got, took2, _) = tg_run(&backend, &topic, n, false, false).await;
            assert_eq!(got, n, "tg-pubsub {qos}: {got} of {n} received");
            tg_times.push(took2);
            println!(
                "{qos} round {}: lapin {:.0} msg/s, tg-pubsub {:.0} msg/s",
                round + 1,
                n as f64 / took.as_secs_f64(),
                n as f64 / took2.as_secs_f64()
            );
            if qos == Qos::Q1 {
                let topic = Topic::new(qos, "bench", ns, &unique("raw-batch")).unwrap();
                let (got, took, _) = raw_run(&url, prefetch, &topic, n, false, true).await;
                assert_eq!(got, n, "plain lapin batched: {got} of {n} received");
                raw_batch_times.push(took);
                let topic = Topic::new(qos, "bench", ns, &unique("tg-batch")).unwrap();
                tg_exchanges.push(exchange_of(&topic));
                let (got, took2, _) = tg_run(&backend, &topic, n, false, true).await;
                assert_eq!(got, n, "tg-pubsub batch: {got} of {n} received");
                tg_batch_times.push(took2);
                println!(
                    "{qos} round {}: lapin batched {:.0} msg/s, tg-pubsub batch {:.0} msg/s",
                    round + 1,
                    n as f64 / took.as_secs_f64(),
                    n as f64 / took2.as_secs_f64()
                );
            }
        }
        let paced = LATENCY_RATE as usize * LATENCY_SECS as usize;
        let topic = Topic::new(qos, "bench", ns, &unique("raw-latency")).unwrap();
        let (_, _, raw_latency) = raw_run(&url, prefetch, &topic, paced, true, false).await;
        let topic = Topic::new(qos, "bench", ns, &unique("tg-latency")).unwrap();
        tg_exchanges.push(exchange_of(&topic));
        let (_, _, tg_latency) = tg_run(&backend, &topic, paced, true, false).await;
        rows.push(
            Row::new(
                qos.as_str(),
                "plain lapin",
                n as u64,
                median(&mut raw_times),
            )
            .baseline()
            .with_latency(raw_latency.summary()),
        );
        let single = median(&mut tg_times);
        rows.push(
            Row::new(qos.as_str(), "tg-pubsub", n as u64, single)
                .with_latency(tg_latency.summary()),
        );
        if qos == Qos::Q1 {
            let group = "q1 batch";
            rows.push(
                Row::new(
                    group,
                    "plain lapin, batched",
                    n as u64,
                    median(&mut raw_batch_times),
                )
                .baseline(),
            );
            let batch = median(&mut tg_batch_times);
            rows.push(Row::new(group, "tg-pubsub, batch API", n as u64, batch));
            rows.push(Row::new(
                group,
                "tg-pubsub, one message per call",
                n as u64,
                single,
            ));
            println!(
                "q1: tg-pubsub's batch API moves {:.2}x the messages per second of one message per call",
                single.as_secs_f64() / batch.as_secs_f64()
            );
        }
    }
    if python_n > 0 {
        match tokio::task::spawn_blocking({
            let url = url.clone();
            move || framework_run(&url, python_n)
        })
        .await
        .expect("framework task")
        {
            Ok((got, took)) => rows.push(Row::new(
                "q1",
                "Python framework (aio-pika, prefetch 1)",
                got as u64,
                took,
            )),
            Err(why) => println!("the framework's row is left out: {why}"),
        }
    }
    print_table(
        &format!("RabbitMQ: tg-pubsub vs plain lapin, {PAYLOAD}-byte messages; latency at {LATENCY_RATE} msg/s for {LATENCY_SECS} s"),
        &rows,
    );
    let rate = |path: &str| {
        rows.iter()
            .find(|r| r.group == "q1" && r.path.starts_with(path))
            .map(Row::rate)
    };
    if let (Some(tg), Some(py)) = (rate("tg-pubsub"), rate("Python")) {
        println!(
            "q1: tg-pubsub moves {:.1}x the messages per second of the Python framework",
            tg / py
        );
    }
    let _ = backend.close().await;
    // the exchanges tg-pubsub declared (the queues went with `unsubscribe`)
    if let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            for exchange in tg_exchanges {
                let _ = ch
                    .exchange_delete(exchange.as_str().into(), Default::default())
                    .await;
            }
        }
        let _ = conn.close(200, "bench done".into()).await;
    }
}

fn exchange_of(topic: &Topic) -> String {
    format!("{}.{}.{}", topic.tenant(), topic.namespace(), topic.queue())
}
