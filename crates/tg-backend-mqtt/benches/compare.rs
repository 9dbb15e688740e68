//! tg-pubsub's MQTT backend against plain `rumqttc` doing the same work, in the same run.
//!
//! `cargo bench -p tg-backend-mqtt --bench compare` — `BENCH_MESSAGES`, `BENCH_ROUNDS` (default 3;
//! the paths alternate and each one's best round is shown: the machine is shared) and
//! `BENCH_ONLY=q1:tg,q1:raw,q1:batch,latency` change what runs.
//!
//! - Throughput: 100,000 messages of 200 bytes (`BENCH_MESSAGES` to change), producer task →
//!   consumer task acknowledging each, QoS 0 and QoS 1, against `MQTT_URL` (default the local
//!   Mosquitto at 127.0.0.1:1883). Both paths use a shared subscription, manual acks, the same
//!   in-flight window (100) and Receive Maximum (100), and TCP_NODELAY on the client (the
//!   backend's default).
//! - The batch row (`tg-pubsub, batch API`, in the same rounds, after the other two paths):
//!   tg-pubsub's batch API — `send_batch` of `SEND_BATCH` messages, `receive_batch` of up to
//!   `RECV_MAX`, one `acknowledge_batch` per batch. MQTT has no batch in the protocol, so the
//!   backend keeps the kit's defaults: a loop of `send` (one PUBLISH each), the first message
//!   within the timeout and then what is already buffered, one PUBACK per message. For the same
//!   reason there is no batched plain-rumqttc path (it would send the same packets): the row
//!   sits in the throughput group with its ratio to plain rumqttc, and the bench prints its
//!   ratio to tg-pubsub one message per call.
//! - Latency: QoS 1 at 1,000 msg/s for 2 s with the send time in the payload, against a
//!   Mosquitto the bench starts on a free port with `set_tcp_nodelay true` (skipped with a note
//!   when the `mosquitto` binary is missing).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage, Qos, Topic};
use tg_backend_mqtt::{MqttBackend, MqttConfig};
use tg_testkit::bench::{print_table, read_stamp, stamped_payload, LatencyRecorder, Row};
use tokio::sync::mpsc;

const PAYLOAD: usize = 200;
const LATENCY_RATE: u64 = 1000;
const LATENCY_SECS: u64 = 2;
const RUN_LIMIT: Duration = Duration::from_secs(90);
/// Messages per `send_batch` of the batch path.
const SEND_BATCH: usize = 1_000;
/// `max` of the batch path's `receive_batch`: below the Receive Maximum (100), so the broker
/// still has deliveries to send while a batch is being acknowledged.
const RECV_MAX: usize = 64;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let url = std::env::var("MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".to_owned());
    let n: u64 = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let config = MqttConfig::from_url(&url).expect("MQTT_URL");
    if MqttBackend::connect(config.clone()).await.is_err() {
        eprintln!("no MQTT broker at {url}: benchmark skipped");
        return;
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_owned();
    let mut rows = Vec::new();
    let mut batch_ratios = Vec::new();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default(); // e.g. "q1", "q1:tg", "q0:raw"
    let wants = |qos: Qos, path: &str| {
        only.is_empty()
            || only.split(',').any(|w| {
                let mut it = w.split(':');
                let q = it.next().unwrap_or("");
                let p = it.next();
                (q.is_empty() || q == qos.to_string()) && p.is_none_or(|p| p == path)
            })
    };
    for qos in [Qos::Q0, Qos::Q1] {
        if !wants(qos, "raw") && !wants(qos, "tg") && !wants(qos, "batch") {
            continue;
        }
        let group = format!("{qos} x{n}");
        // Alternate the paths and keep each one's best round: the machine is shared.
        let (mut raw, mut tg, mut batch): (Option<Row>, Option<Row>, Option<Row>) =
            (None, None, None);
        for _ in 0..rounds {
            if wants(qos, "raw") {
                let (count, elapsed) = raw_flood(&config, qos, n).await;
                let row = Row::new(&group, "plain rumqttc", count, elapsed).baseline();
                if raw.as_ref().map(Row::rate).unwrap_or(0.0) < row.rate() {
                    raw = Some(row);
                }
            }
            if wants(qos, "tg") {
                let (count, elapsed) = tg_flood(&config, qos, n).await;
                let row = Row::new(&group, "tg-pubsub", count, elapsed);
                if tg.as_ref().map(Row::rate).unwrap_or(0.0) < row.rate() {
                    tg = Some(row);
                }
            }
            if wants(qos, "batch") {
                let (count, elapsed) = tg_batch_flood(&config, qos, n).await;
                let row = Row::new(&group, "tg-pubsub, batch API", count, elapsed);
                if batch.as_ref().map(Row::rate).unwrap_or(0.0) < row.rate() {
                    batch = Some(row);
                }
            }
        }
        if let (Some(single), Some(batched)) = (&tg, &batch) {
            batch_ratios.push(format!(
                "{qos}: tg-pubsub's batch API moves {:.2}x the messages per second of one message per call",
                batched.rate() / single.rate()
            ));
        }
        rows.extend(raw);
        rows.extend(tg);
        rows.extend(batch);
    }
    print_table(
        &format!(
            "MQTT throughput, {PAYLOAD}-byte messages, broker {}, best of {rounds} rounds (load average {load})",
            config.address()
        ),
        &rows,
    );
    for line in batch_ratios {
        println!("{line}");
    }

    if !only.is_empty() && !only.contains("latency") {
        return;
    }
    let Some(broker) = NodelayBroker::start() else {
        eprintln!("the mosquitto binary is missing: latency run skipped");
        return;
    };
    let fast = MqttConfig::new("127.0.0.1", broker.port);
    let mut latency_rows = Vec::new();
    let count = LATENCY_RATE * LATENCY_SECS;
    let group = format!("q1 @{LATENCY_RATE}/s");
    let (rec, elapsed) = raw_latency(&fast).await;
    latency_rows.push(
        Row::new(&group, "plain rumqttc", count, elapsed)
            .baseline()
            .with_latency(rec.summary()),
    );
    let (rec, elapsed) = tg_latency(&fast).await;
    latency_rows.push(Row::new(&group, "tg-pubsub", count, elapsed).with_latency(rec.summary()));
    print_table(
        "MQTT latency, QoS 1 at a fixed rate, Mosquitto with set_tcp_nodelay true, client TCP_NODELAY on",
        &latency_rows,
    );
    drop(broker);
}

fn topic(qos: Qos) -> Topic {
    Topic::new(
        qos,
        "bench",
        &format!("n{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        "flood",
    )
    .expect("topic")
}

// ---------------------------------------------------------------- tg-pubsub

async fn tg_flood(config: &MqttConfig, qos: Qos, n: u64) -> (u64, Duration) {
    let backend = MqttBackend::connect(config.clone()).await.expect("connect");
    let t = topic(qos);
    let consumer = backend
        .create_consumer(&t, ConsumerOptions::new("bench"))
        .await
        .expect("consumer");
    let producer = backend
        .create_producer(&t, Default::default())
        .await
        .expect("producer");
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        let mut last = Instant::now();
        while got < n {
            match consumer.receive(Duration::from_secs(3)).await {
                Ok(m) => {
                    let _ = consumer.acknowledge(&m).await;
                    got += 1;
                    last = Instant::now();
                }
                Err(_) => break,
            }
        }
        (got, last, consumer)
    });
    for _ in 0..n {
        let receipt = producer
            .send(OutboundMessage::new(payload.clone()))
            .await
            .expect("send");
        drop(receipt);
    }
    let _ = tokio::time::timeout(RUN_LIMIT, producer.flush()).await;
    let (got, last, consumer) = tokio::time::timeout(RUN_LIMIT, reader)
        .await
        .expect("reader")
        .expect("reader");
    let _ = consumer.close().await;
    let _ = backend.close().await;
    (got, last - start)
}

/// The batch API end to end: `send_batch` of `SEND_BATCH` (receipts dropped, as `tg_flood`
/// does, then `flush`), `receive_batch` of up to `RECV_MAX` and one `acknowledge_batch` each.
async fn tg_batch_flood(config: &MqttConfig, qos: Qos, n: u64) -> (u64, Duration) {
    let backend = MqttBackend::connect(config.clone()).await.expect("connect");
    let t = topic(qos);
    let consumer = backend
        .create_consumer(&t, ConsumerOptions::new("bench"))
        .await
        .expect("consumer");
    let producer = backend
        .create_producer(&t, Default::default())
        .await
        .expect("producer");
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        let mut last = Instant::now();
        while got < n {
            match consumer
                .receive_batch(RECV_MAX, Duration::from_secs(3))
                .await
            {
                Ok(batch) if !batch.is_empty() => {
                    let _ = consumer.acknowledge_batch(&batch).await;
                    got += batch.len() as u64;
                    last = Instant::now();
                }
                _ => break,
            }
        }
        (got, last, consumer)
    });
    let mut sent = 0;
    while sent < n {
        let k = (SEND_BATCH as u64).min(n - sent);
        let batch = (0..k)
            .map(|_| OutboundMessage::new(payload.clone()))
            .collect();
        drop(producer.send_batch(batch).await.expect("send_batch"));
        sent += k;
    }
    let _ = tokio::time::timeout(RUN_LIMIT, producer.flush()).await;
    let (got, last, consumer) = tokio::time::timeout(RUN_LIMIT, reader)
        .await
        .expect("reader")
        .expect("reader");
    let _ = consumer.close().await;
    let _ = backend.close().await;
    (got, last - start)
}

async fn tg_latency(config: &MqttConfig) -> (LatencyRecorder, Duration) {
    let backend = MqttBackend::connect(config.clone()).await.expect("connect");
    let t = topic(Qos::Q1);
    let consumer = backend
        .create_consumer(&t, ConsumerOptions::new("lat"))
        .await
        .expect("consumer");
    let producer = backend
        .create_producer(&t, Default::default())
        .await
        .expect("producer");
    let t0 = Instant::now();
    let count = LATENCY_RATE * LATENCY_SECS;
    let reader = tokio::spawn(async move {
        let mut rec = LatencyRecorder::new();
        for _ in 0..count {
            match consumer.receive(Duration::from_secs(5)).await {
                Ok(m) => {
                    if let Some(l) = read_stamp(m.payload(), t0) {
                        rec.record(l);
                    }
                    let _ = consumer.acknowledge(&m).await;
                }
                Err(_) => break,
            }
        }
        (rec, consumer)
    });
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_RATE));
    let start = Instant::now();
    for _ in 0..count {
        tick.tick().await;
        let receipt = producer
            .send(OutboundMessage::new(stamped_payload(PAYLOAD, t0)))
            .await
            .expect("send");
        drop(receipt);
    }
    let (rec, consumer) = reader.await.expect("reader");
    let elapsed = start.elapsed();
    let _ = consumer.close().await;
    let _ = backend.close().await;
    (rec, elapsed)
}

// ---------------------------------------------------------------- plain rumqttc

fn raw_options(config: &MqttConfig, id: &str, consumer: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, config.host.clone(), config.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_outgoing_inflight_upper_limit(config.inflight);
    o.set_max_packet_size(Some((config.max_payload + 64 * 1024) as u32));
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(config.tcp_nodelay);
    o.set_network_options(net);
    if consumer {
        o.set_manual_acks(true);
        o.set_receive_maximum(Some(config.receive_maximum));
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
    }
    o
}

struct RawConsumer {
    client: AsyncClient,
    rx: mpsc::Receiver<rumqttc::v5::mqttbytes::v5::Publish>,
    task: tokio::task::JoinHandle<()>,
}

async fn raw_consumer(config: &MqttConfig, mqtt_topic: &str, qos: QoS) -> RawConsumer {
    let id = format!("raw-c-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let (client, mut eventloop) =
        AsyncClient::new(raw_options(config, &id, true), config.request_capacity);
    let (tx, rx) = mpsc::channel(usize::from(config.receive_maximum) * 2);
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    client
        .subscribe_many([Filter::new(format!("$share/bench/{mqtt_topic}"), qos)])
        .await
        .expect("subscribe");
    let task = tokio::spawn(async move {
        let mut subscribed = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.qos == QoS::AtMostOnce {
                        let _ = tx.try_send(p);
                    } else if tx.send(p).await.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let _ = subscribed_rx.await;
    RawConsumer { client, rx, task }
}

fn raw_producer(config: &MqttConfig) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let id = format!("raw-p-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let (client, mut eventloop) =
        AsyncClient::new(raw_options(config, &id, false), config.request_capacity);
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, task)
}

async fn raw_flood(config: &MqttConfig, qos: Qos, n: u64) -> (u64, Duration) {
    let t = topic(qos);
    let mqtt_topic = format!("{}/{}/{}", t.tenant(), t.namespace(), t.queue());
    let mqtt_qos = if qos == Qos::Q0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let RawConsumer {
        client: cclient,
        mut rx,
        task: ctask,
    } = raw_consumer(config, &mqtt_topic, mqtt_qos).await;
    let (pclient, ptask) = raw_producer(config);
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let start = Instant::now();
    let ack_client = cclient.clone();
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        let mut last = Instant::now();
        while got < n {
            match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
                Ok(Some(p)) => {
                    let _ = ack_client.ack(&p).await;
                    got += 1;
                    last = Instant::now();
                }
                _ => break,
            }
        }
        (got, last)
    });
    for _ in 0..n {
        pclient
            .publish(mqtt_topic.clone(), mqtt_qos, false, payload.clone())
            .await
            .expect("publish");
    }
    let (got, last) = tokio::time::timeout(RUN_LIMIT, reader)
        .await
        .expect("reader")
        .expect("reader");
    let _ = pclient.disconnect().await;
    let _ = cclient.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ptask).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ctask).await;
    (got, last - start)
}

async fn raw_latency(config: &MqttConfig) -> (LatencyRecorder, Duration) {
    let t = topic(Qos::Q1);
    let mqtt_topic = format!("{}/{}/{}", t.tenant(), t.namespace(), t.queue());
    let RawConsumer {
        client: cclient,
        mut rx,
        task: ctask,
    } = raw_consumer(config, &mqtt_topic, QoS::AtLeastOnce).await;
    let (pclient, ptask) = raw_producer(config);
    let t0 = Instant::now();
    let count = LATENCY_RATE * LATENCY_SECS;
    let ack_client = cclient.clone();
    let reader = tokio::spawn(async move {
        let mut rec = LatencyRecorder::new();
        for _ in 0..count {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(p)) => {
                    if let Some(l) = read_stamp(&p.payload, t0) {
                        rec.record(l);
                    }
                    let _ = ack_client.ack(&p).await;
                }
                _ => break,
            }
        }
        rec
    });
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_RATE));
    let start = Instant::now();
    for _ in 0..count {
        tick.tick().await;
        pclient
            .publish(
                mqtt_topic.clone(),
                QoS::AtLeastOnce,
                false,
                stamped_payload(PAYLOAD, t0),
            )
            .await
            .expect("publish");
    }
    let rec = reader.await.expect("reader");
    let elapsed = start.elapsed();
    let _ = pclient.disconnect().await;
    let _ = cclient.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ptask).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ctask).await;
    (rec, elapsed)
}

// ---------------------------------------------------------------- the bench's own broker

struct NodelayBroker {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl NodelayBroker {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir =
            std::env::temp_dir().join(format!("tg-mqtt-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).ok()?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nlog_dest none\n"),
        )
        .ok()?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let broker = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(broker)
    }
}

impl Drop for NodelayBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
