//! Kafka-specific behaviour the conformance suite does not cover: the commit rule, a member
//! killed mid-batch, the framework's per-consumer groups, partitioned topics, unsubscribe,
//! headers and keys on the wire, a broker restart.
//!
//! Needs `KAFKA_URL` (and `TANSU_BIN` for the restart), set by `cargo xtask test kafka`; without
//! them the tests say why and pass, except under `CI=true`.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tg_backend_api::{
    Backend, Consumer, ConsumerOptions, ConsumerType, ErrorKind, InitialPosition, Message,
    OutboundMessage, Topic,
};
use tg_backend_kafka::{KafkaBackend, KafkaConfig};

use support::{backend, own_tansu, unique, url};

const EXPECT: Duration = Duration::from_secs(20);

fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.payload()).into_owned()
}

fn topic(qos: &str, namespace: &str, queue: &str) -> Topic {
    Topic::parse(&format!("{qos}/{}/{namespace}/{queue}", unique("kt"))).unwrap()
}

async fn send_all(backend: &KafkaBackend, topic: &Topic, payloads: &[String]) {
    let producer = backend
        .create_producer(topic, Default::default())
        .await
        .unwrap();
    for p in payloads {
        producer
            .send(OutboundMessage::new(p.clone()))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
}

async fn receive_n(consumer: &dyn Consumer, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    while out.len() < n {
        match consumer.receive(EXPECT).await {
            Ok(m) => out.push(m),
            Err(e) => panic!("after {} of {n} messages: {e}", out.len()),
        }
    }
    out
}

async fn expect_nothing(consumer: &dyn Consumer, wait: Duration) {
    match consumer.receive(wait).await {
        Ok(m) => panic!("expected nothing, got {:?}", text(&m)),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Timeout, "{e}"),
    }
}

fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Handlers acknowledge out of order; the group's commit stops at the first message still
/// unacknowledged, so a consumer that takes over after a close gets that message and everything
/// after it, and nothing before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_never_commit_past_a_gap() {
    let Some(url) = url() else { return };
    let backend = backend(&url, "commit_interval=10ms").await;
    let topic = topic("q1", "flow", "gap");
    let first = backend
        .create_consumer(&topic, ConsumerOptions::new("gap"))
        .await
        .unwrap();
    send_all(&backend, &topic, &payloads("m", 6)).await;
    let got = receive_n(&*first, 6).await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), payloads("m", 6));
    for i in [1, 3, 4, 5, 0] {
        first.acknowledge(&got[i]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.close().await.unwrap();
    let second = backend
        .create_consumer(&topic, ConsumerOptions::new("gap"))
        .await
        .unwrap();
    let again = receive_n(&*second, 4).await;
    assert_eq!(
        again.iter().map(text).collect::<Vec<_>>(),
        ["m2", "m3", "m4", "m5"],
        "the commit passed the unacknowledged m2, or stopped before it"
    );
    for m in &again {
        second.acknowledge(m).await.unwrap();
    }
    second.close().await.unwrap();
    backend.close().await.unwrap();
}

/// A nacked message comes back to the same consumer with its count raised, and holds the commit
/// back until it is acknowledged: closing without acknowledging it hands it to the next consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_message_comes_back_and_holds_the_commit() {
    let Some(url) = url() else { return };
    let backend = backend(&url, "commit_interval=10ms").await;
    let topic = topic("q1", "flow", "nack");
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("nack"))
        .await
        .unwrap();
    send_all(&backend, &topic, &payloads("n", 2)).await;
    let got = receive_n(&*consumer, 2).await;
    consumer.negative_acknowledge(&got[0]).await.unwrap();
    consumer.acknowledge(&got[1]).await.unwrap();
    let again = consumer.receive(EXPECT).await.unwrap();
    assert_eq!(text(&again), "n0");
    assert_eq!(again.redelivery_count(), 1);
    assert_eq!(again.id(), got[0].id(), "the same record");
    consumer.negative_acknowledge(&again).await.unwrap();
    let third = consumer.receive(EXPECT).await.unwrap();
    assert_eq!((text(&third).as_str(), third.redelivery_count()), ("n0", 2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    consumer.close().await.unwrap();
    let next = backend
        .create_consumer(&topic, ConsumerOptions::new("nack"))
        .await
        .unwrap();
    let redelivered = receive_n(&*next, 2).await;
    assert_eq!(
        redelivered.iter().map(text).collect::<Vec<_>>(),
        ["n0", "n1"]
    );
    next.close().await.unwrap();
    backend.close().await.unwrap();
}

/// The child of `killed_member_hands_its_unacknowledged_messages_over`: joins the group, takes
/// all ten messages, acknowledges some, says READY and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by killed_member_hands_its_unacknowledged_messages_over in a child process"]
async fn killed_member_child() {
    let url = std::env::var("KAFKA_URL").expect("KAFKA_URL");
    let queue = std::env::var("KILLED_TOPIC").expect("KILLED_TOPIC");
    let group = std::env::var("KILLED_GROUP").expect("KILLED_GROUP");
    let backend = backend(&url, "session_timeout=6s&commit_interval=10ms").await;
    let topic = Topic::parse(&queue).unwrap();
    let consumer = backend
        .create_consumer(
            &topic,
            ConsumerOptions::new(group).initial_position(InitialPosition::Earliest),
        )
        .await
        .unwrap();
    let got = receive_n(&*consumer, 10).await;
    for i in [0, 1, 2, 3, 4, 6] {
        consumer.acknowledge(&got[i]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("READY");
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// A member killed mid-batch (no commit, no LeaveGroup): once the group notices (session
/// timeout), another member gets the partition and, from the committed offset, the messages the
/// dead one had not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_hands_its_unacknowledged_messages_over() {
    let Some(url) = url() else { return };
    let backend = backend(&url, "session_timeout=6s&join_timeout=60s").await;
    let topic = topic("q1", "flow", "killed");
    let group = unique("killed");
    send_all(&backend, &topic, &payloads("k", 10)).await;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "killed_member_child", "--ignored", "--nocapture"])
        .env("KAFKA_URL", &url)
        .env("KILLED_TOPIC", topic.as_str())
        .env("KILLED_GROUP", &group)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.trim() == "READY")
    });
    let ready = tokio::time::timeout(Duration::from_secs(90), ready).await;
    child.kill().unwrap();
    let _ = child.wait();
    assert!(matches!(ready, Ok(Ok(true))), "the child never said READY");
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new(group))
        .await
        .unwrap();
    let got = receive_n(&*consumer, 5).await;
    assert_eq!(
        got.iter().map(text).collect::<Vec<_>>(),
        ["k5", "k6", "k7", "k8", "k9"],
        "from the first unacknowledged message on"
    );
    consumer.close().await.unwrap();
    backend.close().await.unwrap();
}

/// The assignments a member was given, each with when: what the session-expiry test watches.
type Assignments = Arc<std::sync::Mutex<Vec<(std::time::Instant, Vec<i32>)>>>;

/// Notes (and, in the child process, prints) every assignment a member is given, empty ones
/// too: `assignment()` cannot tell "not joined yet" from "joined with nothing".
struct Notes {
    log: Assignments,
    print: bool,
}

impl rdkafka::ClientContext for Notes {}

impl rdkafka::consumer::ConsumerContext for Notes {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        if let rdkafka::consumer::Rebalance::Assign(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            if self.print {
                println!("ASSIGNED {partitions:?}");
            }
            self.log
                .lock()
                .unwrap()
                .push((std::time::Instant::now(), partitions));
        }
    }
}

/// A plain librdkafka member of `group` on `topic`, as both members of the session-expiry test
/// are: a short session, heartbeats every second, the protocol tansu keeps for the group.
fn raw_member(bootstrap: &str, group: &str, topic: &str, notes: Notes) -> BaseConsumer<Notes> {
    let member: BaseConsumer<Notes> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("partition.assignment.strategy", "roundrobin")
        .create_with_context(notes)
        .unwrap();
    member.subscribe(&[topic]).unwrap();
    member
}

#[test]
#[ignore = "run by a_survivor_gets_the_partition_of_a_member_whose_session_expired in a child process"]
fn expiring_member_child() {
    let var = |name: &str| std::env::var(name).expect(name);
    let notes = Notes {
        log: Assignments::default(),
        print: true,
    };
    let member = raw_member(
        &var("EXPIRING_BOOTSTRAP"),
        &var("EXPIRING_GROUP"),
        &var("EXPIRING_TOPIC"),
        notes,
    );
    loop {
        if let Some(Err(e)) = member.poll(Duration::from_millis(100)) {
            eprintln!("child member: {e}");
        }
    }
}

/// Two members of a group on a one-partition topic; the one holding the partition dies (killed:
/// no LeaveGroup). Once the broker expires its session, the group rebalances and the survivor
/// gets the partition — what a consumer group is for. On tansu 0.6.0 the survivor keeps its
/// empty share for good (docs/kafka.md, known defects): its heartbeat is the request that finds
/// the dead member expired, and tansu's heartbeat drops the member and answers
/// `REBALANCE_IN_PROGRESS` but leaves the group formed at the same generation with the old
/// assignments, so the survivor rejoins into that generation and is handed its old, empty share.
/// Which member gets the partition is the assignor's choice, so the test repeats the pairing (in
/// a new group) until the member that is going to die holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tansu 0.6.0 leaves the partition of an expired member to nobody (docs/kafka.md, known defects); run with --ignored"]
async fn a_survivor_gets_the_partition_of_a_member_whose_session_expired() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    let Some(url) = url() else { return };
    let backend = backend(&url, "").await;
    let topic = topic("q1", "flow", "expiry");
    let kafka_topic = format!("{}.{}.{}", topic.tenant(), topic.namespace(), topic.queue());
    send_all(&backend, &topic, &payloads("e", 1)).await;
    let bootstrap = KafkaConfig::from_url(&url).unwrap().bootstrap_servers();
    let last = |log: &Assignments| log.lock().unwrap().last().map(|(_, p)| p.clone());
    for attempt in 1..=6 {
        let group = unique("expiry");
        // the survivor, polled on a thread of its own
        let survivor_log = Assignments::default();
        let stop = Arc::new(AtomicBool::new(false));
        let survivor = {
            let (bootstrap, group, kafka_topic) =
                (bootstrap.clone(), group.clone(), kafka_topic.clone());
            let (log, stop) = (survivor_log.clone(), stop.clone());
            std::thread::spawn(move || {
                let member = raw_member(
                    &bootstrap,
                    &group,
                    &kafka_topic,
                    Notes { log, print: false },
                );
                while !stop.load(Ordering::Relaxed) {
                    let _ = member.poll(Duration::from_millis(100));
                }
            })
        };
        let deadline = Instant::now() + EXPECT;
        while last(&survivor_log) != Some(vec![0]) {
            assert!(
                Instant::now() < deadline,
                "the first member never got the partition"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let alone = survivor_log.lock().unwrap().len();
        // the member that is going to die joins, in a process of its own
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "expiring_member_child",
                "--ignored",
                "--nocapture",
            ])
            .env("EXPIRING_BOOTSTRAP", &bootstrap)
            .env("EXPIRING_GROUP", &group)
            .env("EXPIRING_TOPIC", &kafka_topic)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let child_log = Assignments::default();
        {
            let stdout = child.stdout.take().unwrap();
            let log = child_log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(list) = line.strip_prefix("ASSIGNED ") {
                        let list: Vec<i32> = list
                            .trim_matches(['[', ']'])
                            .split(", ")
                            .filter(|p| !p.is_empty())
                            .map(|p| p.parse().unwrap())
                            .collect();
                        log.lock().unwrap().push((Instant::now(), list));
                    }
                }
            });
        }
        // the rebalance the join caused has settled: both were assigned since, one holds it
        let deadline = Instant::now() + Duration::from_secs(30);
        let child_holds = loop {
            let rejoined = survivor_log.lock().unwrap().len() > alone;
            match (rejoined, last(&child_log), last(&survivor_log)) {
                (true, Some(c), Some(s)) if c == [0] && s.is_empty() => break true,
                (true, Some(c), Some(s)) if c.is_empty() && s == [0] => break false,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "the group did not settle after the second member joined: child {:?}, survivor {:?}",
                child_log.lock().unwrap(),
                survivor_log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if !child_holds {
            // the survivor-to-be kept the partition: nothing to see; pair again in a new group
            child.kill().unwrap();
            let _ = child.wait();
            stop.store(true, Ordering::Relaxed);
            survivor.join().unwrap();
            println!("attempt {attempt}: the survivor kept the partition; again in a new group");
            continue;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        child.kill().unwrap();
        let _ = child.wait();
        let killed = Instant::now();
        // session 6 s, then a rebalance of a heartbeat or two; 30 s is ample
        let deadline = killed + Duration::from_secs(30);
        while last(&survivor_log) != Some(vec![0]) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
        survivor.join().unwrap();
        let since_kill: Vec<(String, Vec<i32>)> = survivor_log
            .lock()
            .unwrap()
            .iter()
            .map(|(at, partitions)| {
                let at = if *at >= killed {
                    at.duration_since(killed).as_secs_f64()
                } else {
                    -killed.duration_since(*at).as_secs_f64()
                };
                (format!("{at:+.1} s"), partitions.clone())
            })
            .collect();
        println!("the survivor's assignments (time from the kill): {since_kill:?}");
        assert!(
            since_kill.last().is_some_and(|(_, p)| p == &[0]),
            "30 s after the member holding the partition was killed, the survivor still has \
             none: {since_kill:?}"
        );
        backend.close().await.unwrap();
        return;
    }
    panic!("in 6 pairings the member that was to die never got the partition");
}

/// On the framework's `response` and `notify` classes every consumer has a group of its own:
/// two consumers of one subscription both get every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_consumers_each_get_every_message() {
    let Some(url) = url() else { return };
    let backend = backend(&url, "").await;
    let topic = topic("q0", "response", "replies");
    let a = backend
        .create_consumer(&topic, ConsumerOptions::new("client"))
        .await
        .unwrap();
    let b = backend
        .create_consumer(&topic, ConsumerOptions::new("client"))
        .await
        .unwrap();
    send_all(&backend, &topic, &payloads("r", 3)).await;
    for c in [&a, &b] {
        let got = receive_n(&**c, 3).await;
        assert_eq!(got.iter().map(text).collect::<Vec<_>>(), payloads("r", 3));
    }
    backend.close().await.unwrap();
}

/// With more partitions (`partitions=3`) consumers of one subscription share the work, and one
/// key's messages keep their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_topics_share_work_and_keep_key_order() {
    let Some(url) = url() else { return };
    let backend = backend(&url, "partitions=3").await;
    assert!(backend.capabilities(tg_backend_api::Qos::Q1).shared);
    assert!(!backend.capabilities(tg_backend_api::Qos::Q1).ordered);
    let topic = topic("q1", "flow", "shared");
    let a: Arc<dyn Consumer> = backend
        .create_consumer(&topic, ConsumerOptions::new("workers"))
        .await
        .unwrap()
        .into();
    let b: Arc<dyn Consumer> = backend
        .create_consumer(&topic, ConsumerOptions::new("workers"))
        .await
        .unwrap()
        .into();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..60 {
        let key = format!("key{}", i % 6);
        receipts.push(
            producer
                .send(OutboundMessage::new(format!("{key}:{i}")).key(key))
                .await
                .unwrap(),
        );
    }
    for r in receipts {
        r.await.unwrap();
    }
    let worker = |c: Arc<dyn Consumer>| {
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Ok(m) = c.receive(Duration::from_secs(5)).await {
                c.acknowledge(&m).await.unwrap();
                seen.push((m.key().unwrap().to_owned(), text(&m)));
            }
            seen
        })
    };
    let (wa, wb) = (worker(a.clone()), worker(b.clone()));
    let (seen_a, seen_b) = (wa.await.unwrap(), wb.await.unwrap());
    assert!(
        !seen_a.is_empty() && !seen_b.is_empty(),
        "one consumer got everything: {} / {}",
        seen_a.len(),
        seen_b.len()
    );
    // per consumer, each key's sequence numbers in the order they came
    let by_key = |seen: &[(String, String)]| {
        let mut keys: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (key, payload) in seen {
            let n = payload.rsplit(':').next().unwrap().parse().unwrap();
            keys.entry(key.clone()).or_default().push(n);
        }
        keys
    };
    let (keys_a, keys_b) = (by_key(&seen_a), by_key(&seen_b));
    let total: usize = keys_a.values().chain(keys_b.values()).map(Vec::len).sum();
    assert_eq!(total, 60, "{keys_a:?} {keys_b:?}");
    for (key, ns) in keys_a.iter().chain(&keys_b) {
        // one key lives in one partition, which one consumer reads in order
        assert!(
            !(keys_a.contains_key(key) && keys_b.contains_key(key)),
            "key {key} reached both consumers"
        );
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order: {ns:?}"
        );
        assert_eq!(ns.len(), 10, "key {key}: {ns:?}");
    }
    backend.close().await.unwrap();
}

/// `unsubscribe` deletes the subscription: a new one of the same name starts where its initial
/// position says, so `Earliest` replays what the topic still has. Ignored on tansu 0.6.0, whose
/// OffsetFetch answers drop the commit metadata that marks the subscription deleted (docs/kafka.md,
/// known defects); `--ignored` checks another broker or a new tansu.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tansu 0.6.0 drops commit metadata (docs/kafka.md, known defects)"]
async fn unsubscribe_then_earliest_replays() {
    let Some(url) = url() else { return };
    let backend = backend(&url, "commit_interval=10ms").await;
    let topic = topic("q1", "flow", "unsub");
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("u"))
        .await
        .unwrap();
    send_all(&backend, &topic, &payloads("u", 2)).await;
    for m in receive_n(&*consumer, 2).await {
        consumer.acknowledge(&m).await.unwrap();
    }
    consumer.unsubscribe().await.unwrap();
    let replay = backend
        .create_consumer(
            &topic,
            ConsumerOptions::new("u").initial_position(InitialPosition::Earliest),
        )
        .await
        .unwrap();
    let got = receive_n(&*replay, 2).await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), payloads("u", 2));
    for m in &got {
        replay.acknowledge(m).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    replay.close().await.unwrap();
    // a consumer of the new subscription resumes after what it acknowledged
    let resumed = backend
        .create_consumer(
            &topic,
            ConsumerOptions::new("u").initial_position(InitialPosition::Earliest),
        )
        .await
        .unwrap();
    expect_nothing(&*resumed, Duration::from_millis(700)).await;
    backend.close().await.unwrap();
}

/// Properties travel as Kafka record headers (UTF-8) and the message key as the record key,
/// the way the framework's producers and consumers read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_are_headers_and_the_key_is_the_record_key() {
    let Some(url) = url() else { return };
    let backend = backend(&url, "").await;
    let topic = topic("q1", "flow", "wire");
    let kafka_topic = format!("{}.{}.{}", topic.tenant(), topic.namespace(), topic.queue());
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    let id = producer
        .send(
            OutboundMessage::new("payload")
                .key("user-7")
                .property("id", "req-ü")
                .property("empty", ""),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let (partition, offset) = id
        .to_string()
        .split_once(':')
        .map(|(p, o)| (p.parse::<i32>().unwrap(), o.parse::<i64>().unwrap()))
        .unwrap();
    // read the record with plain librdkafka
    let config = KafkaConfig::from_url(&url).unwrap();
    let raw: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", config.bootstrap_servers())
        .set("group.id", unique("raw"))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&kafka_topic, partition, Offset::Offset(offset))
        .unwrap();
    raw.assign(&tpl).unwrap();
    let record = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + EXPECT;
        loop {
            assert!(std::time::Instant::now() < deadline, "no record");
            if let Some(m) = raw.poll(Duration::from_millis(200)) {
                let m = m.unwrap();
                let headers: Vec<(String, Vec<u8>)> = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                return (
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    headers,
                );
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(record.0.as_deref(), Some(&b"user-7"[..]));
    assert_eq!(record.1.as_deref(), Some(&b"payload"[..]));
    let headers: HashSet<(String, Vec<u8>)> = record.2.into_iter().collect();
    assert!(
        headers.contains(&("id".to_owned(), "req-ü".as_bytes().to_vec())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("empty".to_owned(), Vec::new())),
        "{headers:?}"
    );
    backend.close().await.unwrap();
}

/// A record written by another client with a header name repeated: the last value wins (the
/// rule of every backend, what the framework's `dict(headers)` gives) and the other names stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_header_name_keeps_its_last_value() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some(url) = url() else { return };
    let backend = backend(&url, "").await;
    let topic = topic("q1", "flow", "repeats");
    let kafka_topic = format!("{}.{}.{}", topic.tenant(), topic.namespace(), topic.queue());
    let consumer = backend
        .create_consumer(
            &topic,
            ConsumerOptions::new("s").initial_position(InitialPosition::Earliest),
        )
        .await
        .unwrap();
    let config = KafkaConfig::from_url(&url).unwrap();
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", config.bootstrap_servers())
        .create()
        .unwrap();
    let headers = ["1", "2", "3"]
        .iter()
        .fold(OwnedHeaders::new(), |h, v| {
            h.insert(Header {
                key: "a",
                value: Some(*v),
            })
        })
        .insert(Header {
            key: "b",
            value: Some("x"),
        });
    raw.send(
        FutureRecord::<(), _>::to(&kafka_topic)
            .payload("repeated")
            .headers(headers),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let m = consumer.receive(EXPECT).await.unwrap();
    assert_eq!(text(&m), "repeated");
    let expected: BTreeMap<String, String> = [("a", "3"), ("b", "x")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(m.properties(), &expected);
    consumer.acknowledge(&m).await.unwrap();
    backend.close().await.unwrap();
}

/// A second default consumer of one subscription is refused with the reason when topics have
/// one partition; Exclusive is refused with its own; Failover consumers stand by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why() {
    let Some(url) = url() else { return };
    let backend = backend(&url, "").await;
    let topic = topic("q1", "flow", "refusals");
    let _first = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let err = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.message().contains("Failover"), "{err}");
    let err = backend
        .create_consumer(
            &topic,
            ConsumerOptions::new("x").consumer_type(ConsumerType::Exclusive),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.message().contains("cannot refuse a member"), "{err}");
    for _ in 0..2 {
        backend
            .create_consumer(
                &topic,
                ConsumerOptions::new("f").consumer_type(ConsumerType::Failover),
            )
            .await
            .unwrap();
    }
    backend.close().await.unwrap();
}

/// An unreachable broker fails `connect` within `connect_timeout`, naming the broker.
#[tokio::test]
async fn unreachable_broker_fails_fast() {
    let port = tg_testkit::support::free_port();
    let start = std::time::Instant::now();
    let err = KafkaBackend::connect(
        KafkaConfig::from_url(&format!("kafka://127.0.0.1:{port}?connect_timeout=1s")).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        err.message().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// The broker restarts under a producer and a consumer: what was sent before and after arrives,
/// and what was acknowledged before does not come again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing_acknowledged() {
    let Some(tansu) = own_tansu() else {
        return;
    };
    let backend = backend(tansu.url(), "commit_interval=10ms&reconnect_max=1s").await;
    let topic = topic("q1", "flow", "restart");
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("r"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    producer
        .send(OutboundMessage::new("before"))
        .await
        .unwrap()
        .await
        .unwrap();
    let before = consumer.receive(EXPECT).await.unwrap();
    assert_eq!(text(&before), "before");
    consumer.acknowledge(&before).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tansu = tansu.restarted(Duration::from_secs(1)).await;
    producer
        .send(OutboundMessage::new("after"))
        .await
        .unwrap()
        .await
        .unwrap();
    let after = consumer.receive(Duration::from_secs(60)).await.unwrap();
    assert_eq!(text(&after), "after");
    consumer.acknowledge(&after).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    consumer.close().await.unwrap();
    let again = backend
        .create_consumer(&topic, ConsumerOptions::new("r"))
        .await
        .unwrap();
    expect_nothing(&*again, Duration::from_secs(1)).await;
    backend.close().await.unwrap();
    drop(tansu);
}
