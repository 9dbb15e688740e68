//! Producer, publisher, subscriber, request/response, heartbeat and metrics on the memory backend.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{drain, fresh_topic, Flaky};
use prometheus_client::registry::Registry;
use tg_backend_api::{
    Backend, BackendExt, ConsumerOptions, ErrorKind, OutboundMessage, TypedMessage,
};
use tg_backend_memory::{MemoryBackend, MemoryConfig};
use tg_runtime::metrics::encode_text;
use tg_runtime::{
    reply_properties, Backoff, ConsumerRunner, HandlerError, HealthStatus, Heartbeat,
    ProducerConfig, Publisher, PublisherConfig, RequestResponse, RetryingProducer, RunnerConfig,
    RuntimeMetrics, Subscriber, SubscriberConfig, WhenFull,
};

fn fast_retries(n: u32) -> ProducerConfig {
    ProducerConfig::default()
        .max_attempts(n)
        .backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
        .reconnect(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
}

/// Temporary (connection) errors are retried and the producer is recreated.
#[tokio::test(start_paused = true)]
async fn producer_retries_connection_errors_and_reconnects() {
    let flaky = Flaky::new();
    let backend: Arc<dyn Backend> = Arc::new(flaky.clone());
    let topic = fresh_topic("out");
    let c = flaky
        .inner
        .create_consumer(&topic, ConsumerOptions::new("c"))
        .await
        .unwrap();
    let p = RetryingProducer::new(backend, topic.clone(), fast_retries(5));
    flaky.faults.fail_sends.store(3, Ordering::SeqCst);
    p.send(OutboundMessage::new("x")).await.unwrap();
    assert_eq!(
        c.receive(Duration::from_secs(1))
            .await
            .unwrap()
            .payload()
            .as_ref(),
        b"x"
    );
    assert_eq!(
        p.connections(),
        4,
        "one backend producer per connection error, plus the first"
    );
    assert_eq!(flaky.faults.producers_created.load(Ordering::SeqCst), 4);
}

/// When retries run out the error says so and how many tries were made.
#[tokio::test(start_paused = true)]
async fn producer_returns_the_error_when_retries_run_out() {
    let flaky = Flaky::new();
    let backend: Arc<dyn Backend> = Arc::new(flaky.clone());
    let p = RetryingProducer::new(backend, fresh_topic("out"), fast_retries(4));
    flaky.faults.down.store(true, Ordering::SeqCst);
    let err = p.send(OutboundMessage::new("x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert!(!err.is_temporary());
    assert!(err.message().contains("retries ran out"), "{err}");
    assert!(err.message().contains("4 times"), "{err}");
    assert_eq!(err.context_value("attempts"), Some("4"));

    // Opt-in drop: counted, not returned.
    assert_eq!(p.send_or_drop(OutboundMessage::new("y")).await, None);
    assert_eq!(p.dropped(), 1);
}

/// Permanent errors are not retried.
#[tokio::test]
async fn producer_does_not_retry_permanent_errors() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::with_config(
        MemoryConfig::default().max_payload(4),
    ));
    let p = RetryingProducer::new(backend, fresh_topic("out"), fast_retries(5));
    let err = p.send(OutboundMessage::new("too large")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    assert!(!err.message().contains("retries"), "{err}");
}

/// A full publisher queue: `try_publish` fails with QueueFull, `publish` waits for room.
#[tokio::test]
async fn publisher_backpressure_and_flush() {
    let flaky = Flaky::new();
    let backend: Arc<dyn Backend> = Arc::new(flaky.clone());
    let topic = fresh_topic("events");
    let c = flaky
        .inner
        .create_consumer(&topic, ConsumerOptions::new("c"))
        .await
        .unwrap();
    // Broker down: the sender holds one message in flight (retrying), the queue fills up.
    flaky.faults.down.store(true, Ordering::SeqCst);
    let publisher = Arc::new(Publisher::new(
        backend,
        topic.clone(),
        PublisherConfig::default()
            .capacity(4)
            .max_in_flight(1)
            .producer(fast_retries(1000).max_elapsed(Duration::from_secs(60))),
    ));
    for i in 0..5 {
        // The first is taken by the sender; then 4 fit in the queue.
        tokio::time::timeout(
            Duration::from_secs(1),
            publisher.publish(OutboundMessage::new(format!("m{i}"))),
        )
        .await
        .expect("room in the queue")
        .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let err = publisher
        .try_publish(OutboundMessage::new("overflow"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::QueueFull);
    assert!(err.message().contains("full (4 messages)"), "{err}");
    let p2 = publisher.clone();
    let waiting = tokio::spawn(async move { p2.publish(OutboundMessage::new("m5")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiting.is_finished(),
        "publish waits while the queue is full"
    );
    assert_eq!(publisher.queued(), 4);

    flaky.faults.down.store(false, Ordering::SeqCst);
    waiting.await.unwrap().unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(publisher.sent(), 6);
    let mut got = Vec::new();
    while let Ok(m) = c.receive(Duration::from_millis(20)).await {
        got.push(String::from_utf8_lossy(m.payload()).into_owned());
    }
    assert_eq!(
        got,
        ["m0", "m1", "m2", "m3", "m4", "m5"],
        "queue order kept"
    );
    publisher.close().await.unwrap();
    assert_eq!(
        publisher
            .publish(OutboundMessage::new("late"))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Closed
    );
}

/// Failures after retries come back from `flush`; with `drop_after_retries` they are counted instead.
#[tokio::test(start_paused = true)]
async fn publisher_reports_or_drops_failures() {
    let flaky = Flaky::new();
    flaky.faults.down.store(true, Ordering::SeqCst);
    let backend: Arc<dyn Backend> = Arc::new(flaky.clone());
    let reporting = Publisher::new(
        backend.clone(),
        fresh_topic("a"),
        PublisherConfig::default().producer(fast_retries(2)),
    );
    reporting.publish(OutboundMessage::new("x")).await.unwrap();
    let err = reporting.flush().await.unwrap_err();
    assert!(err.message().contains("retries ran out"), "{err}");
    reporting.flush().await.unwrap();
    assert_eq!(reporting.failed(), 1);

    let dropping = Publisher::new(
        backend,
        fresh_topic("b"),
        PublisherConfig::default()
            .producer(fast_retries(2))
            .drop_after_retries(true),
    );
    dropping.publish(OutboundMessage::new("x")).await.unwrap();
    dropping.publish(OutboundMessage::new("y")).await.unwrap();
    dropping.flush().await.unwrap();
    assert_eq!(dropping.dropped(), 2);
}

/// Keyed and see-everything recipients; a slow recipient does not stall the others.
#[tokio::test]
async fn subscriber_routes_and_isolates_slow_recipients() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("fanout");
    let sub = Subscriber::<String>::start(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("me"),
        SubscriberConfig::default()
            .poll_interval(Duration::from_millis(20))
            .all_queue(3, WhenFull::DropOldest)
            .keyed_queue(100, WhenFull::DropNewest),
    )
    .await
    .unwrap();
    let a = sub.register("a");
    let b = sub.register("b");
    let slow_all = sub.subscribe_all(); // never read until the end
    let p = backend.typed_producer::<String>(&topic).await.unwrap();
    for i in 0..10 {
        let key = if i % 2 == 0 { "a" } else { "b" };
        p.send_with(
            &format!("{key}{i}"),
            [("id".to_owned(), key.to_owned())].into(),
        )
        .await
        .unwrap();
    }
    p.send_with(
        &"nobody".to_owned(),
        [("id".to_owned(), "zzz".to_owned())].into(),
    )
    .await
    .unwrap();
    for i in (0..10).step_by(2) {
        assert_eq!(
            a.recv_timeout(Duration::from_secs(1))
                .await
                .unwrap()
                .value(),
            &format!("a{i}")
        );
    }
    for i in (1..10).step_by(2) {
        assert_eq!(
            b.recv_timeout(Duration::from_secs(1))
                .await
                .unwrap()
                .value(),
            &format!("b{i}")
        );
    }
    // The slow see-everything recipient kept the 3 newest and counted the rest as dropped.
    assert_eq!(slow_all.queued(), 3);
    assert_eq!(slow_all.dropped(), 8);
    assert_eq!(slow_all.recv().await.unwrap().value(), "a8");
    assert_eq!(
        sub.unrouted(),
        0,
        "the see-everything recipient received it"
    );
    drop(slow_all);
    p.send_with(
        &"again".to_owned(),
        [("id".to_owned(), "zzz".to_owned())].into(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(sub.unrouted(), 1);
    sub.shutdown().await.unwrap();
    assert!(a.recv().await.is_none(), "closed after shutdown");
}

async fn echo_server(
    backend: Arc<dyn Backend>,
    req: tg_backend_api::Topic,
    resp: tg_backend_api::Topic,
    parts: usize,
) {
    let producer = Arc::new(backend.typed_producer::<Reply>(&resp).await.unwrap());
    let handler = move |m: TypedMessage<String>| {
        let producer = producer.clone();
        async move {
            if m.value() == "ignore me" {
                return Ok(());
            }
            for i in 0..parts {
                let r = Reply {
                    text: format!("{}#{i}", m.value()),
                    end_of_stream: i + 1 == parts,
                };
                producer
                    .send_with(&r, reply_properties(m.message()))
                    .await?;
            }
            Ok::<_, HandlerError>(())
        }
    };
    let runner = ConsumerRunner::new(backend, req, ConsumerOptions::new("server"), handler)
        .config(RunnerConfig::default().poll_interval(Duration::from_millis(20)))
        .start()
        .await
        .unwrap();
    std::mem::forget(runner); // runs for the rest of the test
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Reply {
    text: String,
    end_of_stream: bool,
}
tg_schema::impl_message!(Reply);

#[tokio::test]
async fn request_response_single_and_timeout() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let (req, resp) = (fresh_topic("req"), fresh_topic("resp"));
    echo_server(backend.clone(), req.clone(), resp.clone(), 1).await;
    let client = RequestResponse::<String, Reply>::new(backend.clone(), req.clone(), resp.clone())
        .await
        .unwrap();
    // Concurrent requests each get their own answer.
    let (one, two) = ("one".to_owned(), "two".to_owned());
    let (r1, r2) = tokio::join!(
        client.request(&one, Duration::from_secs(2)),
        client.request(&two, Duration::from_secs(2)),
    );
    assert_eq!(r1.unwrap().value().text, "one#0");
    assert_eq!(r2.unwrap().value().text, "two#0");
    let err = client
        .request(&"ignore me".to_owned(), Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.context_value("id").is_some());
    client.close().await.unwrap();
}

#[tokio::test]
async fn request_response_streaming_until_final() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let (req, resp) = (fresh_topic("sreq"), fresh_topic("sresp"));
    echo_server(backend.clone(), req.clone(), resp.clone(), 4).await;
    let client = RequestResponse::<String, Reply>::new(backend, req, resp)
        .await
        .unwrap();
    let stream = client
        .request_stream(&"s".to_owned(), Duration::from_secs(2), |r: &Reply| {
            r.end_of_stream
        })
        .await
        .unwrap();
    let all = stream.collect().await.unwrap();
    let texts: Vec<_> = all.iter().map(|m| m.value().text.clone()).collect();
    assert_eq!(texts, ["s#0", "s#1", "s#2", "s#3"]);
    let mut idle = client
        .request_stream(
            &"ignore me".to_owned(),
            Duration::from_millis(100),
            |r: &Reply| r.end_of_stream,
        )
        .await
        .unwrap();
    assert_eq!(
        idle.next().await.unwrap().unwrap_err().kind(),
        ErrorKind::Timeout
    );
    assert!(idle.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn heartbeat_publishes_periodically_and_on_stop() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("health");
    let c = backend
        .typed_consumer::<HealthStatus>(&topic, ConsumerOptions::new("monitor"))
        .await
        .unwrap();
    let hb = Heartbeat::start(
        backend.clone(),
        topic.clone(),
        "svc-a",
        Duration::from_secs(10),
    );
    let first = c.receive(Duration::from_secs(1)).await.unwrap();
    assert_eq!(first.value().status, "ok");
    assert_eq!(first.property("service"), Some("svc-a"));
    hb.set_status("degraded", Some("slow".into()));
    let second = c.receive(Duration::from_secs(11)).await.unwrap();
    assert_eq!(second.value().status, "degraded");
    assert_eq!(second.value().uptime_seconds, 10);
    hb.stop().await;
    let last = c.receive(Duration::from_secs(1)).await.unwrap();
    assert_eq!(last.value().status, "stopped");
}

#[tokio::test]
async fn metrics_are_exported() {
    let mut registry = Registry::default();
    let metrics = RuntimeMetrics::register(&mut registry);
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let topic = fresh_topic("metered");
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("m"),
        |m: TypedMessage<String>| async move {
            if m.value() == "bad" {
                return Err(HandlerError::permanent("bad"));
            }
            Ok(())
        },
    )
    .metrics(metrics.clone())
    .config(RunnerConfig::default().poll_interval(Duration::from_millis(20)))
    .start()
    .await
    .unwrap();
    let publisher = Publisher::with_metrics(
        backend.clone(),
        topic.clone(),
        PublisherConfig::default(),
        Some(&metrics),
    );
    for v in ["ok", "ok", "bad"] {
        publisher
            .publish_value(&v.to_owned(), Default::default())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    for _ in 0..200 {
        if runner.stats().received == 3 && runner.stats().dead_lettered == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    runner.shutdown().await.unwrap();
    let text = encode_text(&registry);
    let t = topic.as_str();
    for line in [
        format!("tg_pubsub_received_total{{topic=\"{t}\",subscription=\"m\"}} 3"),
        format!("tg_pubsub_handled_total{{topic=\"{t}\",subscription=\"m\",outcome=\"ok\"}} 2"),
        format!("tg_pubsub_dead_lettered_total{{topic=\"{t}\",subscription=\"m\"}} 1"),
        format!("tg_pubsub_handler_seconds_count{{topic=\"{t}\",subscription=\"m\"}} 3"),
        format!("tg_pubsub_published_total{{topic=\"{t}\",outcome=\"ok\"}} 3"),
        format!("tg_pubsub_publisher_queue_depth{{topic=\"{t}\"}} 0"),
    ] {
        assert!(text.contains(&line), "missing {line} in\n{text}");
    }
    assert!(
        text.contains("tg_pubsub_connected{component=\"consumer\""),
        "{text}"
    );
    let dead = drain(
        &*backend,
        &topic.with_queue("metered:dlq").unwrap(),
        "x",
        Duration::from_millis(50),
    )
    .await;
    assert_eq!(dead.len(), 1);
}

/// The subscriber recreates its consumer after connection errors and keeps routing.
#[tokio::test]
async fn subscriber_reconnects() {
    let flaky = Flaky::new();
    let backend: Arc<dyn Backend> = Arc::new(flaky.clone());
    let topic = fresh_topic("resp");
    let sub = Subscriber::<String>::start(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("me"),
        SubscriberConfig::default().poll_interval(Duration::from_millis(20)),
    )
    .await
    .unwrap();
    let all = sub.subscribe_all();
    let p = flaky.inner.typed_producer::<String>(&topic).await.unwrap();
    p.send(&"before".to_owned()).await.unwrap();
    assert_eq!(
        all.recv_timeout(Duration::from_secs(1))
            .await
            .unwrap()
            .value(),
        "before"
    );
    flaky.faults.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.send(&"during".to_owned()).await.unwrap();
    flaky.faults.down.store(false, Ordering::SeqCst);
    assert_eq!(
        all.recv_timeout(Duration::from_secs(2))
            .await
            .unwrap()
            .value(),
        "during"
    );
    assert!(flaky.faults.consumers_created.load(Ordering::SeqCst) >= 2);
    sub.shutdown().await.unwrap();
}
