//! The consumer runner on the memory backend (and a fault-injecting wrapper of it).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{drain, fresh_topic, Flaky};
use parking_lot::Mutex;
use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage, Producer, TypedMessage};
use tg_backend_memory::MemoryBackend;
use tg_runtime::{
    Backoff, ConsumerRunner, DeadLetter, Deduplicator, HandlerError, KeyOrdering, RunnerConfig,
    DLQ_ATTEMPTS_PROPERTY, DLQ_ERROR_PROPERTY, DLQ_REASON_PROPERTY, DLQ_SUBSCRIPTION_PROPERTY,
    DLQ_TOPIC_PROPERTY,
};

/// A number message (JSON `7`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Num(u32);
tg_schema::impl_message!(Num);

fn json(s: &str) -> OutboundMessage {
    OutboundMessage::new(serde_json::to_vec(s).expect("json"))
}

async fn send_all(p: &dyn Producer, items: impl IntoIterator<Item = OutboundMessage>) {
    for m in items {
        p.send(m).await.expect("send").await.expect("receipt");
    }
}

fn quick() -> RunnerConfig {
    RunnerConfig::default()
        .retry_backoff(
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).jitter(false),
        )
        .rate_limit_backoff(
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).jitter(false),
        )
        .poll_interval(Duration::from_millis(20))
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn handles_every_message_once_and_acknowledges() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("work");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("w"),
        move |m: TypedMessage<String>| {
            let s = s.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                s.lock().push(m.into_value());
                Ok::<_, HandlerError>(())
            }
        },
    )
    .config(quick().concurrency(8))
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(&*p, (0..200).map(|i| json(&i.to_string()))).await;
    wait_until("200 handled", || runner.stats().succeeded == 200).await;
    let report = runner.shutdown().await.unwrap();
    assert_eq!(report.stats.received, 200);
    assert_eq!(report.abandoned, 0);
    let got: HashSet<String> = seen.lock().iter().cloned().collect();
    assert_eq!(got.len(), 200);
    // Everything was acknowledged: the subscription is empty.
    assert!(drain(&*backend, &topic, "w", Duration::from_millis(50))
        .await
        .is_empty());
}

#[tokio::test]
async fn concurrency_is_bounded() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("bounded");
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, pk) = (now.clone(), peak.clone());
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("w"),
        move |_m: TypedMessage<String>| {
            let (n, pk) = (n.clone(), pk.clone());
            async move {
                let cur = n.fetch_add(1, Ordering::SeqCst) + 1;
                pk.fetch_max(cur, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        },
    )
    .config(quick().concurrency(4))
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(&*p, (0..40).map(|i| json(&i.to_string()))).await;
    wait_until("40 handled", || runner.stats().succeeded == 40).await;
    runner.shutdown().await.unwrap();
    assert_eq!(
        peak.load(Ordering::SeqCst),
        4,
        "4 in flight at most, and 4 reached"
    );
}

/// A handler that panics on one message: the runner keeps going, the message is retried with
/// growing delays and after `max_attempts` lands in the dead-letter topic with the right properties.
#[tokio::test(start_paused = true)]
async fn panicking_poison_message_is_dead_lettered_while_others_flow() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("orders");
    let calls = Arc::new(Mutex::new(Vec::<(String, tokio::time::Instant)>::new()));
    let c = calls.clone();
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        move |m: TypedMessage<String>| {
            let c = c.clone();
            async move {
                c.lock()
                    .push((m.value().clone(), tokio::time::Instant::now()));
                if m.value() == "boom" {
                    panic!("cannot handle boom");
                }
                Ok::<_, HandlerError>(())
            }
        },
    )
    .config(quick().concurrency(4).max_attempts(3))
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(
        &*p,
        [json("a"), json("boom").property("trace", "t-1"), json("b")],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    send_all(&*p, [json("c")]).await;
    wait_until("dead-lettered", || runner.stats().dead_lettered == 1).await;
    let report = runner.shutdown().await.unwrap();
    assert_eq!(report.stats.succeeded, 3, "{report:?}");
    assert_eq!(report.stats.panicked, 3);
    assert_eq!(report.stats.failed, 3);

    // Attempts were spaced by the growing delay (100 ms, then 200 ms; jitter off).
    let boom: Vec<_> = calls
        .lock()
        .iter()
        .filter(|(v, _)| v == "boom")
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(boom.len(), 3);
    assert!(
        boom[1] - boom[0] >= Duration::from_millis(100),
        "{:?}",
        boom[1] - boom[0]
    );
    assert!(
        boom[2] - boom[1] >= Duration::from_millis(200),
        "{:?}",
        boom[2] - boom[1]
    );
    // "c", sent after the first failure, was handled before boom's last attempt.
    let order: Vec<_> = calls.lock().iter().map(|(v, _)| v.clone()).collect();
    let c_at = order.iter().position(|v| v == "c").unwrap();
    let last_boom = order.iter().rposition(|v| v == "boom").unwrap();
    assert!(c_at < last_boom, "{order:?}");

    let dlq = topic.with_queue(&format!("{}:dlq", topic.queue())).unwrap();
    let dead = drain(&*backend, &dlq, "inspect", Duration::from_millis(50)).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.payload().as_ref(), br#""boom""#);
    assert_eq!(d.property(DLQ_TOPIC_PROPERTY), Some(topic.as_str()));
    assert_eq!(d.property(DLQ_SUBSCRIPTION_PROPERTY), Some("svc"));
    assert_eq!(d.property(DLQ_ATTEMPTS_PROPERTY), Some("3"));
    assert_eq!(d.property(DLQ_REASON_PROPERTY), Some("failed"));
    assert!(d
        .property(DLQ_ERROR_PROPERTY)
        .unwrap()
        .contains("cannot handle boom"));
    assert_eq!(
        d.property("trace"),
        Some("t-1"),
        "original properties are kept"
    );
    // And the source subscription holds nothing any more.
    assert!(drain(&*backend, &topic, "svc", Duration::from_millis(50))
        .await
        .is_empty());
}

/// A payload that does not decode goes to the dead-letter topic at once (no retries).
#[tokio::test(start_paused = true)]
async fn undecodable_message_goes_to_dead_letter_at_once() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("typed");
    let dlq = fresh_topic("typed-dlq");
    let handled = Arc::new(AtomicU32::new(0));
    let h = handled.clone();
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        move |_m: TypedMessage<Num>| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        },
    )
    .config(quick().dead_letter(DeadLetter::Topic(dlq.clone())))
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(
        &*p,
        [
            OutboundMessage::new("1"),
            OutboundMessage::new("{not json"),
            OutboundMessage::new("2"),
        ],
    )
    .await;
    wait_until("handled", || {
        runner.stats().succeeded == 2 && runner.stats().dead_lettered == 1
    })
    .await;
    let report = runner.shutdown().await.unwrap();
    assert_eq!(report.stats.failed, 0);
    let dead = drain(&*backend, &dlq, "x", Duration::from_millis(50)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload().as_ref(), b"{not json");
    assert_eq!(dead[0].property(DLQ_REASON_PROPERTY), Some("decode"));
    assert_eq!(dead[0].property(DLQ_ATTEMPTS_PROPERTY), Some("1"));
    assert!(
        dead[0]
            .property(DLQ_ERROR_PROPERTY)
            .unwrap()
            .contains("Num"),
        "{:?}",
        dead[0].property(DLQ_ERROR_PROPERTY)
    );
}

/// Rate-limited replies are retried after a back-off and never count as attempts.
#[tokio::test(start_paused = true)]
async fn rate_limited_is_retried_without_counting_an_attempt() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("llm");
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        move |_m: TypedMessage<String>| {
            let c = c.clone();
            async move {
                if c.fetch_add(1, Ordering::SeqCst) < 4 {
                    return Err(HandlerError::rate_limited("429"));
                }
                Ok(())
            }
        },
    )
    // One attempt only: a single counted failure would dead-letter it.
    .config(quick().max_attempts(1))
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    send_all(&*p, [json("prompt")]).await;
    wait_until("handled", || runner.stats().succeeded == 1).await;
    let report = runner.shutdown().await.unwrap();
    assert_eq!(report.stats.rate_limited, 4);
    assert_eq!(report.stats.failed, 0);
    assert_eq!(report.stats.dead_lettered, 0);
    assert_eq!(report.stats.nacked, 0);
    // 100 + 200 + 400 + 800 ms of back-off.
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
}

/// A permanent error dead-letters at once.
#[tokio::test(start_paused = true)]
async fn permanent_error_dead_letters_at_once() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("perm");
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        |_m: TypedMessage<String>| async { Err::<(), _>(HandlerError::permanent("bad request")) },
    )
    .config(quick().max_attempts(5))
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(&*p, [json("x")]).await;
    wait_until("dead-lettered", || runner.stats().dead_lettered == 1).await;
    let report = runner.shutdown().await.unwrap();
    assert_eq!(report.stats.failed, 1);
    let dlq = topic.with_queue("perm:dlq").unwrap();
    let dead = drain(&*backend, &dlq, "x", Duration::from_millis(50)).await;
    assert_eq!(dead[0].property(DLQ_REASON_PROPERTY), Some("permanent"));
    assert_eq!(dead[0].property(DLQ_ERROR_PROPERTY), Some("bad request"));
}

/// Backends without a redelivery count: attempts are counted in process by message id.
#[tokio::test(start_paused = true)]
async fn attempts_are_counted_in_process_without_redelivery_count() {
    let flaky = Flaky::new();
    flaky
        .faults
        .no_redelivery_count
        .store(true, Ordering::SeqCst);
    let backend: Arc<dyn Backend> = Arc::new(flaky.clone());
    let topic = fresh_topic("nocount");
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        move |_m: TypedMessage<String>| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(HandlerError::failed("nope"))
            }
        },
    )
    .config(quick().max_attempts(4))
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(&*p, [json("x")]).await;
    wait_until("dead-lettered", || runner.stats().dead_lettered == 1).await;
    runner.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let dead = drain(
        &flaky.inner,
        &topic.with_queue("nocount:dlq").unwrap(),
        "x",
        Duration::from_millis(50),
    )
    .await;
    assert_eq!(dead[0].property(DLQ_ATTEMPTS_PROPERTY), Some("4"));
}

/// Per-key ordering: same key one after another, in order, while keys run concurrently.
#[tokio::test]
async fn per_key_ordering_with_concurrency() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("ordered");
    let log = Arc::new(Mutex::new(HashMap::<String, Vec<u32>>::new()));
    let active = Arc::new(Mutex::new(HashSet::<String>::new()));
    let overlaps = Arc::new(AtomicU32::new(0));
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (l, a, o, n, pk) = (
        log.clone(),
        active.clone(),
        overlaps.clone(),
        now.clone(),
        peak.clone(),
    );
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        move |m: TypedMessage<Num>| {
            let (l, a, o, n, pk) = (l.clone(), a.clone(), o.clone(), n.clone(), pk.clone());
            async move {
                let key = m.message().key().unwrap_or_default().to_owned();
                if !a.lock().insert(key.clone()) {
                    o.fetch_add(1, Ordering::SeqCst);
                }
                let cur = n.fetch_add(1, Ordering::SeqCst) + 1;
                pk.fetch_max(cur, Ordering::SeqCst);
                // First message of each key fails once: the retry must keep the key's order.
                let v = m.value().0;
                let fail = v == 0
                    && m.message().redelivery_count() == 0
                    && !l.lock().contains_key(&format!("{key}-failed"));
                tokio::time::sleep(Duration::from_millis(u64::from(v % 3) + 1)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                a.lock().remove(&key);
                if fail {
                    l.lock().insert(format!("{key}-failed"), vec![]);
                    return Err(HandlerError::failed("once"));
                }
                l.lock().entry(key).or_default().push(v);
                Ok::<_, HandlerError>(())
            }
        },
    )
    .config(
        quick()
            .concurrency(8)
            .ordering(KeyOrdering::MessageKey)
            .retry_backoff(Backoff::new(
                Duration::from_millis(5),
                Duration::from_millis(5),
            )),
    )
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    let mut msgs = Vec::new();
    for i in 0..25u32 {
        for k in 0..4 {
            msgs.push(OutboundMessage::new(i.to_string()).key(format!("k{k}")));
        }
    }
    send_all(&*p, msgs).await;
    wait_until("100 handled", || runner.stats().succeeded == 100).await;
    runner.shutdown().await.unwrap();
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two messages of one key ran at once"
    );
    assert!(peak.load(Ordering::SeqCst) > 1, "keys ran concurrently");
    for k in 0..4 {
        assert_eq!(
            log.lock()[&format!("k{k}")],
            (0..25).collect::<Vec<_>>(),
            "order of k{k}"
        );
    }
}

/// Shutdown with work in flight: the in-flight handlers finish and are acknowledged, nothing else
/// is taken; a second runner handles the rest. Every message handled exactly once.
#[tokio::test]
async fn shutdown_with_in_flight_work_loses_and_duplicates_nothing() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("graceful");
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let make = |seen: Arc<Mutex<Vec<String>>>| {
        move |m: TypedMessage<String>| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                seen.lock().push(m.into_value());
                Ok::<_, HandlerError>(())
            }
        }
    };
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        make(seen.clone()),
    )
    .config(quick().concurrency(10))
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(&*p, (0..50).map(|i| json(&i.to_string()))).await;
    wait_until("10 in flight", || runner.stats().received == 10).await;
    let report = runner.shutdown().await.unwrap();
    assert_eq!(
        report.stats.received, 10,
        "nothing received after shutdown started"
    );
    assert_eq!(
        report.stats.succeeded, 10,
        "in-flight handlers finished and were acknowledged"
    );
    assert_eq!(report.abandoned, 0);
    assert_eq!(seen.lock().len(), 10);

    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        make(seen.clone()),
    )
    .config(quick().concurrency(10))
    .start()
    .await
    .unwrap();
    wait_until("the rest", || runner.stats().succeeded == 40).await;
    runner.shutdown().await.unwrap();
    let all = seen.lock().clone();
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), 50, "no duplicates");
    assert_eq!(unique.len(), 50, "nothing lost");
}

/// Handlers still running at the shutdown deadline are dropped unacknowledged and redelivered;
/// messages waiting for a retry delay are handed back at once.
#[tokio::test]
async fn shutdown_deadline_hands_unfinished_messages_back() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("stuck");
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        |m: TypedMessage<String>| async move {
            if m.value() == "fail" {
                return Err(HandlerError::failed("later"));
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, HandlerError>(())
        },
    )
    .config(
        quick()
            .concurrency(4)
            .shutdown_timeout(Duration::from_millis(200))
            .retry_backoff(Backoff::new(
                Duration::from_secs(3600),
                Duration::from_secs(3600),
            )),
    )
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(&*p, [json("slow-1"), json("slow-2"), json("fail")]).await;
    wait_until("failure seen", || {
        runner.stats().failed == 1 && runner.stats().received == 3
    })
    .await;
    let t0 = std::time::Instant::now();
    let report = runner.shutdown().await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(report.abandoned, 2);
    // The delayed retry was handed back at once (a receive already under way when shutdown
    // started may have taken it again, and handed it back again).
    assert!(report.stats.nacked >= 1, "{report:?}");
    let back = drain(&*backend, &topic, "svc", Duration::from_millis(100)).await;
    let mut payloads: Vec<_> = back
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect();
    payloads.sort();
    assert_eq!(payloads, [r#""fail""#, r#""slow-1""#, r#""slow-2""#]);
}

/// Receive failing with connection errors: the runner recreates its consumer quickly and goes on.
#[tokio::test]
async fn reconnects_after_connection_errors() {
    let flaky = Flaky::new();
    let backend: Arc<dyn Backend> = Arc::new(flaky.clone());
    let topic = fresh_topic("reconnect");
    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));
    let s = seen.clone();
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        move |m: TypedMessage<String>| {
            let s = s.clone();
            async move {
                s.lock().insert(m.into_value());
                Ok::<_, HandlerError>(())
            }
        },
    )
    .config(quick())
    .start()
    .await
    .unwrap();
    let p = flaky
        .inner
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(&*p, (0..10).map(|i| json(&i.to_string()))).await;
    wait_until("first 10", || seen.lock().len() == 10).await;

    // The broker goes down for 500 ms.
    flaky.faults.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_all(&*p, (10..20).map(|i| json(&i.to_string()))).await;
    let back = std::time::Instant::now();
    flaky.faults.down.store(false, Ordering::SeqCst);
    wait_until("all 20", || seen.lock().len() == 20).await;
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "consuming again {took:?} after the broker came back"
    );
    let report = runner.shutdown().await.unwrap();
    assert!(report.stats.reconnects >= 1, "{report:?}");
    assert_eq!(report.stats.succeeded, 20);
}

/// With de-duplication on, a message whose id was handled already is dropped (and acknowledged).
#[tokio::test]
async fn deduplication_drops_repeated_ids() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("dedup");
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        move |_m: TypedMessage<String>| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        },
    )
    .deduplicate(
        Arc::new(Deduplicator::new(100, Duration::from_secs(60))),
        |m| m.property("id").map(str::to_owned),
    )
    .config(quick().concurrency(1))
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(
        &*p,
        ["a", "b", "a", "c", "b", "a"].map(|id| json("x").property("id", id)),
    )
    .await;
    wait_until("6 received", || runner.stats().received == 6).await;
    let report = runner.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(report.stats.duplicates, 3);
    assert!(drain(&*backend, &topic, "svc", Duration::from_millis(50))
        .await
        .is_empty());
}

/// Running with an external token, and a bad subscription name failing fast.
#[tokio::test]
async fn run_with_token_and_bad_config() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("token");
    let err = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("bad name"),
        |_m: TypedMessage<String>| async { Ok::<_, HandlerError>(()) },
    )
    .start()
    .await
    .unwrap_err();
    assert_eq!(err.kind(), tg_backend_api::ErrorKind::ConfigInvalid);

    let token = tg_runtime::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        t.cancel();
    });
    let report = ConsumerRunner::new(
        backend,
        topic,
        ConsumerOptions::new("ok"),
        |_m: TypedMessage<String>| async { Ok::<_, HandlerError>(()) },
    )
    .config(quick())
    .run(token)
    .await
    .unwrap();
    assert_eq!(report.stats.received, 0);
}

/// When the dead-letter topic cannot be written, the message is handed back (never acknowledged
/// without being stored), and dead-lettered once the topic works again.
#[tokio::test(start_paused = true)]
async fn dead_letter_publish_failure_never_loses_the_message() {
    let flaky = Flaky::new();
    let backend: Arc<dyn Backend> = Arc::new(flaky.clone());
    let topic = fresh_topic("dlqfail");
    flaky.faults.fail_sends.store(u32::MAX, Ordering::SeqCst); // every send of the runner fails
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        |_m: TypedMessage<String>| async { Err::<(), _>(HandlerError::permanent("no")) },
    )
    .config(
        quick().dead_letter_producer(
            tg_runtime::ProducerConfig::default()
                .max_attempts(2)
                .reconnect(Backoff::new(
                    Duration::from_millis(10),
                    Duration::from_millis(10),
                )),
        ),
    )
    .start_with_token(tg_runtime::CancellationToken::new())
    .await
    .unwrap();
    // The source producer bypasses the fault injection.
    let p = flaky
        .inner
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(&*p, [json("x")]).await;
    wait_until("handed back twice", || runner.stats().nacked >= 2).await;
    assert_eq!(runner.stats().dead_lettered, 0);
    flaky.faults.fail_sends.store(0, Ordering::SeqCst);
    wait_until("dead-lettered", || runner.stats().dead_lettered == 1).await;
    runner.shutdown().await.unwrap();
    let dead = drain(
        &flaky.inner,
        &topic.with_queue("dlqfail:dlq").unwrap(),
        "x",
        Duration::from_millis(50),
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert!(
        drain(&flaky.inner, &topic, "svc", Duration::from_millis(50))
            .await
            .is_empty()
    );
}

/// Ordering by a property: one session's messages in order, sessions concurrently.
#[tokio::test]
async fn per_property_ordering() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("sessions");
    let log = Arc::new(Mutex::new(HashMap::<String, Vec<u32>>::new()));
    let l = log.clone();
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        move |m: TypedMessage<Num>| {
            let l = l.clone();
            async move {
                let session = m.property("session").unwrap_or_default().to_owned();
                // Later messages finish faster: without ordering they would overtake.
                tokio::time::sleep(Duration::from_millis(u64::from(10 - m.value().0 % 10))).await;
                l.lock().entry(session).or_default().push(m.value().0);
                Ok::<_, HandlerError>(())
            }
        },
    )
    .config(
        quick()
            .concurrency(6)
            .ordering(KeyOrdering::Property("session".into())),
    )
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    let mut msgs = Vec::new();
    for i in 0..10u32 {
        for s in ["s1", "s2", "s3"] {
            msgs.push(OutboundMessage::new(i.to_string()).property("session", s));
        }
    }
    send_all(&*p, msgs).await;
    wait_until("30 handled", || runner.stats().succeeded == 30).await;
    runner.shutdown().await.unwrap();
    for s in ["s1", "s2", "s3"] {
        assert_eq!(log.lock()[s], (0..10).collect::<Vec<_>>(), "order of {s}");
    }
}

/// The `tg.handle` spans a subscriber sees: span id → its `correlation_id` field.
#[derive(Clone, Default)]
struct HandleSpans(Arc<Mutex<HashMap<u64, String>>>);

impl<S> tracing_subscriber::Layer<S> for HandleSpans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Correlation(Option<String>);
        impl tracing::field::Visit for Correlation {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "correlation_id" {
                    self.0 = Some(value.to_owned());
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        if attrs.metadata().name() == "tg.handle" {
            let mut c = Correlation(None);
            attrs.record(&mut c);
            self.0.lock().insert(id.into_u64(), c.0.unwrap_or_default());
        }
    }
}

/// Every attempt (first ones, retries, ordered lanes) runs in a `tg.handle` span carrying the
/// message's correlation id (the `id` property, else `correlationid`).
#[tokio::test]
async fn handlers_run_in_a_span_with_the_correlation_id() {
    use tracing_subscriber::layer::SubscriberExt;
    let spans = HandleSpans::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    for ordering in [KeyOrdering::None, KeyOrdering::MessageKey] {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let topic = fresh_topic("spans");
        // (message, correlation id of the span it ran in, redelivery count)
        let seen = Arc::new(Mutex::new(Vec::<(u32, Option<String>, u32)>::new()));
        let (s, sp) = (seen.clone(), spans.clone());
        let runner = ConsumerRunner::new(
            backend.clone(),
            topic.clone(),
            ConsumerOptions::new("svc"),
            move |m: TypedMessage<Num>| {
                let (s, sp) = (s.clone(), sp.clone());
                async move {
                    let span = tracing::Span::current()
                        .id()
                        .and_then(|id| sp.0.lock().get(&id.into_u64()).cloned());
                    let first = {
                        let mut s = s.lock();
                        let first = s.iter().all(|(v, _, _)| *v != m.value().0);
                        s.push((m.value().0, span, m.message().redelivery_count()));
                        first
                    };
                    tokio::task::yield_now().await;
                    if m.value().0.is_multiple_of(3) && first {
                        return Err(HandlerError::failed("once"));
                    }
                    Ok::<_, HandlerError>(())
                }
            },
        )
        .config(
            quick()
                .concurrency(4)
                .ordering(ordering.clone())
                .retry_backoff(Backoff::new(
                    Duration::from_millis(5),
                    Duration::from_millis(5),
                )),
        )
        .start()
        .await
        .unwrap();
        let p = backend
            .create_producer(&topic, Default::default())
            .await
            .unwrap();
        let msgs = (0..12u32).map(|i| {
            let m = OutboundMessage::new(i.to_string()).key(format!("k{}", i % 2));
            if i == 7 {
                m.property("correlationid", "c7")
            } else {
                m.property("id", format!("c{i}"))
            }
        });
        send_all(&*p, msgs).await;
        wait_until("12 handled", || runner.stats().succeeded == 12).await;
        let report = runner.shutdown().await.unwrap();
        assert_eq!(report.stats.failed, 4, "{ordering:?}");
        let seen = seen.lock();
        assert_eq!(seen.len(), 16, "{ordering:?}: 12 messages, 4 of them twice");
        for (v, span, _) in seen.iter() {
            assert_eq!(
                span.as_deref(),
                Some(format!("c{v}").as_str()),
                "{ordering:?}: message {v}"
            );
        }
    }
}

/// Batch mode: the batch handler gets several messages at once (never more than `max_batch`),
/// a poison message in a batch goes to the dead-letter topic alone, a failed message is retried
/// and the others are acknowledged.
#[tokio::test(start_paused = true)]
async fn batch_mode_handles_batches_and_fails_messages_one_by_one() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("batches");
    let dlq = fresh_topic("batches-dlq");
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let seven_failed = Arc::new(AtomicU32::new(0));
    let (s, f) = (sizes.clone(), seven_failed.clone());
    let handler = tg_runtime::batch_handler(move |batch: Vec<TypedMessage<Num>>| {
        let (s, f) = (s.clone(), f.clone());
        async move {
            s.lock().push(batch.len());
            batch
                .iter()
                .map(|m| match m.value().0 {
                    // fails twice, then succeeds on a retry
                    7 if f.fetch_add(1, Ordering::SeqCst) < 2 => {
                        Err(HandlerError::failed("not yet"))
                    }
                    13 => Err(HandlerError::permanent("unlucky")),
                    _ => Ok(()),
                })
                .collect::<Vec<_>>()
        }
    });
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    // Everything is waiting before the runner starts, so its batches are full.
    let mut items: Vec<OutboundMessage> = (0..30)
        .map(|i| OutboundMessage::new(i.to_string()))
        .collect();
    items.insert(20, OutboundMessage::new("{poison"));
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("svc"))
        .await
        .unwrap();
    consumer.close().await.unwrap();
    send_all(&*p, items).await;
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("svc"),
        handler,
    )
    .config(
        quick()
            .concurrency(1)
            .max_batch(8)
            .dead_letter(DeadLetter::Topic(dlq.clone())),
    )
    .start()
    .await
    .unwrap();
    wait_until("30 handled", || {
        let s = runner.stats();
        s.succeeded == 29 && s.dead_lettered == 2
    })
    .await;
    let report = runner.shutdown().await.unwrap();
    let sizes = sizes.lock().clone();
    assert!(sizes.iter().all(|&n| n <= 8), "batch sizes {sizes:?}");
    assert!(sizes.contains(&8), "no full batch in {sizes:?}");
    assert_eq!(report.stats.failed, 3, "7 twice, 13 once");
    let dead = drain(&*backend, &dlq, "x", Duration::from_millis(50)).await;
    let reasons: HashSet<(String, String)> = dead
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.payload()).into_owned(),
                m.property(DLQ_REASON_PROPERTY).unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        HashSet::from([
            ("{poison".to_owned(), "decode".to_owned()),
            ("13".to_owned(), "permanent".to_owned())
        ])
    );
    assert!(drain(&*backend, &topic, "svc", Duration::from_millis(50))
        .await
        .is_empty());
}

/// A plain handler in batch mode sees every message once; a panic fails only its own message,
/// which is retried, and the runner goes on.
#[tokio::test]
async fn batch_mode_with_a_plain_handler_and_a_panic() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("plain-batches");
    let seen = Arc::new(Mutex::new(HashMap::<u32, u32>::new()));
    let panicked = Arc::new(AtomicU32::new(0));
    let (s, pn) = (seen.clone(), panicked.clone());
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("w"),
        move |m: TypedMessage<Num>| {
            let (s, pn) = (s.clone(), pn.clone());
            async move {
                if m.value().0 == 5 && pn.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("first time 5");
                }
                *s.lock().entry(m.value().0).or_default() += 1;
                Ok::<_, HandlerError>(())
            }
        },
    )
    .config(
        quick()
            .concurrency(2)
            .max_batch(16)
            .max_wait(Duration::from_millis(20)),
    )
    .start()
    .await
    .unwrap();
    let p = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    send_all(&*p, (0..100).map(|i| OutboundMessage::new(i.to_string()))).await;
    wait_until("100 handled", || runner.stats().succeeded >= 100).await;
    let report = runner.shutdown().await.unwrap();
    assert_eq!(report.stats.panicked, 1);
    let seen = seen.lock();
    assert_eq!(seen.len(), 100);
    assert!(
        seen.values().all(|n| *n == 1),
        "handled more than once: {:?}",
        seen.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn batch_mode_and_key_ordering_are_refused_together() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let err = ConsumerRunner::new(
        backend,
        fresh_topic("both"),
        ConsumerOptions::new("w"),
        |_m: TypedMessage<Num>| async { Ok::<_, HandlerError>(()) },
    )
    .config(quick().max_batch(4).ordering(KeyOrdering::MessageKey))
    .start()
    .await
    .unwrap_err();
    assert!(err.to_string().contains("max_batch"), "{err}");
}
