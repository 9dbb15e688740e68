//! The broker closes the backend's connections (`rabbitmqctl close_connection`, as an operator or
//! a broker shutting down would). A test binary of its own: it closes every connection of its
//! process, which would hit other tests running beside it.

mod support;

use std::time::Duration;

use tg_backend_api::{Backend, ConsumerOptions, ErrorKind, OutboundMessage, Qos, Topic};
use tg_backend_rabbitmq::{RabbitBackend, RabbitConfig};
use tg_testkit::support::skip;

const DEFAULT_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
const EXPECT: Duration = Duration::from_secs(15);

/// The broker closes the backend's connections (`rabbitmqctl close_connection`, as an operator
/// or a broker shutting down would): producer and consumer come back by themselves, and the
/// message held unacknowledged is delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_consumer_come_back_after_a_forced_close() {
    if std::env::var_os("RABBITMQ_URL").is_some() {
        skip("RABBITMQ_URL names another broker; rabbitmqctl administers the local one");
        return;
    }
    let url = format!("{DEFAULT_URL}?reconnect_max=200ms");
    let backend = match RabbitBackend::connect(RabbitConfig::from_url(&url).unwrap()).await {
        Ok(b) => b,
        Err(e) => return skip(&format!("no RabbitMQ at {url}: {e}")),
    };
    let name = format!("forced-{}", std::process::id());
    let topic = Topic::new(Qos::Q1, "conf", "flow", &name).unwrap();
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    producer
        .send(OutboundMessage::new("held"))
        .await
        .unwrap()
        .await
        .unwrap();
    let held = consumer.receive(EXPECT).await.unwrap();
    let closed = tokio::task::spawn_blocking(support::node::close_connections_of_this_process)
        .await
        .unwrap();
    if closed == 0 {
        skip("rabbitmqctl could not list or close this process's connections");
        return;
    }
    assert_eq!(closed, 2, "producer and consumer connections");
    let err = consumer.acknowledge(&held).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    producer
        .send(OutboundMessage::new("after"))
        .await
        .unwrap()
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = consumer.receive(EXPECT).await.unwrap();
        consumer.acknowledge(&m).await.unwrap();
        got.push(String::from_utf8_lossy(m.payload()).into_owned());
    }
    got.sort();
    assert_eq!(got, ["after", "held"]);
    consumer.unsubscribe().await.unwrap();
    support::delete_exchanges(DEFAULT_URL, &[format!("conf.flow.{name}")]).await;
    backend.close().await.unwrap();
}
