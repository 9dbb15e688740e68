//! tg-pubsub on Redis against the plain `redis` crate doing the same commands, in one run.
//!
//! `cargo bench -p tg-backend-redis --bench compare`. For q0 (PUBLISH/SUBSCRIBE) and q1
//! (XADD MAXLEN ~ / XREADGROUP / XACK) it moves N messages of 200 bytes from a producer task to a
//! consumer task (acknowledging each on q1), in interleaved rounds of three paths — the raw crate
//! (pipelines of 1,024 commands, `XREADGROUP COUNT 64` with the previous `XACK`), tg-pubsub one
//! message per call, and tg-pubsub's batch API (`send_batch` of 1,024, `receive_batch` of up to
//! 64, `acknowledge_batch`) — and prints each path's median throughput, the ratios to the raw
//! crate and (batch) to the single-message path, and the latency at 1,000 msg/s for 2 s.
//!
//! Environment: `REDIS_URL`; `BENCH_MESSAGES` (200,000); `BENCH_ROUNDS` (3); `BENCH_QOS=q0|q1`
//! (only one); `BENCH_VERBOSE=1` (producer time); `BENCH_SKIP_RAW` / `BENCH_SKIP_TG` /
//! `BENCH_SKIP_BATCH`;
//! `BENCH_NO_ACK` (tg path without acknowledgements); `BENCH_PROBE=1` (client CPU of producing
//! and of consuming alone, tg-pubsub vs raw; q1, or q0 producing alone with `BENCH_QOS=q0`).
//!
//! Instructions per phase: `valgrind --tool=callgrind --dump-before='*callgrind_mark*'` on the
//! bench binary writes one dump per phase (see [`callgrind_mark`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use redis::aio::ConnectionLike;
use redis::Value;
use tg_backend_api::{
    Backend, Consumer, ConsumerOptions, Message, OutboundMessage, Producer, Qos, Topic,
};
use tg_backend_redis::{RedisBackend, RedisConfig};

const PAYLOAD: usize = 200;
const RAW_BATCH: usize = 1024;
const READ_COUNT: usize = 64;
const IDLE: Duration = Duration::from_secs(3);
/// Messages the tg-pubsub consumer acknowledges together (from a helper task).
const ACK_CHUNK: usize = 64;
/// Messages per `send_batch` of the batch path (as many as the raw client's pipelines).
const SEND_BATCH: usize = RAW_BATCH;
/// `max` of the batch path's `receive_batch` (as many as the raw client's `XREADGROUP COUNT`).
const RECV_MAX: usize = READ_COUNT;

struct Row {
    path: String,
    messages: usize,
    rate: f64,
    ratio: Option<f64>,
    /// The batch path's rate ÷ the single-message tg-pubsub path's.
    to_single: Option<f64>,
    /// The Redis server's CPU per message (median of rounds), µs.
    server_us: f64,
    p50_us: u64,
    p99_us: u64,
}

/// A 200-byte payload whose first 16 bytes are the send time in ns since `base`.
fn payload(base: Instant) -> Vec<u8> {
    let mut p = vec![b'x'; PAYLOAD];
    p[..16].copy_from_slice(&base.elapsed().as_nanos().to_be_bytes());
    p
}

fn latency_us(base: Instant, payload: &[u8]) -> u64 {
    let mut b = [0u8; 16];
    if payload.len() < 16 {
        return 0;
    }
    b.copy_from_slice(&payload[..16]);
    let sent = Duration::from_nanos(u128::from_be_bytes(b) as u64);
    base.elapsed().saturating_sub(sent).as_micros() as u64
}

/// CPU time (user + system) this process used so far, from /proc (Linux), in clock ticks.
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit(')').next()?.split_whitespace().collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) the Redis server used so far (`INFO cpu`); 0 when unknown. Per
/// path and round it shows how close a path runs to what the server can do: a path whose
/// messages cost the server `c` µs each cannot go faster than `1/c` on the server's core.
async fn server_cpu(client: &redis::Client) -> f64 {
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return 0.0;
    };
    let Ok(info) = redis::cmd("INFO")
        .arg("cpu")
        .query_async::<String>(&mut conn)
        .await
    else {
        return 0.0;
    };
    info.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            matches!(k, "used_cpu_user" | "used_cpu_sys").then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// A phase boundary for `valgrind --tool=callgrind --dump-before='*callgrind_mark*'`: each call
/// starts a new dump, so instructions per phase (produce, consume, one path's round) can be read
/// apart. Does nothing otherwise.
#[inline(never)]
fn callgrind_mark(phase: &'static str) {
    std::hint::black_box(phase);
}

/// Acknowledges `msgs` concurrently and waits for every acknowledgement, as many handler tasks
/// would. The consumer's own (boxed) futures are polled in one place: `join_all` would put more
/// than 30 of them in a `FuturesOrdered`, allocating and scheduling a task per future, which cost
/// more client CPU than the acknowledgement itself.
async fn acknowledge_all(c: &dyn Consumer, msgs: &[Message]) -> tg_backend_api::Result<()> {
    let mut pending: Vec<_> = msgs.iter().map(|m| c.acknowledge(m)).collect();
    let mut result = Ok(());
    std::future::poll_fn(|cx| {
        pending.retain_mut(|f| match f.as_mut().poll(cx) {
            std::task::Poll::Ready(r) => {
                if let (Err(e), true) = (r, result.is_ok()) {
                    result = Err(e);
                }
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    result
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds are valid")
}

// ---------------------------------------------------------------- tg-pubsub

async fn tg_throughput(backend: &RedisBackend, topic: &Topic, n: usize) -> (usize, Duration) {
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
    let ack = topic.qos() != Qos::Q0 && std::env::var("BENCH_NO_ACK").is_err();
    let reader = {
        let c = consumer.clone();
        tokio::spawn(async move {
            let mut got = 0usize;
            let mut last = Instant::now();
            // acknowledge in chunks from helper tasks: each chunk joins one XACK batch
            let mut chunk: Vec<Message> = Vec::with_capacity(ACK_CHUNK);
            let mut ackers = Vec::new();
            let flush = |chunk: &mut Vec<Message>,
                         ackers: &mut Vec<tokio::task::JoinHandle<()>>| {
                if ack && !chunk.is_empty() {
                    let msgs = std::mem::replace(chunk, Vec::with_capacity(ACK_CHUNK));
                    let c = c.clone();
                    ackers.push(tokio::spawn(async move {
                        acknowledge_all(c.as_ref(), &msgs).await.expect("ack");
                    }));
                }
                chunk.clear();
            };
            while got < n {
                let m = match c.receive(Duration::ZERO).await {
                    Ok(m) => m,
                    Err(_) => {
                        flush(&mut chunk, &mut ackers);
                        match c.receive(IDLE).await {
                            Ok(m) => m,
                            Err(_) => break,
                        }
                    }
                };
                got += 1;
                last = Instant::now();
                chunk.push(m);
                if chunk.len() >= ACK_CHUNK {
                    flush(&mut chunk, &mut ackers);
                }
            }
            flush(&mut chunk, &mut ackers);
            for a in ackers {
                a.await.expect("acker");
            }
            (got, last)
        })
    };
    let start = Instant::now();
    let writer = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let base = Instant::now();
            for _ in 0..n {
                let receipt = producer
                    .send(OutboundMessage::new(payload(base)))
                    .await
                    .expect("send");
                drop(receipt);
            }
            producer.flush().await.expect("flush");
        })
    };
    writer.await.expect("producer task");
    if std::env::var("BENCH_VERBOSE").is_ok() {
        println!("{}: producer done after {:?}", topic.qos(), start.elapsed());
    }
    let (got, last) = reader.await.expect("reader");
    let _ = producer.close().await;
    let _ = consumer.close().await;
    (got, last.duration_since(start))
}

/// The batch API end to end: the producer hands over `SEND_BATCH` messages per `send_batch`
/// (receipts dropped, one `flush` at the end, as the single path); the consumer takes up to
/// `RECV_MAX` per `receive_batch` and acknowledges each batch with one `acknowledge_batch`,
/// run together with the next `receive_batch` (as the raw client sends the previous batch's
/// `XACK` with its next read).
async fn tg_batch_throughput(backend: &RedisBackend, topic: &Topic, n: usize) -> (usize, Duration) {
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
    let ack = topic.qos() != Qos::Q0 && std::env::var("BENCH_NO_ACK").is_err();
    let reader = {
        let c = consumer.clone();
        tokio::spawn(async move {
            let mut got = 0usize;
            let mut last = Instant::now();
            let mut previous: Vec<Message> = Vec::new();
            while got < n {
                let acked = async {
                    if ack && !previous.is_empty() {
                        c.acknowledge_batch(&previous).await
                    } else {
                        Ok(())
                    }
                };
                let (batch, acked) = tokio::join!(c.receive_batch(RECV_MAX, IDLE), acked);
                acked.expect("ack");
                let batch = batch.expect("receive");
                if batch.is_empty() {
                    previous.clear();
                    break;
                }
                got += batch.len();
                last = Instant::now();
                previous = batch;
            }
            if ack && !previous.is_empty() {
                c.acknowledge_batch(&previous).await.expect("ack");
            }
            (got, last)
        })
    };
    let start = Instant::now();
    let writer = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let base = Instant::now();
            let mut sent = 0;
            while sent < n {
                let k = SEND_BATCH.min(n - sent);
                let batch = (0..k)
                    .map(|_| OutboundMessage::new(payload(base)))
                    .collect();
                drop(producer.send_batch(batch).await.expect("send_batch"));
                sent += k;
            }
            producer.flush().await.expect("flush");
        })
    };
    writer.await.expect("producer task");
    let (got, last) = reader.await.expect("reader");
    let _ = producer.close().await;
    let _ = consumer.close().await;
    (got, last.duration_since(start))
}

/// Latency through the batch API at 1,000 msg/s: a one-message `send_batch` per tick, and
/// `receive_batch` + `acknowledge_batch` on the consumer.
async fn tg_batch_latency(backend: &RedisBackend, topic: &Topic) -> Histogram<u64> {
    let consumer: Arc<dyn Consumer> = backend
        .create_consumer(topic, ConsumerOptions::new("lat"))
        .await
        .expect("consumer")
        .into();
    let producer: Arc<dyn Producer> = backend
        .create_producer(topic, Default::default())
        .await
        .expect("producer")
        .into();
    let base = Instant::now();
    let count = 2000;
    let reader = {
        let c = consumer.clone();
        tokio::spawn(async move {
            let mut h = histogram();
            let mut got = 0;
            while got < count {
                let batch = c.receive_batch(RECV_MAX, IDLE).await.unwrap_or_default();
                if batch.is_empty() {
                    break;
                }
                for m in &batch {
                    let _ = h.record(latency_us(base, m.payload()).max(1));
                }
                got += batch.len();
                let _ = c.acknowledge_batch(&batch).await;
            }
            h
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..count {
        tick.tick().await;
        let receipts = producer
            .send_batch(vec![OutboundMessage::new(payload(base))])
            .await
            .expect("send_batch");
        drop(receipts);
    }
    let h = reader.await.expect("reader");
    let _ = consumer.close().await;
    h
}

async fn tg_latency(backend: &RedisBackend, topic: &Topic) -> Histogram<u64> {
    let consumer: Arc<dyn Consumer> = backend
        .create_consumer(topic, ConsumerOptions::new("lat"))
        .await
        .expect("consumer")
        .into();
    let producer: Arc<dyn Producer> = backend
        .create_producer(topic, Default::default())
        .await
        .expect("producer")
        .into();
    let base = Instant::now();
    let count = 2000;
    let reader = {
        let c = consumer.clone();
        tokio::spawn(async move {
            let mut h = histogram();
            for _ in 0..count {
                match c.receive(IDLE).await {
                    Ok(m) => {
                        let _ = h.record(latency_us(base, m.payload()).max(1));
                        let _ = c.acknowledge(&m).await;
                    }
                    Err(_) => break,
                }
            }
            h
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..count {
        tick.tick().await;
        let receipt = producer
            .send(OutboundMessage::new(payload(base)))
            .await
            .expect("send");
        drop(receipt);
    }
    let h = reader.await.expect("reader");
    let _ = consumer.close().await;
    h
}

// ---------------------------------------------------------------- raw redis crate

async fn raw_q0_throughput(client: &redis::Client, channel: &str, n: usize) -> (usize, Duration) {
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(channel).await.expect("subscribe");
    let reader = tokio::spawn(async move {
        let mut stream = pubsub.into_on_message();
        let mut got = 0usize;
        let mut last = Instant::now();
        while got < n {
            match tokio::time::timeout(IDLE, stream.next()).await {
                Ok(Some(m)) => {
                    let _ = m.get_payload_bytes().len();
                    got += 1;
                    last = Instant::now();
                }
                _ => break,
            }
        }
        (got, last)
    });
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let start = Instant::now();
    let channel = channel.to_owned();
    tokio::spawn(async move {
        let base = Instant::now();
        let mut sent = 0;
        while sent < n {
            let k = RAW_BATCH.min(n - sent);
            let mut pipe = redis::pipe();
            for _ in 0..k {
                pipe.cmd("PUBLISH").arg(&channel).arg(payload(base));
            }
            conn.req_packed_commands(&pipe, 0, k)
                .await
                .expect("publish");
            sent += k;
        }
    })
    .await
    .expect("producer task");
    let (got, last) = reader.await.expect("reader");
    (got, last.duration_since(start))
}

async fn raw_q1_throughput(client: &redis::Client, stream: &str, n: usize) -> (usize, Duration) {
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("bench")
        .arg("$")
        .arg("MKSTREAM")
        .query_async::<()>(&mut conn)
        .await
        .expect("group");
    let reader = {
        let client = client.clone();
        let stream = stream.to_owned();
        tokio::spawn(async move {
            let mut rconn = client
                .get_multiplexed_async_connection()
                .await
                .expect("conn");
            let mut got = 0usize;
            let mut last = Instant::now();
            let mut pending: Vec<String> = Vec::new();
            while got < n {
                // one round trip: acknowledge the previous batch and read the next
                let mut pipe = redis::pipe();
                if !pending.is_empty() {
                    pipe.cmd("XACK")
                        .arg(&stream)
                        .arg("bench")
                        .arg(&pending)
                        .ignore();
                }
                pipe.cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("bench")
                    .arg("raw")
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("BLOCK")
                    .arg(IDLE.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">");
                let (v,): (Value,) = pipe.query_async(&mut rconn).await.expect("xreadgroup");
                let ids = entry_ids(v);
                if ids.is_empty() {
                    break;
                }
                got += ids.len();
                last = Instant::now();
                pending = ids;
            }
            if !pending.is_empty() {
                redis::cmd("XACK")
                    .arg(&stream)
                    .arg("bench")
                    .arg(&pending)
                    .query_async::<()>(&mut rconn)
                    .await
                    .expect("xack");
            }
            (got, last)
        })
    };
    let start = Instant::now();
    let stream = stream.to_owned();
    tokio::spawn(async move {
        let base = Instant::now();
        let mut sent = 0;
        while sent < n {
            let k = RAW_BATCH.min(n - sent);
            let mut pipe = redis::pipe();
            for _ in 0..k {
                pipe.cmd("XADD")
                    .arg(&stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(1_000_000)
                    .arg("*")
                    .arg("d")
                    .arg(payload(base));
            }
            conn.req_packed_commands(&pipe, 0, k).await.expect("xadd");
            sent += k;
        }
    })
    .await
    .expect("producer task");
    let (got, last) = reader.await.expect("reader");
    (got, last.duration_since(start))
}

/// Ids and payloads of an XREADGROUP reply (one stream).
fn entries(v: Value) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Value::Array(streams) = v else { return out };
    for s in streams {
        let Value::Array(kv) = s else { continue };
        let Some(Value::Array(items)) = kv.into_iter().nth(1) else {
            continue;
        };
        for e in items {
            let Value::Array(parts) = e else { continue };
            let mut it = parts.into_iter();
            let (Some(Value::BulkString(id)), Some(Value::Array(fields))) = (it.next(), it.next())
            else {
                continue;
            };
            let payload = match fields.into_iter().nth(1) {
                Some(Value::BulkString(b)) => b,
                _ => Vec::new(),
            };
            out.push((String::from_utf8_lossy(&id).into_owned(), payload));
        }
    }
    out
}

fn entry_ids(v: Value) -> Vec<String> {
    entries(v).into_iter().map(|(id, _)| id).collect()
}

async fn raw_latency(client: &redis::Client, key: &str, qos: Qos) -> Histogram<u64> {
    let count = 2000;
    let base = Instant::now();
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let reader = if qos == Qos::Q0 {
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
        pubsub.subscribe(key).await.expect("subscribe");
        tokio::spawn(async move {
            let mut h = histogram();
            let mut stream = pubsub.into_on_message();
            for _ in 0..count {
                match tokio::time::timeout(IDLE, stream.next()).await {
                    Ok(Some(m)) => {
                        let _ = h.record(latency_us(base, m.get_payload_bytes()).max(1));
                    }
                    _ => break,
                }
            }
            h
        })
    } else {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("lat")
            .arg("$")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await
            .expect("group");
        let client = client.clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            let mut h = histogram();
            let mut rconn = client
                .get_multiplexed_async_connection()
                .await
                .expect("conn");
            let mut got = 0;
            while got < count {
                let v: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("lat")
                    .arg("raw")
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("BLOCK")
                    .arg(IDLE.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(">")
                    .query_async(&mut rconn)
                    .await
                    .expect("xreadgroup");
                let es = entries(v);
                if es.is_empty() {
                    break;
                }
                for (_, p) in &es {
                    let _ = h.record(latency_us(base, p).max(1));
                }
                got += es.len();
                let ids: Vec<&String> = es.iter().map(|(id, _)| id).collect();
                let _ = redis::cmd("XACK")
                    .arg(&key)
                    .arg("lat")
                    .arg(&ids)
                    .query_async::<()>(&mut rconn)
                    .await;
            }
            h
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..count {
        tick.tick().await;
        let mut cmd = if qos == Qos::Q0 {
            let mut c = redis::cmd("PUBLISH");
            c.arg(key);
            c
        } else {
            let mut c = redis::cmd("XADD");
            c.arg(key)
                .arg("MAXLEN")
                .arg("~")
                .arg(1_000_000)
                .arg("*")
                .arg("d");
            c
        };
        cmd.arg(payload(base));
        let mut c2 = conn.clone();
        tokio::spawn(async move {
            let _ = cmd.query_async::<Value>(&mut c2).await;
        });
    }
    reader.await.expect("reader")
}

/// Client CPU of producing only, then of consuming only (diagnostics, `BENCH_PROBE=1`).
async fn probe(backend: &RedisBackend, client: &redis::Client, prefix: &str, n: usize) {
    let topic = Topic::new(Qos::Q1, "bench", "probe", "p").expect("topic");
    let consumer: Arc<dyn Consumer> = backend
        .create_consumer(&topic, ConsumerOptions::new("probe"))
        .await
        .expect("consumer")
        .into();
    let producer: Arc<dyn Producer> = backend
        .create_producer(&topic, Default::default())
        .await
        .expect("producer")
        .into();
    callgrind_mark("tg produce");
    let c0 = cpu_ticks();
    let t = Instant::now();
    let p2 = producer.clone();
    tokio::spawn(async move {
        let base = Instant::now();
        for _ in 0..n {
            drop(
                p2.send(OutboundMessage::new(payload(base)))
                    .await
                    .expect("send"),
            );
        }
        p2.flush().await.expect("flush");
    })
    .await
    .expect("producer");
    println!("tg produce: {} ticks, {:?}", cpu_ticks() - c0, t.elapsed());
    callgrind_mark("tg consume");
    let c0 = cpu_ticks();
    let t = Instant::now();
    let c2 = consumer.clone();
    tokio::spawn(async move {
        let mut chunk = Vec::new();
        let mut ackers = Vec::new();
        for _ in 0..n {
            let m = c2.receive(IDLE).await.expect("receive");
            chunk.push(m);
            if chunk.len() == ACK_CHUNK {
                let msgs = std::mem::replace(&mut chunk, Vec::with_capacity(ACK_CHUNK));
                let c = c2.clone();
                ackers.push(tokio::spawn(async move {
                    acknowledge_all(c.as_ref(), &msgs).await.expect("ack");
                }));
            }
        }
        for a in ackers {
            a.await.expect("acker");
        }
    })
    .await
    .expect("consumer");
    callgrind_mark("probe setup");
    println!(
        "tg consume+ack: {} ticks, {:?}",
        cpu_ticks() - c0,
        t.elapsed()
    );

    let stream = format!("{prefix}/probe-raw");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async::<()>(&mut conn)
        .await
        .expect("group");
    callgrind_mark("raw produce");
    let c0 = cpu_ticks();
    let t = Instant::now();
    let s2 = stream.clone();
    let mut conn2 = conn.clone();
    tokio::spawn(async move {
        let base = Instant::now();
        let mut sent = 0;
        while sent < n {
            let k = RAW_BATCH.min(n - sent);
            let mut pipe = redis::pipe();
            for _ in 0..k {
                pipe.cmd("XADD")
                    .arg(&s2)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(1_000_000)
                    .arg("*")
                    .arg("d")
                    .arg(payload(base));
            }
            conn2.req_packed_commands(&pipe, 0, k).await.expect("xadd");
            sent += k;
        }
    })
    .await
    .expect("raw producer");
    println!("raw produce: {} ticks, {:?}", cpu_ticks() - c0, t.elapsed());
    callgrind_mark("raw consume");
    let c0 = cpu_ticks();
    let t = Instant::now();
    let mut got = 0;
    let mut pending: Vec<String> = Vec::new();
    while got < n {
        let mut pipe = redis::pipe();
        if !pending.is_empty() {
            pipe.cmd("XACK")
                .arg(&stream)
                .arg("g")
                .arg(&pending)
                .ignore();
        }
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("raw")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">");
        let (v,): (Value,) = pipe.query_async(&mut conn).await.expect("read");
        let ids = entry_ids(v);
        got += ids.len();
        pending = ids;
    }
    callgrind_mark("probe end");
    println!(
        "raw consume+ack: {} ticks, {:?}",
        cpu_ticks() - c0,
        t.elapsed()
    );
}

/// Client CPU of q0 producing alone, with no subscriber (`BENCH_PROBE=1 BENCH_QOS=q0`).
async fn probe_q0(backend: &RedisBackend, client: &redis::Client, prefix: &str, n: usize) {
    let topic = Topic::new(Qos::Q0, "bench", "probe", "p").expect("topic");
    let producer: Arc<dyn Producer> = backend
        .create_producer(&topic, Default::default())
        .await
        .expect("producer")
        .into();
    callgrind_mark("tg produce q0");
    let c0 = cpu_ticks();
    let t = Instant::now();
    let p2 = producer.clone();
    tokio::spawn(async move {
        let base = Instant::now();
        for _ in 0..n {
            drop(
                p2.send(OutboundMessage::new(payload(base)))
                    .await
                    .expect("send"),
            );
        }
        p2.flush().await.expect("flush");
    })
    .await
    .expect("producer");
    callgrind_mark("probe setup");
    println!(
        "tg produce q0: {} ticks, {:?}",
        cpu_ticks() - c0,
        t.elapsed()
    );
    let channel = format!("{prefix}/probe-raw-q0");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    callgrind_mark("raw produce q0");
    let c0 = cpu_ticks();
    let t = Instant::now();
    tokio::spawn(async move {
        let base = Instant::now();
        let mut sent = 0;
        while sent < n {
            let k = RAW_BATCH.min(n - sent);
            let mut pipe = redis::pipe();
            for _ in 0..k {
                pipe.cmd("PUBLISH").arg(&channel).arg(payload(base));
            }
            conn.req_packed_commands(&pipe, 0, k)
                .await
                .expect("publish");
            sent += k;
        }
    })
    .await
    .expect("raw producer");
    callgrind_mark("probe end");
    println!(
        "raw produce q0: {} ticks, {:?}",
        cpu_ticks() - c0,
        t.elapsed()
    );
}

// ---------------------------------------------------------------- main

fn main() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| RedisConfig::DEFAULT_URL.to_owned());
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let prefix = format!("tgps-bench-{}", std::process::id());
        let config = RedisConfig::from_url(&url)
            .expect("REDIS_URL")
            .prefix(prefix.clone());
        let backend = match RedisBackend::connect(config).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("benchmark skipped: {e}");
                return;
            }
        };
        let client = redis::Client::open(url.as_str()).expect("client");
        let probing = std::env::var("BENCH_PROBE").is_ok();
        let only = std::env::var("BENCH_QOS").ok();
        if probing {
            if only.as_deref() == Some("q0") {
                probe_q0(&backend, &client, &prefix, n).await;
            } else {
                probe(&backend, &client, &prefix, n).await;
            }
        }
        let mut rows = Vec::new();
        for qos in [Qos::Q0, Qos::Q1] {
            if probing || only.as_deref().is_some_and(|q| q != qos.as_str()) {
                continue;
            }
            // interleaved rounds (raw, tg, raw, tg, …): the machine is shared, so each path's
            // median over the rounds is compared
            let rounds: usize =
                std::env::var("BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
            let skip_raw = std::env::var("BENCH_SKIP_RAW").is_ok();
            let skip_tg = std::env::var("BENCH_SKIP_TG").is_ok();
            let skip_batch = std::env::var("BENCH_SKIP_BATCH").is_ok();
            let (mut raw_rates, mut tg_rates, mut batch_rates) = (Vec::new(), Vec::new(), Vec::new());
            let (mut raw_got, mut got, mut batch_got) = (n, n, n);
            let (mut raw_srv, mut tg_srv, mut batch_srv) = (Vec::new(), Vec::new(), Vec::new());
            let per_msg = |secs: f64, got: usize| secs * 1e6 / got.max(1) as f64;
            for round in 0..rounds {
                let raw_key = format!("{prefix}/raw/{qos}/{round}");
                callgrind_mark("raw round");
                let srv0 = server_cpu(&client).await;
                let cpu0 = cpu_ticks();
                let (g, time) = if skip_raw {
                    (1, Duration::from_secs(1))
                } else if qos == Qos::Q0 {
                    raw_q0_throughput(&client, &raw_key, n).await
                } else {
                    raw_q1_throughput(&client, &raw_key, n).await
                };
                let raw_cpu = cpu_ticks() - cpu0;
                let srv1 = server_cpu(&client).await;
                raw_srv.push(per_msg(srv1 - srv0, g));
                raw_got = raw_got.min(g);
                raw_rates.push(g as f64 / time.as_secs_f64());
                let topic = Topic::new(qos, "bench", "compare", &format!("throughput-{round}")).expect("topic");
                callgrind_mark("tg round");
                let cpu0 = cpu_ticks();
                let (g, time) =
                    if skip_tg { (1, Duration::from_secs(1)) } else { tg_throughput(&backend, &topic, n).await };
                let tg_cpu = cpu_ticks() - cpu0;
                let srv2 = server_cpu(&client).await;
                tg_srv.push(per_msg(srv2 - srv1, g));
                got = got.min(g);
                tg_rates.push(g as f64 / time.as_secs_f64());
                let batch_topic = Topic::new(qos, "bench", "compare", &format!("batch-{round}")).expect("topic");
                callgrind_mark("tg batch round");
                let cpu0 = cpu_ticks();
                let (g, time) = if skip_batch {
                    (1, Duration::from_secs(1))
                } else {
                    tg_batch_throughput(&backend, &batch_topic, n).await
                };
                let batch_cpu = cpu_ticks() - cpu0;
                batch_srv.push(per_msg(server_cpu(&client).await - srv2, g));
                callgrind_mark("round end");
                batch_got = batch_got.min(g);
                batch_rates.push(g as f64 / time.as_secs_f64());
                // free the round's streams at once (the server is shared)
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let tg_key = format!("{prefix}/{{{topic}}}");
                    let batch_key = format!("{prefix}/{{{batch_topic}}}");
                    let _ = redis::cmd("UNLINK").arg(&raw_key).arg(&tg_key).arg(&batch_key).query_async::<()>(&mut conn).await;
                }
                println!(
                    "{qos} round {}: raw {:.0} msg/s, tg-pubsub {:.0} msg/s, tg-pubsub batch {:.0} msg/s (client CPU {raw_cpu} / {tg_cpu} / {batch_cpu} ticks of 10 ms; Redis CPU {:.2} / {:.2} / {:.2} µs per message)",
                    round + 1,
                    raw_rates[round],
                    tg_rates[round],
                    batch_rates[round],
                    raw_srv[round],
                    tg_srv[round],
                    batch_srv[round],
                );
            }
            let raw_rate = median(&mut raw_rates);
            let rate = median(&mut tg_rates);
            let batch_rate = median(&mut batch_rates);
            let raw_lat = raw_latency(&client, &format!("{prefix}/raw/{qos}/lat"), qos).await;
            let lat_topic = Topic::new(qos, "bench", "compare", "latency").expect("topic");
            let lat = tg_latency(&backend, &lat_topic).await;
            let batch_lat_topic = Topic::new(qos, "bench", "compare", "batch-latency").expect("topic");
            let batch_lat = tg_batch_latency(&backend, &batch_lat_topic).await;

            rows.push(Row {
                path: format!("{qos} raw redis crate"),
                messages: raw_got,
                rate: raw_rate,
                ratio: None,
                to_single: None,
                server_us: median(&mut raw_srv),
                p50_us: raw_lat.value_at_quantile(0.5),
                p99_us: raw_lat.value_at_quantile(0.99),
            });
            rows.push(Row {
                path: format!("{qos} tg-pubsub"),
                messages: got,
                rate,
                ratio: Some(rate / raw_rate),
                to_single: None,
                server_us: median(&mut tg_srv),
                p50_us: lat.value_at_quantile(0.5),
                p99_us: lat.value_at_quantile(0.99),
            });
            rows.push(Row {
                path: format!("{qos} tg-pubsub batch"),
                messages: batch_got,
                rate: batch_rate,
                ratio: Some(batch_rate / raw_rate),
                to_single: Some(batch_rate / rate),
                server_us: median(&mut batch_srv),
                p50_us: batch_lat.value_at_quantile(0.5),
                p99_us: batch_lat.value_at_quantile(0.99),
            });
            if got < n || raw_got < n || batch_got < n {
                println!("note: {qos}: received {got} (tg-pubsub), {batch_got} (tg-pubsub batch) and {raw_got} (raw) of {n}");
            }
        }
        println!();
        println!("| path | messages | msg/s (median of rounds) | ratio to raw | ratio to tg-pubsub single | Redis CPU µs/msg | latency p50 / p99 (1,000 msg/s) |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {} | {:.0} | {} | {} | {:.2} | {:.3} ms / {:.3} ms |",
                r.path,
                r.messages,
                r.rate,
                r.ratio
                    .map_or("1.00 (baseline)".to_owned(), |x| format!("{x:.2}")),
                r.to_single.map_or("".to_owned(), |x| format!("{x:.2}")),
                r.server_us,
                r.p50_us as f64 / 1000.0,
                r.p99_us as f64 / 1000.0
            );
        }
        let _ = backend.close().await;
        // delete what the run created
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            if let Ok(keys) = redis::cmd("KEYS")
                .arg(format!("{prefix}/*"))
                .query_async::<Vec<String>>(&mut conn)
                .await
            {
                if !keys.is_empty() {
                    let _ = redis::cmd("UNLINK")
                        .arg(&keys)
                        .query_async::<()>(&mut conn)
                        .await;
                }
            }
        }
    });
}
