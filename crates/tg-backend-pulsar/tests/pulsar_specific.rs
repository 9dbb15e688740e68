//! Pulsar-specific behaviour beyond the conformance suite: configuration from the environment,
//! batching and `flush`, whole-batch acknowledgement, large messages in a batching producer,
//! reconnection after a broker restart, and the pulsar-lite defects the suite does not reach.
//!
//! They need a broker: `PULSAR_URL` (set by `cargo xtask test pulsar`). The restart test also
//! needs `PULSAR_LITE_BIN` to start a broker of its own. Without them the tests say why and pass,
//! except under `CI=true`, where that is a failure.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tg_backend_api::{
    Backend, Consumer, ConsumerOptions, ConsumerType, ErrorKind, InitialPosition, OutboundMessage,
    ProducerOptions, Qos, Topic,
};
use tg_backend_pulsar::{PulsarBackend, PulsarConfig};
use tg_testkit::pulsar_relay::Relay;
use tg_testkit::servers::OwnServer;
use tg_testkit::support::{free_port, skip};

const EXPECT: Duration = Duration::from_secs(15);

/// The broker's configuration when `PULSAR_URL` names a reachable one.
fn config() -> Option<PulsarConfig> {
    let Ok(url) = std::env::var("PULSAR_URL") else {
        skip("PULSAR_URL is not set (run `cargo xtask test pulsar`)");
        return None;
    };
    let config = PulsarConfig::from_url(&url).expect("PULSAR_URL parses");
    let reachable = format!("{}:{}", config.host, config.port)
        .parse::<SocketAddr>()
        .ok()
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
    if !reachable {
        skip(&format!("no Pulsar broker answers at {url}"));
        return None;
    }
    Some(config)
}

fn topic(qos: Qos, name: &str) -> Topic {
    Topic::new(
        qos,
        "tg-specific",
        &format!("run-{}", std::process::id()),
        name,
    )
    .expect("valid topic")
}

fn text(m: &tg_backend_api::Message) -> String {
    String::from_utf8_lossy(m.payload()).into_owned()
}

#[test]
fn config_from_the_python_frameworks_variables() {
    let vars = [
        ("PULSAR_HOST", "pulsar://pulsar:6650"),
        ("PULSAR_API_KEY", "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.sig"),
        ("PULSAR_LISTENER", "internal"),
    ];
    let c = PulsarConfig::from_lookup(|k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| (*v).to_owned())
    })
    .unwrap();
    assert_eq!(c.service_url(), "pulsar://pulsar:6650");
    assert_eq!(c.listener.as_deref(), Some("internal"));
    let printed = format!("{c:?}");
    assert!(!printed.contains("c2VjcmV0"), "{printed}");
    assert!(printed.contains("***"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_never_shows_in_errors() {
    // nothing listens on this port: the error names the server, never the token
    let port = free_port();
    let config = PulsarConfig::from_url(&format!("pulsar://127.0.0.1:{port}"))
        .unwrap()
        .token("tok-very-secret")
        .connect_timeout(Duration::from_millis(500));
    let err = PulsarBackend::connect(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert!(!format!("{err} {err:?}").contains("very-secret"), "{err:?}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_is_on_by_default_and_flush_sends_the_batch() {
    let Some(config) = config() else { return };
    // a long batch delay: only `flush` (or a full batch) sends
    let backend = PulsarBackend::connect(config.batch_delay(Duration::from_secs(30)))
        .await
        .unwrap();
    let t = topic(Qos::Q1, "batching");
    let consumer = backend
        .create_consumer(&t, ConsumerOptions::new("b"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&t, Default::default())
        .await
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..100 {
        receipts.push(
            producer
                .send(OutboundMessage::new(format!("m{i}")))
                .await
                .unwrap(),
        );
    }
    // nothing went out yet
    assert_eq!(
        consumer
            .receive(Duration::from_millis(300))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Timeout
    );
    tokio::time::timeout(Duration::from_secs(10), producer.flush())
        .await
        .expect("flush returns")
        .unwrap();
    let mut ids = Vec::new();
    for r in receipts {
        // flush returned: every receipt is already resolved
        let id = tokio::time::timeout(Duration::from_millis(50), r)
            .await
            .expect("receipt resolved by flush")
            .unwrap();
        ids.push(id.to_string());
    }
    // one broker entry, batch indexes 0..99: `ledger:entry:partition:index`
    let entries: HashSet<_> = ids
        .iter()
        .map(|id| id.rsplit_once(':').unwrap().0.to_owned())
        .collect();
    assert_eq!(entries.len(), 1, "{ids:?}");
    assert!(ids[99].ends_with(":99"), "{}", ids[99]);
    for i in 0..100 {
        let m = consumer.receive(EXPECT).await.unwrap();
        assert_eq!(text(&m), format!("m{i}"));
        consumer.acknowledge(&m).await.unwrap();
    }
    backend.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_acknowledged_when_all_its_messages_are() {
    let Some(config) = config() else { return };
    let backend = PulsarBackend::connect(config).await.unwrap();
    let t = topic(Qos::Q1, "batch-acks");
    let first = backend
        .create_consumer(&t, ConsumerOptions::new("half"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&t, Default::default())
        .await
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..10 {
        receipts.push(
            producer
                .send(OutboundMessage::new(format!("m{i}")))
                .await
                .unwrap(),
        );
    }
    producer.flush().await.unwrap();
    for r in receipts {
        r.await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(first.receive(EXPECT).await.unwrap());
    }
    // acknowledge half, nack one of the other half, then close without the rest
    for m in &got[..5] {
        first.acknowledge(m).await.unwrap();
    }
    first.negative_acknowledge(&got[5]).await.unwrap();
    let again = first.receive(EXPECT).await.unwrap();
    let redelivered: String = text(&again);
    assert!(
        ["m5", "m6", "m7", "m8", "m9"].contains(&redelivered.as_str()),
        "after a nack the acknowledged part of the batch came again: {redelivered}"
    );
    first.close().await.unwrap();
    let second = backend
        .create_consumer(&t, ConsumerOptions::new("half"))
        .await
        .unwrap();
    let mut rest = HashSet::new();
    while let Ok(m) = second.receive(Duration::from_secs(2)).await {
        rest.insert(text(&m));
        second.acknowledge(&m).await.unwrap();
    }
    // Pulsar acknowledges a batch as one entry: the consumer sent no ack for it since part of it
    // was unacknowledged, so the whole batch comes back (at least once), nothing is lost
    let unacked: HashSet<String> = (5..10).map(|i| format!("m{i}")).collect();
    assert!(
        rest.is_superset(&unacked),
        "lost part of the batch: got {rest:?}"
    );
    second.close().await.unwrap();
    let third = backend
        .create_consumer(&t, ConsumerOptions::new("half"))
        .await
        .unwrap();
    assert_eq!(
        third
            .receive(Duration::from_millis(700))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Timeout,
        "the whole batch was acknowledged"
    );
    backend.close().await.unwrap();
}

/// Counts the consumer's cumulative acknowledgements (its trace event `cumulative_up_to`) on the
/// thread it is installed on.
#[derive(Clone, Default)]
struct CumulativeAcks(Arc<AtomicUsize>);

impl CumulativeAcks {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CumulativeAcks {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event
            .metadata()
            .fields()
            .field("cumulative_up_to")
            .is_some()
        {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Receives batches until `n` messages came.
async fn receive_n(consumer: &dyn Consumer, n: usize) -> Vec<tg_backend_api::Message> {
    let mut got = Vec::new();
    while got.len() < n {
        let batch = consumer.receive_batch(n, EXPECT).await.unwrap();
        assert!(!batch.is_empty(), "{} of {n} came", got.len());
        got.extend(batch);
    }
    got
}

/// On an Exclusive subscription `acknowledge_batch` acknowledges cumulatively where that takes
/// exactly the batch and what was acknowledged before, one by one where an earlier message is
/// still open; a new consumer then gets exactly what was not acknowledged. The current-thread
/// runtime keeps the consumer's trace events on the thread the counting layer watches.
#[tokio::test(flavor = "current_thread")]
async fn batch_acknowledgement_is_cumulative_only_where_exact() {
    use tracing_subscriber::layer::SubscriberExt;
    let Some(config) = config() else { return };
    let cumulative = CumulativeAcks::default();
    let _watch =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(cumulative.clone()));
    let backend = PulsarBackend::connect(config).await.unwrap();
    let t = topic(Qos::Q1, "cumulative");
    let options = || ConsumerOptions::new("solo").consumer_type(ConsumerType::Exclusive);
    let first = backend.create_consumer(&t, options()).await.unwrap();
    let producer = backend
        .create_producer(&t, Default::default())
        .await
        .unwrap();
    // each accepted before the next is sent: one broker entry each
    for i in 0..8 {
        producer
            .send(OutboundMessage::new(i.to_string()))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let got = receive_n(&*first, 8).await;
    let texts: Vec<String> = got.iter().map(text).collect();
    assert_eq!(texts, ["0", "1", "2", "3", "4", "5", "6", "7"]);
    first.acknowledge_batch(&got[..3]).await.unwrap();
    assert_eq!(cumulative.count(), 1, "0..=2 is everything up to 2");
    first.acknowledge_batch(&got[4..6]).await.unwrap();
    assert_eq!(cumulative.count(), 1, "3 is open below 4 and 5");
    first.close().await.unwrap();

    let second = backend.create_consumer(&t, options()).await.unwrap();
    let again = receive_n(&*second, 3).await;
    let texts: Vec<String> = again.iter().map(text).collect();
    assert_eq!(texts, ["3", "6", "7"], "what the first consumer left open");
    second.acknowledge_batch(&again).await.unwrap();
    assert_eq!(cumulative.count(), 2, "3, 6 and 7 is everything open");

    // a producer's batch is one entry: acknowledged in two parts, whole by the second
    let batch = (0..5)
        .map(|i| OutboundMessage::new(format!("b{i}")))
        .collect();
    for receipt in producer.send_batch(batch).await.unwrap() {
        receipt.await.unwrap();
    }
    let parts = receive_n(&*second, 5).await;
    second.acknowledge_batch(&parts[..2]).await.unwrap();
    second.acknowledge_batch(&parts[2..]).await.unwrap();
    assert!(
        cumulative.count() >= 3,
        "the batch's entry (entries) completed with nothing open below"
    );
    second.close().await.unwrap();
    let third = backend.create_consumer(&t, options()).await.unwrap();
    let left = third.receive_batch(10, Duration::from_millis(700)).await;
    assert_eq!(
        left.unwrap().iter().map(text).collect::<Vec<_>>(),
        Vec::<String>::new(),
        "everything was acknowledged"
    );
    backend.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "flaky: once in three CI runs (2026-11-23 20:43 UTC) the small message sent after the \
            5 MiB one was not received within 15 s (all receipts had resolved); cause not found \
            yet; run with --ignored"]
async fn a_message_near_the_limit_travels_alone_in_a_batching_producer() {
    let Some(config) = config() else { return };
    let backend = PulsarBackend::connect(config).await.unwrap();
    let max = backend.capabilities(Qos::Q1).max_payload;
    let t = topic(Qos::Q1, "big-in-batch");
    let consumer = backend
        .create_consumer(&t, ConsumerOptions::new("big"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&t, Default::default())
        .await
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..50 {
        // 50 × 2 KiB wait in the batch when the big one comes
        let mut p = vec![b'.'; 2048];
        p[..3].copy_from_slice(format!("{i:03}").as_bytes());
        receipts.push(producer.send(OutboundMessage::new(p)).await.unwrap());
    }
    receipts.push(
        producer
            .send(OutboundMessage::new(vec![b'B'; max]))
            .await
            .unwrap(),
    );
    receipts.push(producer.send(OutboundMessage::new("after")).await.unwrap());
    for r in receipts {
        r.await.unwrap();
    }
    for i in 0..50 {
        let m = consumer.receive(EXPECT).await.unwrap();
        assert_eq!(&m.payload()[..3], format!("{i:03}").as_bytes());
        consumer.acknowledge(&m).await.unwrap();
    }
    let big = consumer.receive(EXPECT).await.unwrap();
    assert_eq!(big.payload().len(), max);
    consumer.acknowledge(&big).await.unwrap();
    assert_eq!(text(&consumer.receive(EXPECT).await.unwrap()), "after");
    backend.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_publish_times_come_through() {
    let Some(config) = config() else { return };
    let backend = PulsarBackend::connect(config).await.unwrap();
    let t = topic(Qos::Q1, "keys");
    let consumer = backend
        .create_consumer(
            &t,
            ConsumerOptions::new("k").initial_position(InitialPosition::Earliest),
        )
        .await
        .unwrap();
    let producer = backend
        .create_producer(&t, Default::default())
        .await
        .unwrap();
    producer
        .send(OutboundMessage::new("x").key("user-7"))
        .await
        .unwrap()
        .await
        .unwrap();
    let m = consumer.receive(EXPECT).await.unwrap();
    assert_eq!(m.key(), Some("user-7"));
    let age = m.publish_time().unwrap().elapsed().unwrap_or_default();
    assert!(age < Duration::from_secs(60), "{age:?}");
    consumer.acknowledge(&m).await.unwrap();
    backend.close().await.unwrap();
}

/// pulsar-lite 0.2.0 re-dispatches to an Exclusive or Failover subscription while earlier
/// dispatches are still in flight when a producer sends a burst of unbatched messages: measured
/// here, 2,000 messages came as 3,112 deliveries (Exclusive) and 3,721 (Failover), over 1,000 of
/// them out of order. Shared subscriptions, and every subscription type with batching on (the
/// default), are exact. Run with `--ignored` to check a new broker version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "pulsar-lite 0.2.0 defect: unbatched bursts to Exclusive/Failover subscriptions are duplicated and reordered"]
async fn unbatched_burst_to_exclusive_subscription_is_exact() {
    let Some(config) = config() else { return };
    let backend = PulsarBackend::connect(config).await.unwrap();
    for ty in [ConsumerType::Exclusive, ConsumerType::Failover] {
        let t = topic(Qos::Q1, &format!("unbatched-burst-{ty}"));
        let consumer = backend
            .create_consumer(&t, ConsumerOptions::new("solo").consumer_type(ty))
            .await
            .unwrap();
        let producer = backend
            .create_producer(&t, ProducerOptions::new().batching(false))
            .await
            .unwrap();
        let mut receipts = Vec::new();
        for i in 0..2000 {
            receipts.push(
                producer
                    .send(OutboundMessage::new(i.to_string()))
                    .await
                    .unwrap(),
            );
        }
        for r in receipts {
            r.await.unwrap();
        }
        let mut got = Vec::new();
        while let Ok(m) = consumer.receive(Duration::from_secs(2)).await {
            consumer.acknowledge(&m).await.unwrap();
            got.push(text(&m).parse::<usize>().unwrap());
        }
        let expected: Vec<usize> = (0..2000).collect();
        assert_eq!(
            got.len(),
            2000,
            "{ty}: {} deliveries of 2000 messages",
            got.len()
        );
        assert_eq!(got, expected, "{ty}: out of order");
    }
}

/// pulsar-lite 0.2.0 answers a second Exclusive consumer by dropping the whole connection
/// instead of refusing the subscribe with `ConsumerBusy`; the suite's
/// `exclusive_refuses_second_consumer` is listed as a known defect for that. On q0 the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "pulsar-lite 0.2.0 defect: a refused Exclusive consumer drops the connection instead of ConsumerBusy"]
async fn second_exclusive_q0_consumer_is_busy() {
    let Some(config) = config() else { return };
    let backend = PulsarBackend::connect(config).await.unwrap();
    let t = topic(Qos::Q0, "exclusive-q0");
    let opts = ConsumerOptions::new("solo").consumer_type(ConsumerType::Exclusive);
    let _first = backend.create_consumer(&t, opts.clone()).await.unwrap();
    let err = backend.create_consumer(&t, opts).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConsumerBusy, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_and_consumers_resume_after_a_broker_restart() {
    let Some(binary) = std::env::var_os("PULSAR_LITE_BIN").map(PathBuf::from) else {
        skip("PULSAR_LITE_BIN is not set (run `cargo xtask test pulsar`)");
        return;
    };
    let Some(mut broker) = OwnServer::pulsar_lite(&binary) else {
        return;
    };
    broker.start();
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], broker.port()))).unwrap();
    let config = PulsarConfig::from_url(&relay.url())
        .unwrap()
        .reconnect_max(Duration::from_millis(500));
    let backend = PulsarBackend::connect(config).await.unwrap();
    let t = topic(Qos::Q1, "restart");
    let consumer = backend
        .create_consumer(&t, ConsumerOptions::new("survivor"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&t, Default::default())
        .await
        .unwrap();
    producer
        .send(OutboundMessage::new("before"))
        .await
        .unwrap()
        .await
        .unwrap();
    let m = consumer.receive(EXPECT).await.unwrap();
    assert_eq!(text(&m), "before");
    consumer.acknowledge(&m).await.unwrap();
    // a message sent and not yet consumed survives the restart (persistent topic)
    producer
        .send(OutboundMessage::new("kept"))
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    broker.stop();
    relay.cut_connections();
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.start();

    // the producer reconnects by itself: a send after the restart is accepted
    let receipt = producer.send(OutboundMessage::new("after")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(40), receipt)
        .await
        .expect("send receipt after the restart")
        .unwrap();
    let mut got = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while got.len() < 2 && Instant::now() < deadline {
        match consumer.receive(Duration::from_secs(1)).await {
            Ok(m) => {
                consumer.acknowledge(&m).await.unwrap();
                got.insert(text(&m));
            }
            Err(e) if e.kind() == ErrorKind::Timeout => {}
            Err(e) => panic!("receive after the restart: {e}"),
        }
    }
    assert!(
        got.contains("after"),
        "the consumer did not resume: {got:?}"
    );
    assert!(
        got.contains("kept"),
        "the unconsumed message was lost: {got:?}"
    );
    backend.close().await.unwrap();
}
