//! What the conformance suite does not cover: connection errors and credentials, the topic
//! mapping as seen in Redis, entries the backend did not write, and carrying on across a server
//! restart.
//!
//! The restart and credential tests start their own `redis-server` on a free port (never the
//! shared one); the mapping test uses `REDIS_URL` (default the local server). When a server or
//! the `redis-server` binary is missing, a test prints why and passes — unless `CI=true`, where it
//! fails.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tg_backend_api::{
    Backend, Consumer, ConsumerOptions, ErrorKind, OutboundMessage, Producer, Qos, Topic,
};
use tg_backend_redis::{RedisBackend, RedisConfig};
use tg_testkit::support::{free_port, skip};

/// A `redis-server` child on its own port and directory, killed on drop.
struct Server {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Server {
    /// Starts `redis-server` with `extra` arguments; `None` (after a skip note) if the binary is
    /// missing.
    fn start(extra: &[&str]) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            skip("redis-server is not installed");
            return None;
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tg-redis-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--daemonize".into(),
            "no".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Self {
            port,
            dir,
            args,
            child: None,
        };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the server dies without a chance to save anything beyond its append-only file.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, credentials: &str) -> String {
        format!("redis://{credentials}127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn shared_backend(prefix: &str) -> Option<(RedisBackend, String)> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| RedisConfig::DEFAULT_URL.to_owned());
    let config = RedisConfig::from_url(&url)
        .expect("REDIS_URL parses")
        .prefix(prefix);
    match RedisBackend::connect(config).await {
        Ok(b) => Some((b, url)),
        Err(e) => {
            skip(&format!("no Redis at {url}: {e}"));
            None
        }
    }
}

#[tokio::test]
async fn unreachable_server_fails_fast_with_connection() {
    let port = free_port(); // nothing listens there
    let config = RedisConfig::from_url(&format!("redis://user:pw-never-shown@127.0.0.1:{port}/0"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1));
    let start = Instant::now();
    let err = RedisBackend::connect(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    let shown = format!("{err} {err:?}");
    assert!(shown.contains(&format!("127.0.0.1:{port}")), "{shown}");
    assert!(!shown.contains("pw-never-shown"), "{shown}");

    // a server that accepts but never answers: the connect timeout bounds the wait
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let config = RedisConfig::from_url(&format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(500));
    let start = Instant::now();
    let err = RedisBackend::connect(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    drop(silent);
}

#[tokio::test]
async fn credentials_are_checked_and_never_shown() {
    let Some(server) = Server::start(&["--requirepass", "right-horse-battery"]) else {
        return;
    };
    for creds in [":wrong-staple@", "default:wrong-staple@", ""] {
        let config = RedisConfig::from_url(&server.url(creds)).unwrap();
        let err = RedisBackend::connect(config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth, "{creds}: {err}");
        let shown = format!("{err} {err:?}");
        assert!(
            shown.contains(&format!("127.0.0.1:{}", server.port)),
            "{shown}"
        );
        assert!(
            !shown.contains("wrong-staple") && !shown.contains("right-horse"),
            "{shown}"
        );
    }
    for creds in [":right-horse-battery@", "default:right-horse-battery@"] {
        let config = RedisConfig::from_url(&server.url(creds)).unwrap();
        assert!(!format!("{config:?}").contains("right-horse"));
        let backend = RedisBackend::connect(config)
            .await
            .expect("right password connects");
        let topic = Topic::new(Qos::Q1, "t", "auth", "q").unwrap();
        let consumer = backend
            .create_consumer(&topic, ConsumerOptions::new("s"))
            .await
            .unwrap();
        let producer = backend
            .create_producer(&topic, Default::default())
            .await
            .unwrap();
        producer
            .send(OutboundMessage::new("hi"))
            .await
            .unwrap()
            .await
            .unwrap();
        let got = consumer.receive(Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.payload().as_ref(), b"hi");
        consumer.acknowledge(&got).await.unwrap();
        backend.close().await.unwrap();
    }
}

#[cfg(not(feature = "tls-rustls"))]
#[tokio::test]
async fn rediss_without_the_tls_feature_is_a_config_error() {
    let config = RedisConfig::from_url("rediss://:pw@127.0.0.1:6379").unwrap();
    let err = RedisBackend::connect(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(err.to_string().contains("tls-rustls"), "{err}");
}

#[tokio::test]
async fn topic_mapping_as_seen_in_redis() {
    let prefix = format!("tgps-map-{}", std::process::id());
    let Some((backend, url)) = shared_backend(&prefix).await else {
        return;
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();

    // q1: a stream named after the topic, fields d / k / p:<name>
    let topic = Topic::new(Qos::Q1, "tenant-a", "ns.1", "queue:with:colons").unwrap();
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("sub:1"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    let id = producer
        .send(OutboundMessage::new("body").property("id", "42").key("k1"))
        .await
        .unwrap()
        .await
        .unwrap();
    let key = format!("{prefix}/{{q1/tenant-a/ns.1/queue:with:colons}}");
    let kind: String = redis::cmd("TYPE")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "stream");
    let entries: Vec<(String, HashMap<String, String>)> = {
        let v: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        v.into_iter()
            .map(|(id, f)| {
                (
                    id,
                    f.chunks(2).map(|c| (c[0].clone(), c[1].clone())).collect(),
                )
            })
            .collect()
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, id.to_string());
    let fields = &entries[0].1;
    assert_eq!(fields.get("d").map(String::as_str), Some("body"));
    assert_eq!(fields.get("k").map(String::as_str), Some("k1"));
    assert_eq!(fields.get("p:id").map(String::as_str), Some("42"));
    let groups: Vec<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(groups.len(), 1, "one group per subscription");
    let got = consumer.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (got.id(), got.key(), got.property("id")),
        (&id, Some("k1"), Some("42"))
    );

    // nack puts a copy on the subscription's retry stream, with the original id and a count
    consumer.negative_acknowledge(&got).await.unwrap();
    let again = consumer.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!((again.id(), again.redelivery_count()), (&id, 1));
    consumer.acknowledge(&again).await.unwrap();
    let retry_len: usize = redis::cmd("XLEN")
        .arg(format!("{key}/retry/sub:1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(retry_len, 0, "acknowledged retry copies are deleted");

    // q0: a channel of the same shape carrying a version-1 frame
    let q0 = topic.with_qos(Qos::Q0);
    let channel = format!("{prefix}/{{q0/tenant-a/ns.1/queue:with:colons}}");
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(&channel).await.unwrap();
    let q0_producer = backend
        .create_producer(&q0, Default::default())
        .await
        .unwrap();
    q0_producer
        .send(OutboundMessage::new("ping"))
        .await
        .unwrap()
        .await
        .unwrap();
    let msg = tokio::time::timeout(
        Duration::from_secs(5),
        futures::StreamExt::next(&mut pubsub.on_message()),
    )
    .await
    .unwrap()
    .unwrap();
    let frame = msg.get_payload_bytes();
    assert_eq!(frame[0], 1, "frame version");
    assert!(frame.ends_with(b"ping"));

    backend.close().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}/*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// Log lines a test collects (a `tracing` writer).
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// `XADD key * field value …`; the new entry's id.
async fn xadd(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    fields: Vec<(&str, Vec<u8>)>,
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (f, v) in fields {
        cmd.arg(f).arg(v);
    }
    cmd.query_async(conn).await.unwrap()
}

/// Entries anyone could `XADD` to a topic stream that are not messages of this backend: an `o`
/// that is no entry id, an `r` that is no count, no payload `d`, a key that is not UTF-8. The
/// consumer delivers the messages around them, warns once per bad entry naming the entry and
/// the field, acknowledges the bad ones (so they do not come back) without deleting them, and goes
/// on. A well-formed redelivered copy (`o`, `r`) keeps its original id and count.
#[tokio::test]
async fn malformed_entries_are_reported_and_skipped() {
    let prefix = format!("tgps-malformed-{}", std::process::id());
    let Some((backend, url)) = shared_backend(&prefix).await else {
        return;
    };
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    // the test runtime is single-threaded: the consumer's reader logs on this thread
    let _guard = tracing::subscriber::set_default(subscriber);
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let topic = Topic::new(Qos::Q1, "t", "malformed", "q").unwrap();
    let key = format!("{prefix}/{{q1/t/malformed/q}}");
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();

    let good_1 = xadd(&mut conn, &key, vec![("d", b"good-1".to_vec())]).await;
    let bad_o = xadd(
        &mut conn,
        &key,
        vec![("d", b"x".to_vec()), ("o", b"garbage-id".to_vec())],
    )
    .await;
    let bad_r = xadd(
        &mut conn,
        &key,
        vec![("d", b"y".to_vec()), ("r", b"lots".to_vec())],
    )
    .await;
    let no_d = xadd(
        &mut conn,
        &key,
        vec![("k", b"key".to_vec()), ("p:id", b"1".to_vec())],
    )
    .await;
    let bad_k = xadd(
        &mut conn,
        &key,
        vec![("d", b"z".to_vec()), ("k", vec![0xff, 0xfe])],
    )
    .await;
    xadd(
        &mut conn,
        &key,
        vec![
            ("d", b"retried".to_vec()),
            ("o", b"1700000000000-7".to_vec()),
            ("r", b"2".to_vec()),
        ],
    )
    .await;
    let good_2 = xadd(
        &mut conn,
        &key,
        vec![("d", b"good-2".to_vec()), ("p:id", b"7".to_vec())],
    )
    .await;

    let mut got = Vec::new();
    while let Ok(m) = consumer.receive(Duration::from_millis(1500)).await {
        consumer.acknowledge(&m).await.unwrap();
        got.push((
            String::from_utf8_lossy(m.payload()).into_owned(),
            m.id().to_string(),
            m.redelivery_count(),
        ));
    }
    assert_eq!(
        got,
        [
            ("good-1".to_owned(), good_1, 0),
            ("retried".to_owned(), "1700000000000-7".to_owned(), 2),
            ("good-2".to_owned(), good_2, 0),
        ]
    );

    // one warning per bad entry, naming it and its field
    let lines = logs.lines();
    for (id, field) in [(&bad_o, "o"), (&bad_r, "r"), (&no_d, "d"), (&bad_k, "k")] {
        let warned: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(&format!("entry={id}")))
            .collect();
        assert_eq!(warned.len(), 1, "{id}: {lines:#?}");
        assert!(
            warned[0].contains("WARN") && warned[0].contains(&format!("field={field}")),
            "{}",
            warned[0]
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("\"garbage-id\"")),
        "{lines:#?}"
    );

    // the bad entries were acknowledged, not deleted: nothing pending, all seven still there
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(&key)
            .arg("s")
            .query_async(&mut conn)
            .await
            .unwrap();
        if pending.0 == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} entries still pending",
            pending.0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let len: usize = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 7);

    // and the consumer goes on
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    producer
        .send(OutboundMessage::new("after"))
        .await
        .unwrap()
        .await
        .unwrap();
    let m = consumer.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(m.payload().as_ref(), b"after");
    consumer.acknowledge(&m).await.unwrap();
    assert_eq!(logs.lines().len(), lines.len(), "no further warnings");

    consumer.close().await.unwrap();
    backend.close().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}/*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// q0 is Redis pub/sub: a subscription takes one consumer of the default type (capability
/// `shared: false`), a second one and exclusive/failover consumers are refused as `Unsupported`
/// saying why; after the first closes, the subscription takes a consumer again.
#[tokio::test]
async fn q0_takes_one_consumer_per_subscription() {
    let prefix = format!("tgps-q0-{}", std::process::id());
    let Some((backend, _)) = shared_backend(&prefix).await else {
        return;
    };
    let caps = backend.capabilities(Qos::Q0);
    assert!(!caps.shared && !caps.exclusive && !caps.failover);
    let topic = Topic::new(Qos::Q0, "t", "q0", "events").unwrap();
    let first = backend
        .create_consumer(&topic, ConsumerOptions::new("live"))
        .await
        .expect("one consumer of the default type");
    let err = backend
        .create_consumer(&topic, ConsumerOptions::new("live"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("already has a consumer"), "{err}");
    for ty in [
        tg_backend_api::ConsumerType::Exclusive,
        tg_backend_api::ConsumerType::Failover,
    ] {
        let err = backend
            .create_consumer(&topic, ConsumerOptions::new("other").consumer_type(ty))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        assert!(err.to_string().contains("PUBLISH/SUBSCRIBE"), "{err}");
    }
    let other = backend
        .create_consumer(&topic, ConsumerOptions::new("another"))
        .await
        .expect("another subscription");
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    producer
        .send(OutboundMessage::new("to both"))
        .await
        .unwrap()
        .await
        .unwrap();
    for c in [&first, &other] {
        let m = c.receive(Duration::from_secs(5)).await.unwrap();
        assert_eq!(m.payload().as_ref(), b"to both");
        c.acknowledge(&m).await.unwrap();
    }
    first.close().await.unwrap();
    let again = backend
        .create_consumer(&topic, ConsumerOptions::new("live"))
        .await
        .expect("the subscription is free again");
    again.close().await.unwrap();
    other.close().await.unwrap();
    backend.close().await.unwrap();
}

/// The batched paths (many sends per pipeline, reads of full batches that carry the previous
/// acknowledgements, acknowledgements arriving while the reader blocks): order, ids, properties
/// and keys survive, every receipt and acknowledgement resolves, nothing stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_sends_reads_and_acknowledgements() {
    let prefix = format!("tgps-batch-{}", std::process::id());
    let Some((backend, url)) = shared_backend(&prefix).await else {
        return;
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let topic = Topic::new(Qos::Q1, "tenant-b", "batch", "jobs").unwrap();
    let consumer: Arc<dyn Consumer> = backend
        .create_consumer(&topic, ConsumerOptions::new("workers"))
        .await
        .unwrap()
        .into();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    let n = 5000;
    let mut receipts = Vec::with_capacity(n);
    for i in 0..n {
        let mut m = OutboundMessage::new(format!("m{i}"));
        if i % 3 == 0 {
            m = m.property("i", i.to_string()).property("tg-x", "y");
        }
        if i % 5 == 0 {
            m = m.key(format!("k{i}"));
        }
        receipts.push(producer.send(m).await.unwrap());
    }
    let mut ids = Vec::with_capacity(n);
    for r in receipts {
        ids.push(r.await.unwrap());
    }
    let parsed: Vec<(u64, u64)> = ids
        .iter()
        .map(|id| {
            let t = id.to_string();
            let (ms, seq) = t.split_once('-').expect("a stream id");
            (ms.parse().unwrap(), seq.parse().unwrap())
        })
        .collect();
    assert!(
        parsed.windows(2).all(|w| w[0] < w[1]),
        "stream ids increase"
    );

    // receive everything; acknowledge most in concurrent groups, some one at a time, and the
    // last ones after a pause (the reader then blocks, so the acknowledger writes them)
    let mut pending_acks = Vec::new();
    let mut group = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let m = consumer.receive(Duration::from_secs(10)).await.unwrap();
        assert_eq!(m.payload().as_ref(), format!("m{i}").as_bytes(), "order");
        assert_eq!(m.id(), id);
        assert_eq!(
            m.property("i").map(str::to_owned),
            (i % 3 == 0).then(|| i.to_string())
        );
        assert_eq!(
            m.key().map(str::to_owned),
            (i % 5 == 0).then(|| format!("k{i}"))
        );
        assert!(m.publish_time().is_some());
        if i >= n - 10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            consumer.acknowledge(&m).await.unwrap();
        } else if i % 7 == 0 {
            consumer.acknowledge(&m).await.unwrap();
        } else {
            group.push(m);
            if group.len() == 50 {
                let c = consumer.clone();
                let msgs = std::mem::take(&mut group);
                pending_acks.push(tokio::spawn(async move {
                    for r in futures::future::join_all(msgs.iter().map(|m| c.acknowledge(m))).await
                    {
                        r.unwrap();
                    }
                }));
            }
        }
    }
    for m in &group {
        consumer.acknowledge(m).await.unwrap();
    }
    for a in pending_acks {
        a.await.unwrap();
    }
    let key = format!("{prefix}/{{q1/tenant-b/batch/jobs}}");
    let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(&key)
        .arg("workers")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending.0, 0, "every acknowledgement reached Redis");
    assert!(consumer.receive(Duration::ZERO).await.is_err());

    // q0 receipts are the producer's sequence numbers, in order across pipelines
    let q0 = backend
        .create_producer(&topic.with_qos(Qos::Q0), Default::default())
        .await
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..3000 {
        receipts.push(
            q0.send(OutboundMessage::new(format!("p{i}")))
                .await
                .unwrap(),
        );
    }
    for (i, r) in receipts.into_iter().enumerate() {
        assert_eq!(r.await.unwrap().as_u64(), Some(i as u64));
    }

    consumer.close().await.unwrap();
    backend.close().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}/*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// A consumer "crashes" (its runtime is dropped: no close, no lease release, its message stays
/// unacknowledged): a second exclusive consumer is refused until the lease expires, then takes
/// over and gets the crashed consumer's message once the visibility timeout passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_consumer_takes_over_after_a_crash() {
    let prefix = format!("tgps-crash-{}", std::process::id());
    let Some((backend, url)) = shared_backend(&prefix).await else {
        return;
    };
    let config = RedisConfig::from_url(&url)
        .unwrap()
        .prefix(&prefix)
        .lease(Duration::from_millis(600))
        .visibility_timeout(Duration::from_millis(1500));
    let topic = Topic::new(Qos::Q1, "t", "crash", "q").unwrap();
    let opts = ConsumerOptions::new("solo").consumer_type(tg_backend_api::ConsumerType::Exclusive);

    let (crash_config, crash_topic, crash_opts) = (config.clone(), topic.clone(), opts.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let b = RedisBackend::connect(crash_config).await.unwrap();
            let c = b.create_consumer(&crash_topic, crash_opts).await.unwrap();
            let p = b
                .create_producer(&crash_topic, Default::default())
                .await
                .unwrap();
            p.send(OutboundMessage::new("held by the dead"))
                .await
                .unwrap()
                .await
                .unwrap();
            let m = c.receive(Duration::from_secs(5)).await.unwrap();
            assert_eq!(m.payload().as_ref(), b"held by the dead");
            std::mem::forget(c); // no close: the process "dies" holding the message and the lease
            std::mem::forget(b);
        });
        drop(rt);
    })
    .join()
    .unwrap();

    let other = RedisBackend::connect(config).await.unwrap();
    let err = other
        .create_consumer(&topic, opts.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConsumerBusy, "{err}");
    assert!(err.to_string().contains("exclusive"), "{err}");
    let start = Instant::now();
    let consumer = loop {
        match other.create_consumer(&topic, opts.clone()).await {
            Ok(c) => break c,
            Err(e)
                if e.kind() == ErrorKind::ConsumerBusy
                    && start.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("no takeover after the lease time: {e}"),
        }
    };
    assert!(
        start.elapsed() <= Duration::from_millis(1500),
        "takeover took {:?}",
        start.elapsed()
    );
    let m = consumer
        .receive(Duration::from_secs(10))
        .await
        .expect("the dead consumer's message is reclaimed");
    assert_eq!(m.payload().as_ref(), b"held by the dead");
    assert!(m.redelivery_count() >= 1);
    consumer.acknowledge(&m).await.unwrap();
    consumer.close().await.unwrap();
    other.close().await.unwrap();
    backend.close().await.unwrap();

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}/*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// Kills (SIGKILL) and restarts a server with an append-only file mid-run: producers and
/// consumers must carry on by themselves, nothing confirmed may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_run_loses_nothing() {
    let Some(mut server) = Server::start(&["--appendonly", "yes", "--appendfsync", "always"])
    else {
        return;
    };
    let config = RedisConfig::from_url(&server.url(""))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .send_timeout(Duration::from_secs(20))
        .visibility_timeout(Duration::from_secs(5));
    let backend = RedisBackend::connect(config)
        .await
        .expect("connect to the test server");
    let topic = Topic::new(Qos::Q1, "t", "restart", "q").unwrap();
    let consumer: Arc<dyn Consumer> = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap()
        .into();
    let producer: Arc<dyn Producer> = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap()
        .into();
    let q0 = topic.with_qos(Qos::Q0);
    let q0_consumer = backend
        .create_consumer(&q0, ConsumerOptions::new("live"))
        .await
        .unwrap();
    let q0_producer = backend
        .create_producer(&q0, Default::default())
        .await
        .unwrap();

    const N: usize = 3000;
    let sender = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut confirmed = HashSet::new();
            let mut failed = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut pending = Vec::new();
            for i in 0..N {
                tick.tick().await;
                let receipt = producer
                    .send(OutboundMessage::new(format!("m{i}")))
                    .await
                    .expect("send queues");
                pending.push((i, receipt));
                if pending.len() >= 50 {
                    for (i, r) in pending.drain(..) {
                        match r.await {
                            Ok(_) => {
                                confirmed.insert(format!("m{i}"));
                            }
                            Err(_) => failed += 1,
                        }
                    }
                }
            }
            for (i, r) in pending.drain(..) {
                match r.await {
                    Ok(_) => {
                        confirmed.insert(format!("m{i}"));
                    }
                    Err(_) => failed += 1,
                }
            }
            (confirmed, failed)
        })
    };
    let receiver = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            let mut seen: HashMap<String, usize> = HashMap::new();
            let mut ack_failures = 0usize;
            let mut redelivered = 0usize;
            loop {
                match consumer.receive(Duration::from_secs(15)).await {
                    Ok(m) => {
                        if m.redelivery_count() > 0 {
                            redelivered += 1;
                        }
                        *seen
                            .entry(String::from_utf8_lossy(m.payload()).into_owned())
                            .or_default() += 1;
                        if consumer.acknowledge(&m).await.is_err() {
                            ack_failures += 1;
                        }
                        if seen.len() >= N {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Timeout => break,
                    Err(e) => panic!("receive failed: {e}"),
                }
            }
            (seen, ack_failures, redelivered)
        })
    };

    tokio::time::sleep(Duration::from_millis(800)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.spawn();

    let (confirmed, failed) = sender.await.unwrap();
    let (seen, ack_failures, redelivered) = receiver.await.unwrap();
    let lost: Vec<&String> = confirmed
        .iter()
        .filter(|m| !seen.contains_key(*m))
        .collect();
    let duplicated = seen.values().filter(|n| **n > 1).count();
    eprintln!(
        "restart: {} confirmed, {failed} sends failed, {} received, {duplicated} delivered more than once \
         (sends retried across the restart), {redelivered} redelivered by the group, \
         {ack_failures} acknowledgements failed, {} lost",
        confirmed.len(),
        seen.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    assert_eq!(
        failed, 0,
        "sends failed although the server came back within the send timeout"
    );
    assert!(confirmed.len() == N);

    // the q0 subscriber is back too (after its connection was restored)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        q0_producer
            .send(OutboundMessage::new("after restart"))
            .await
            .unwrap()
            .await
            .unwrap();
        match q0_consumer.receive(Duration::from_millis(300)).await {
            Ok(m) => {
                assert_eq!(m.payload().as_ref(), b"after restart");
                break;
            }
            Err(e) if e.kind() == ErrorKind::Timeout && Instant::now() < deadline => {}
            Err(e) => panic!("q0 consumer did not recover: {e}"),
        }
    }
    backend.close().await.unwrap();
}
