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
use tg_testkit::proxy::{Mode, Proxy};
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

/// Entries anyone could `XADD` to a topic stream that this backend did not write. Without a
/// payload `d` or with a key that is not UTF-8 an entry is no message: the consumer warns once
/// naming the entry and the field, acknowledges it (so it does not come back) without deleting
/// it, and goes on. With an `o` that is no entry id or an `r` that is no count the message is
/// intact: it is delivered with the field set aside (its own entry id, no redeliveries) and one
/// warning naming the entry and the field. A well-formed redelivered copy (`o`, `r`) keeps its
/// original id and count.
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
            ("x".to_owned(), bad_o.clone(), 0),
            ("y".to_owned(), bad_r.clone(), 0),
            ("retried".to_owned(), "1700000000000-7".to_owned(), 2),
            ("good-2".to_owned(), good_2, 0),
        ]
    );

    // one warning per bad entry, naming it and its field, and saying what became of it
    let lines = logs.lines();
    for (id, field, outcome) in [
        (&bad_o, "o", "delivering"),
        (&bad_r, "r", "delivering"),
        (&no_d, "d", "dropping"),
        (&bad_k, "k", "dropping"),
    ] {
        let warned: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(&format!("entry={id}")))
            .collect();
        assert_eq!(warned.len(), 1, "{id}: {lines:#?}");
        assert!(
            warned[0].contains("WARN")
                && warned[0].contains(&format!("field={field}"))
                && warned[0].contains(outcome),
            "{}",
            warned[0]
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("\"garbage-id\"")),
        "{lines:#?}"
    );
    assert!(lines.iter().any(|l| l.contains("\"lots\"")), "{lines:#?}");

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

/// Deletes every key under `prefix`.
async fn delete_keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}/*"))
        .query_async(conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(conn)
            .await
            .unwrap();
    }
}

/// A collector of the test's warnings, set as the thread's default subscriber while the guard
/// lives (the tests using it run on one thread, where the consumer's tasks log too).
fn collect_warnings() -> (LogBuffer, tracing::subscriber::DefaultGuard) {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

/// The fields of the one entry of a stream, as `(name, value)` pairs.
async fn only_entry(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Vec<(String, String)> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.into_iter().next().unwrap().1
}

/// An entry whose `r` is no count and whose `o` is no entry id is delivered under its own id
/// with no redeliveries (one warning per field). A negative acknowledgement and a close hand it
/// back the way the consumer read it — the retry copy carries `o` = that id and `r` = 1, then 2 —
/// so it keeps its id and counts up from there, with no further warning.
#[tokio::test]
async fn unreadable_redelivery_fields_are_set_aside_and_stay_so() {
    let prefix = format!("tgps-setaside-{}", std::process::id());
    let Some((backend, url)) = shared_backend(&prefix).await else {
        return;
    };
    let (logs, _guard) = collect_warnings();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let topic = Topic::new(Qos::Q1, "t", "setaside", "q").unwrap();
    let key = format!("{prefix}/{{q1/t/setaside/q}}");
    let retry_key = format!("{key}/retry/s");
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let id = xadd(
        &mut conn,
        &key,
        vec![
            ("d", b"body".to_vec()),
            ("o", b"garbage-id".to_vec()),
            ("r", b"lots".to_vec()),
            ("p:a", b"1".to_vec()),
        ],
    )
    .await;

    let m = consumer.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(m.payload().as_ref(), b"body");
    assert_eq!(m.id().to_string(), id);
    assert_eq!(m.redelivery_count(), 0);
    assert_eq!(m.property("a"), Some("1"));
    let lines = logs.lines();
    for field in ["o", "r"] {
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains(&format!("entry={id}"))
                    && l.contains(&format!("field={field}"))
                    && l.contains("delivering"))
                .count(),
            1,
            "{field}: {lines:#?}"
        );
    }

    consumer.negative_acknowledge(&m).await.unwrap();
    let copy = only_entry(&mut conn, &retry_key).await;
    assert!(copy.contains(&("o".to_owned(), id.clone())), "{copy:?}");
    assert!(copy.contains(&("r".to_owned(), "1".to_owned())), "{copy:?}");
    assert!(
        !copy.iter().any(|(_, v)| v == "garbage-id" || v == "lots"),
        "{copy:?}"
    );
    let m = consumer.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (m.id().to_string(), m.redelivery_count(), m.property("a")),
        (id.clone(), 1, Some("1"))
    );

    // closed without acknowledging: handed back, and a new consumer gets it once more
    consumer.close().await.unwrap();
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let m = consumer.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (
            m.payload().as_ref(),
            m.id().to_string(),
            m.redelivery_count()
        ),
        (&b"body"[..], id.clone(), 2)
    );
    consumer.acknowledge(&m).await.unwrap();
    assert_eq!(
        logs.lines().len(),
        lines.len(),
        "the copies draw no warning"
    );

    consumer.close().await.unwrap();
    backend.close().await.unwrap();
    delete_keys(&mut conn, &prefix).await;
}

/// A repeated property name — `p:k` twice in an entry another client wrote, or twice in a q0
/// frame — keeps the last value and draws a warning naming the name and the topic (the rule
/// of every backend); a repeated `d` keeps the last payload, with a warning naming the field.
/// The retry copy of a nack carries the repeats as they were, and reads the same.
#[tokio::test]
async fn repeated_property_names_keep_the_last_value() {
    let prefix = format!("tgps-repeated-{}", std::process::id());
    let Some((backend, url)) = shared_backend(&prefix).await else {
        return;
    };
    let (logs, _guard) = collect_warnings();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let topic = Topic::new(Qos::Q1, "t", "repeated", "q").unwrap();
    let key = format!("{prefix}/{{q1/t/repeated/q}}");
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let id = xadd(
        &mut conn,
        &key,
        vec![
            ("d", b"first".to_vec()),
            ("p:k", b"1".to_vec()),
            ("p:j", b"x".to_vec()),
            ("p:k", b"2".to_vec()),
            ("d", b"second".to_vec()),
        ],
    )
    .await;
    let check = |m: &tg_backend_api::Message| {
        assert_eq!(m.payload().as_ref(), b"second");
        assert_eq!(m.id().to_string(), id);
        assert_eq!(m.properties().len(), 2, "{:?}", m.properties());
        assert_eq!((m.property("k"), m.property("j")), (Some("2"), Some("x")));
    };
    let m = consumer.receive(Duration::from_secs(5)).await.unwrap();
    check(&m);
    let lines = logs.lines();
    let repeated: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("repeats property names"))
        .collect();
    assert_eq!(repeated.len(), 1, "{lines:#?}");
    assert!(
        repeated[0].contains("q1/t/repeated/q")
            && repeated[0].contains("\"k\"")
            && !repeated[0].contains("\"j\"")
            && repeated[0].contains(&id),
        "{}",
        repeated[0]
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("entry={id}")) && l.contains("field=d")),
        "{lines:#?}"
    );

    consumer.negative_acknowledge(&m).await.unwrap();
    let m = consumer.receive(Duration::from_secs(5)).await.unwrap();
    check(&m);
    assert_eq!(m.redelivery_count(), 1);
    consumer.acknowledge(&m).await.unwrap();
    consumer.close().await.unwrap();

    // a q0 frame another client published, with `a` twice
    let q0_topic = Topic::new(Qos::Q0, "t", "repeated", "q").unwrap();
    let q0 = backend
        .create_consumer(&q0_topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let mut frame = vec![1u8];
    frame.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
    frame.extend_from_slice(&3u32.to_be_bytes());
    for (k, v) in [("a", "1"), ("b", "x"), ("a", "2")] {
        frame.extend_from_slice(&(k.len() as u32).to_be_bytes());
        frame.extend_from_slice(k.as_bytes());
        frame.extend_from_slice(&(v.len() as u32).to_be_bytes());
        frame.extend_from_slice(v.as_bytes());
    }
    frame.push(0);
    frame.extend_from_slice(b"q0 body");
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("{prefix}/{{q0/t/repeated/q}}"))
        .arg(frame)
        .query_async(&mut conn)
        .await
        .unwrap();
    let m = q0.receive(Duration::from_secs(5)).await.unwrap();
    assert_eq!(m.payload().as_ref(), b"q0 body");
    assert_eq!((m.property("a"), m.property("b")), (Some("2"), Some("x")));
    let lines = logs.lines();
    assert!(
        lines.iter().any(|l| l.contains("repeats property names")
            && l.contains("q0/t/repeated/q")
            && l.contains("\"a\"")),
        "{lines:#?}"
    );
    q0.close().await.unwrap();
    backend.close().await.unwrap();
    delete_keys(&mut conn, &prefix).await;
}

/// The native batch paths: `send_batch` of more than one pipeline's worth (1,024) with
/// properties and keys — receipts in order, every entry stored; `receive_batch` never above
/// `max`, in order; `negative_acknowledge_batch` over messages of the topic stream and of the
/// retry stream at once; `acknowledge_batch` over both streams leaves nothing pending and the
/// retry stream empty (its copies deleted, as a single acknowledgement does). q2 batches keep
/// de-duplication (within the batch too), q0 batches their in-order sequence numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_batch_paths() {
    let prefix = format!("tgps-natbatch-{}", std::process::id());
    let Some((backend, url)) = shared_backend(&prefix).await else {
        return;
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let topic = Topic::new(Qos::Q1, "t", "natbatch", "q").unwrap();
    let key = format!("{prefix}/{{q1/t/natbatch/q}}");
    let retry_key = format!("{key}/retry/s");
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    let n = 2500;
    let batch: Vec<OutboundMessage> = (0..n)
        .map(|i| {
            let mut m = OutboundMessage::new(format!("m{i}"));
            if i % 3 == 0 {
                m = m.property("i", i.to_string());
            }
            if i % 5 == 0 {
                m = m.key(format!("k{i}"));
            }
            m
        })
        .collect();
    let receipts = producer.send_batch(batch).await.unwrap();
    assert_eq!(receipts.len(), n);
    let mut ids = Vec::with_capacity(n);
    for r in receipts {
        ids.push(r.await.unwrap().to_string());
    }
    let len: usize = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, n);

    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let b = consumer
            .receive_batch(100, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!b.is_empty() && b.len() <= 100, "a batch of {}", b.len());
        got.extend(b);
    }
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.payload().as_ref(), format!("m{i}").as_bytes(), "order");
        assert_eq!(m.id().to_string(), ids[i]);
        assert_eq!(
            m.property("i").map(str::to_owned),
            (i % 3 == 0).then(|| i.to_string())
        );
        assert_eq!(
            m.key().map(str::to_owned),
            (i % 5 == 0).then(|| format!("k{i}"))
        );
    }
    assert!(consumer
        .receive_batch(10, Duration::from_millis(200))
        .await
        .unwrap()
        .is_empty());

    // nack 0..10 (topic stream); they come back from the retry stream
    let (first, rest) = got.split_at(10);
    consumer.negative_acknowledge_batch(first).await.unwrap();
    let again = consumer
        .receive_batch(100, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.len(), 10);
    for (m, orig) in again.iter().zip(first) {
        assert_eq!((m.id(), m.redelivery_count()), (orig.id(), 1));
    }
    // one nack batch over both streams: 5 retry copies and 5 topic-stream messages
    let mixed: Vec<_> = again[..5].iter().chain(&rest[..5]).cloned().collect();
    consumer.negative_acknowledge_batch(&mixed).await.unwrap();
    // (the two streams' scripts run one after the other: the copies may come in two reads)
    let mut third = Vec::new();
    while third.len() < 10 {
        let b = consumer
            .receive_batch(100, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!b.is_empty(), "{} of 10 came back", third.len());
        third.extend(b);
    }
    assert_eq!(third.len(), 10);
    let mut counts: Vec<(String, u32)> = third
        .iter()
        .map(|m| (m.id().to_string(), m.redelivery_count()))
        .collect();
    counts.sort();
    let mut expected: Vec<(String, u32)> = first[..5]
        .iter()
        .map(|m| (m.id().to_string(), 2))
        .chain(rest[..5].iter().map(|m| (m.id().to_string(), 1)))
        .collect();
    expected.sort();
    assert_eq!(counts, expected);

    // acknowledge everything outstanding at once: both streams
    let outstanding: Vec<_> = again[5..]
        .iter()
        .chain(&third)
        .chain(&rest[5..])
        .cloned()
        .collect();
    consumer.acknowledge_batch(&outstanding).await.unwrap();
    for k in [&key, &retry_key] {
        let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(k)
            .arg("s")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(pending.0, 0, "{k}: nothing pending");
    }
    let retry_len: usize = redis::cmd("XLEN")
        .arg(&retry_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(retry_len, 0, "acknowledged retry copies are deleted");
    consumer.close().await.unwrap();

    // q2: a duplicate within the batch is stored once, both receipts name the first copy
    let q2 = topic.with_qos(Qos::Q2);
    let p2 = backend
        .create_producer(&q2, Default::default())
        .await
        .unwrap();
    let receipts = p2
        .send_batch(vec![
            OutboundMessage::new("a").property(tg_backend_api::DEDUP_ID_PROPERTY, "same"),
            OutboundMessage::new("b"),
            OutboundMessage::new("a again").property(tg_backend_api::DEDUP_ID_PROPERTY, "same"),
        ])
        .await
        .unwrap();
    let mut q2_ids = Vec::new();
    for r in receipts {
        q2_ids.push(r.await.unwrap().to_string());
    }
    assert_eq!(q2_ids[0], q2_ids[2]);
    assert_ne!(q2_ids[0], q2_ids[1]);
    let len: usize = redis::cmd("XLEN")
        .arg(format!("{prefix}/{{q2/t/natbatch/q}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 2);

    // q0: receipts are in-order sequence numbers across two batches; a batch receive gets them
    let q0 = topic.with_qos(Qos::Q0);
    let c0 = backend
        .create_consumer(&q0, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let p0 = backend
        .create_producer(&q0, Default::default())
        .await
        .unwrap();
    let mut receipts = p0
        .send_batch(
            (0..1500)
                .map(|i| OutboundMessage::new(format!("p{i}")))
                .collect(),
        )
        .await
        .unwrap();
    receipts.extend(
        p0.send_batch(
            (1500..2000)
                .map(|i| OutboundMessage::new(format!("p{i}")))
                .collect(),
        )
        .await
        .unwrap(),
    );
    for (i, r) in receipts.into_iter().enumerate() {
        assert_eq!(r.await.unwrap().as_u64(), Some(i as u64));
    }
    let mut got = Vec::new();
    while got.len() < 2000 {
        let b = c0.receive_batch(512, Duration::from_secs(5)).await.unwrap();
        assert!(!b.is_empty() && b.len() <= 512);
        got.extend(b);
    }
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.payload().as_ref(), format!("p{i}").as_bytes());
    }
    c0.acknowledge_batch(&got).await.unwrap();
    c0.close().await.unwrap();
    backend.close().await.unwrap();
    delete_keys(&mut conn, &prefix).await;
}

/// Acknowledgements while the reader waits for room in a full buffer, or is about to read
/// because a receive made room, complete promptly — well within one blocking read (`block` is
/// 10 s here) — whether or not the application receives anything after: none waits for a read
/// that is not coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_do_not_wait_for_a_read_that_is_not_coming() {
    let prefix = format!("tgps-ackroom-{}", std::process::id());
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| RedisConfig::DEFAULT_URL.to_owned());
    let config = RedisConfig::from_url(&url)
        .expect("REDIS_URL parses")
        .prefix(&prefix)
        .batch(16)
        .block(Duration::from_secs(10));
    let backend = match RedisBackend::connect(config).await {
        Ok(b) => b,
        Err(e) => {
            skip(&format!("no Redis at {url}: {e}"));
            return;
        }
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let topic = Topic::new(Qos::Q1, "t", "ackroom", "q").unwrap();
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    let receipts = producer
        .send_batch(
            (0..200)
                .map(|i| OutboundMessage::new(format!("m{i}")))
                .collect(),
        )
        .await
        .unwrap();
    for r in receipts {
        r.await.unwrap();
    }
    let prompt = Duration::from_secs(3);
    // the buffer fills (about 3 × 16) and the reader waits for room; take one, acknowledge it
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = consumer.receive(Duration::from_secs(5)).await.unwrap();
    tokio::time::timeout(prompt, consumer.acknowledge(&first))
        .await
        .expect("an acknowledgement while the reader waits for room")
        .unwrap();
    // a batch receive makes room (the reader reads next): acknowledge it, receive nothing more
    let batch = consumer
        .receive_batch(64, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(!batch.is_empty());
    tokio::time::timeout(prompt, consumer.acknowledge_batch(&batch))
        .await
        .expect("a batch acknowledgement after making room")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = consumer.receive(Duration::from_secs(5)).await.unwrap();
    tokio::time::timeout(prompt, consumer.acknowledge(&late))
        .await
        .expect("an acknowledgement after the reader refilled the buffer")
        .unwrap();
    consumer.close().await.unwrap();
    backend.close().await.unwrap();
    delete_keys(&mut conn, &prefix).await;
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

/// A backend connected to the local Redis through the test proxy, with `keep_alive` and short
/// connect and send timeouts; `None` (after saying so) when there is no Redis.
async fn behind_a_proxy(keep_alive: Duration) -> Option<(Proxy, RedisBackend)> {
    let broker = std::net::SocketAddr::from(([127, 0, 0, 1], 6379));
    if std::net::TcpStream::connect_timeout(&broker, Duration::from_secs(1)).is_err() {
        skip(&format!("no Redis on {broker}"));
        return None;
    }
    let proxy = Proxy::start(broker).await.expect("proxy");
    let config = RedisConfig::from_url(&format!("redis://{}", proxy.addr()))
        .unwrap()
        .keep_alive(keep_alive)
        .connect_timeout(Duration::from_secs(1))
        .send_timeout(Duration::from_secs(5));
    let backend = RedisBackend::connect(config).await.unwrap();
    Some((proxy, backend))
}

/// An idle backend notices a silent network on its shared connection by the backend's own
/// keep-alive: with no command of its own in flight, the `PING` every `keep_alive` goes
/// unanswered, and within two keep-alives the connection is closed; once traffic passes again the
/// next command opens a new one. Through the test proxy, whose host acknowledges every segment,
/// so TCP keep-alive cannot be what noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_backend_checks_its_shared_connection() {
    let keep_alive = Duration::from_secs(1);
    let Some((proxy, backend)) = behind_a_proxy(keep_alive).await else {
        return;
    };
    // (the connect probe's own connection is closed by now: only the shared one is open)
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.set(Mode::BlackHole);
    let silent = Instant::now();
    let bound = 2 * keep_alive + Duration::from_secs(1);
    let closed = || {
        proxy
            .caught()
            .iter()
            .filter_map(|c| c.client_closed)
            .map(|t| t.saturating_duration_since(silent))
            .min()
    };
    while silent.elapsed() < bound && closed().is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let caught = proxy.caught();
    assert!(!caught.is_empty(), "the black hole caught no connection");
    assert!(
        closed().is_some_and(|d| d <= bound),
        "the idle shared connection was not closed within {bound:?}: {caught:?}"
    );
    eprintln!(
        "idle backend: closed its shared connection {:?} into the silence",
        closed()
    );

    proxy.set(Mode::Pass);
    let t = Topic::new(Qos::Q0, "specific", "idle-keepalive", "ping").unwrap();
    let producer = backend
        .create_producer(&t, Default::default())
        .await
        .unwrap();
    let sent = Instant::now();
    producer
        .send(OutboundMessage::new("after the silence"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        sent.elapsed() < keep_alive,
        "the first send after the silence took {:?}: it met the dead connection",
        sent.elapsed()
    );
    backend.close().await.unwrap();
}

/// A q0 consumer's pub/sub connection is checked like the shared one: black-holed, it is closed
/// within twice `keep_alive` (a `PING` unanswered) and replaced, and the consumer receives
/// again once traffic passes. Without the check it stays open, its consumer receiving nothing,
/// for as long as the silence lasts.
#[tokio::test]
async fn a_q0_consumer_checks_its_pub_sub_connection() {
    let keep_alive = Duration::from_secs(1);
    let Some((proxy, backend)) = behind_a_proxy(keep_alive).await else {
        return;
    };
    let namespace = format!("q0-keepalive-{}", std::process::id());
    let t = Topic::new(Qos::Q0, "specific", &namespace, "ping").unwrap();
    let consumer = backend
        .create_consumer(&t, ConsumerOptions::new("listener"))
        .await
        .unwrap();
    // The sender goes straight to the server, past the proxy.
    let direct = RedisBackend::connect(RedisConfig::from_url("redis://127.0.0.1:6379").unwrap())
        .await
        .unwrap();
    let producer = direct
        .create_producer(&t, Default::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.set(Mode::BlackHole);
    let silent = Instant::now();
    let bound = 2 * keep_alive + Duration::from_secs(1);
    let all_closed = || {
        let caught = proxy.caught();
        caught.len() >= 2 && caught.iter().all(|c| c.client_closed.is_some())
    };
    while silent.elapsed() < bound && !all_closed() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let caught = proxy.caught();
    // the shared connection and the pub/sub one
    assert!(caught.len() >= 2, "the black hole caught {caught:?}");
    assert!(
        all_closed(),
        "not every black-holed connection was closed within {bound:?} (the pub/sub one is \
         checked too): {caught:?}"
    );
    let latest = caught
        .iter()
        .filter_map(|c| c.client_closed)
        .map(|t| t.saturating_duration_since(silent))
        .max();
    eprintln!("q0 consumer: every connection closed into the silence by {latest:?}");

    proxy.set(Mode::Pass);
    let restored = Instant::now();
    let got = loop {
        assert!(
            restored.elapsed() < Duration::from_secs(10),
            "the q0 consumer received nothing within 10 s of the traffic passing again"
        );
        producer
            .send(OutboundMessage::new("after the silence"))
            .await
            .unwrap()
            .await
            .unwrap();
        match consumer.receive(Duration::from_millis(100)).await {
            Ok(m) => break m,
            Err(e) if e.kind() == ErrorKind::Timeout => continue,
            Err(e) => panic!("receive: {e}"),
        }
    };
    assert_eq!(got.payload().as_ref(), b"after the silence");
    eprintln!(
        "q0 consumer: receiving again {:?} after the traffic passed",
        restored.elapsed()
    );
    consumer.close().await.unwrap();
    backend.close().await.unwrap();
    direct.close().await.unwrap();
}
