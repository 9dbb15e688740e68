//! A typed producer and two typed consumers on the embedded (in-memory) backend: no server.
//!
//! `cargo run -p tg-pubsub --example typed_messages`
//!
//! Each subscription gets every message (billing and shipping both see every order); consumers
//! of one subscription would compete for them instead.
use std::time::Duration;

use tg_pubsub::{BackendExt, ConsumerOptions, PubSubConfig};

/// A message type: `#[message]` gives it the JSON the Python framework reads and writes
/// (`None` fields are left out, unknown keys are ignored when decoding).
#[tg_pubsub::message]
#[derive(Debug, Clone, PartialEq, Default)]
struct Order {
    id: u64,
    item: String,
    quantity: u32,
    note: Option<String>,
}

#[tokio::main]
async fn main() -> tg_pubsub::Result<()> {
    // `PubSubConfig::new()` is the in-memory backend whatever the environment says;
    // `PubSubConfig::from_env()` would follow PUBSUB_BACKEND.
    let backend = tg_pubsub::connect(&PubSubConfig::new()).await?;
    let topic = tg_pubsub::topic("orders")?; // q1/tg/flow/orders: at least once
    println!("backend {}, topic {topic}", backend.name());

    // Subscriptions exist once their consumers are created: create them before sending.
    let billing = backend
        .typed_consumer::<Order>(&topic, ConsumerOptions::new("billing"))
        .await?;
    let shipping = backend
        .typed_consumer::<Order>(&topic, ConsumerOptions::new("shipping"))
        .await?;
    let producer = backend.typed_producer::<Order>(&topic).await?;

    let orders = [
        Order {
            id: 1,
            item: "tea".into(),
            quantity: 2,
            note: None,
        },
        Order {
            id: 2,
            item: "cups".into(),
            quantity: 6,
            note: Some("fragile".into()),
        },
        Order {
            id: 3,
            item: "kettle".into(),
            quantity: 1,
            note: None,
        },
    ];
    for order in &orders {
        let id = producer.send(order).await?; // returns once the broker accepted it
        println!(
            "sent     order {} ({} x {}) as message {id}",
            order.id, order.quantity, order.item
        );
    }

    for (name, consumer) in [("billing", &billing), ("shipping", &shipping)] {
        for expected in &orders {
            let received = consumer.receive(Duration::from_secs(5)).await?;
            assert_eq!(received.value(), expected, "{name} got another order");
            println!(
                "{name:<8} order {} ({} x {}{}), {} bytes of JSON",
                received.value().id,
                received.value().quantity,
                received.value().item,
                received
                    .value()
                    .note
                    .as_deref()
                    .map(|n| format!(", {n}"))
                    .unwrap_or_default(),
                received.message().payload().len(),
            );
            consumer.acknowledge(&received).await?;
        }
    }

    producer.close().await?;
    billing.close().await?;
    shipping.close().await?;
    backend.close().await?;
    println!(
        "done: {} orders, each seen by both subscriptions",
        orders.len()
    );
    Ok(())
}
