//! Memory-specific behaviour the conformance suite does not cover: the bound on memory.

use std::time::Duration;

use tg_backend_api::{Backend, ConsumerOptions, ErrorKind, OutboundMessage};
use tg_backend_memory::{MemoryBackend, MemoryConfig, Overflow};

#[tokio::test]
async fn full_subscription_fails_under_fail_policy() {
    let backend = MemoryBackend::with_config(
        MemoryConfig::default()
            .subscription_capacity(3)
            .overflow(Overflow::Fail),
    );
    let topic = tg_backend_api::topic("bounded-fail").unwrap();
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("slow"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    for i in 0..3 {
        producer
            .send(OutboundMessage::new(format!("{i}")))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let err = producer.send(OutboundMessage::new("3")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::QueueFull);
    assert!(err.is_temporary());
    assert!(err.message().contains("slow"), "{err}");
    // a received but unacknowledged message still counts; acknowledging makes room
    let m = consumer.receive(Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        producer
            .send(OutboundMessage::new("3"))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::QueueFull
    );
    consumer.acknowledge(&m).await.unwrap();
    producer
        .send(OutboundMessage::new("3"))
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn full_subscription_blocks_the_producer_until_room() {
    let backend = MemoryBackend::with_config(MemoryConfig::default().subscription_capacity(2));
    let topic = tg_backend_api::topic("bounded-block").unwrap();
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("slow"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    for i in 0..2 {
        producer
            .send(OutboundMessage::new(format!("{i}")))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let blocked = tokio::time::timeout(
        Duration::from_millis(200),
        producer.send(OutboundMessage::new("2")),
    )
    .await;
    assert!(
        blocked.is_err(),
        "send into a full subscription did not wait"
    );
    let m = consumer.receive(Duration::from_secs(1)).await.unwrap();
    consumer.acknowledge(&m).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(1),
        producer.send(OutboundMessage::new("2")),
    )
    .await
    .expect("room was made")
    .unwrap()
    .await
    .unwrap();
    // nothing was lost: the remaining two arrive in order
    for want in ["1", "2"] {
        let m = consumer.receive(Duration::from_secs(1)).await.unwrap();
        assert_eq!(m.payload().as_ref(), want.as_bytes());
        consumer.acknowledge(&m).await.unwrap();
    }
}

#[tokio::test]
async fn closing_the_backend_wakes_receivers_with_closed() {
    let backend = MemoryBackend::new();
    let topic = tg_backend_api::topic("close-wakes").unwrap();
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("c"))
        .await
        .unwrap();
    let waiting = tokio::spawn(async move { consumer.receive(Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    backend.close().await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("woken")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert_eq!(
        backend
            .create_producer(&topic, Default::default())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Closed
    );
}

#[tokio::test]
async fn dropped_consumer_returns_its_messages() {
    let backend = MemoryBackend::new();
    let topic = tg_backend_api::topic("drop-returns").unwrap();
    let first = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let keep = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    producer
        .send(OutboundMessage::new("x"))
        .await
        .unwrap()
        .await
        .unwrap();
    let m = first.receive(Duration::from_secs(1)).await.unwrap();
    drop(first);
    let again = keep.receive(Duration::from_secs(1)).await.unwrap();
    assert_eq!(again.payload(), m.payload());
    assert_eq!(again.redelivery_count(), 1);
}

#[tokio::test]
async fn acknowledging_on_the_wrong_consumer_is_refused() {
    let backend = MemoryBackend::new();
    let topic = tg_backend_api::topic("wrong-consumer").unwrap();
    let a = backend
        .create_consumer(&topic, ConsumerOptions::new("a"))
        .await
        .unwrap();
    let b = backend
        .create_consumer(&topic, ConsumerOptions::new("b"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    producer
        .send(OutboundMessage::new("x"))
        .await
        .unwrap()
        .await
        .unwrap();
    let m = a.receive(Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        b.acknowledge(&m).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    a.acknowledge(&m).await.unwrap();
}
