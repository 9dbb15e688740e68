//! What the conformance suite does not cover on RabbitMQ: the framework's declare arguments read
//! back from the broker, consumer-type errors that close one channel and no other, quorum queues
//! and the dead-letter exchange, connection errors, names over AMQP's limit, and coming back after
//! the broker cancels a consumer or closes a connection.
//!
//! Against `RABBITMQ_URL`, else the local broker; each test uses names of its own and deletes its
//! queues. Without a broker the tests say why and pass, except under `CI=true`.

mod support;

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tg_backend_api::{
    Backend, ConsumerOptions, ConsumerType, ErrorKind, OutboundMessage, Qos, Topic,
};
use tg_backend_rabbitmq::{QueueType, RabbitBackend, RabbitConfig};
use tg_testkit::support::{free_port, skip};

const DEFAULT_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
const EXPECT: Duration = Duration::from_secs(15);

fn url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

async fn connect(options: &str) -> Option<RabbitBackend> {
    let url = format!("{}{options}", url());
    match RabbitBackend::connect(RabbitConfig::from_url(&url).unwrap()).await {
        Ok(b) => Some(b),
        Err(e) => {
            skip(&format!("no RabbitMQ at {url}: {e}"));
            None
        }
    }
}

/// A plain lapin connection, to look at what tg-pubsub declared as another client would.
async fn raw() -> Connection {
    let url = url();
    let url = url.split('?').next().unwrap_or(&url).to_owned();
    Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    )
}

/// Whether redeclaring `queue` with these settings is accepted (the broker closes the channel
/// with PRECONDITION_FAILED otherwise).
async fn redeclare(conn: &Connection, queue: &str, options: QueueDeclareOptions) -> bool {
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declarations_are_the_frameworks() {
    let Some(backend) = connect("").await else {
        return;
    };
    let conn = raw().await;
    let name = unique("decl");
    let flow = Topic::new(Qos::Q1, "tg", "flow", &name).unwrap();
    let request = Topic::new(Qos::Q0, "tg", "request", &name).unwrap();
    let a = backend
        .create_consumer(&flow, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let b = backend
        .create_consumer(&request, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let transient = QueueDeclareOptions::default();
    let flow_queue = format!("tg.flow.{name}.s");
    let request_queue = format!("tg.request.{name}.s");
    // the same arguments as aio-pika's declare in the framework: accepted; others: refused
    assert!(redeclare(&conn, &flow_queue, durable).await);
    assert!(!redeclare(&conn, &flow_queue, transient).await);
    assert!(redeclare(&conn, &request_queue, transient).await);
    assert!(!redeclare(&conn, &request_queue, durable).await);
    for exchange in [format!("tg.flow.{name}"), format!("tg.request.{name}")] {
        let channel = conn.create_channel().await.unwrap();
        let durable_fanout = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable_fanout,
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{exchange} is not a durable fanout exchange: {e}"));
        let channel = conn.create_channel().await.unwrap();
        assert!(channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                durable_fanout,
                FieldTable::default(),
            )
            .await
            .is_err());
    }
    // a response topic's consumer has a server-named queue of its own
    let response = Topic::new(Qos::Q0, "tg", "response", &name).unwrap();
    let r1 = backend
        .create_consumer(&response, ConsumerOptions::new("same"))
        .await
        .unwrap();
    let r2 = backend
        .create_consumer(&response, ConsumerOptions::new("same"))
        .await
        .unwrap();
    let p = backend
        .create_producer(&response, Default::default())
        .await
        .unwrap();
    p.send(OutboundMessage::new("to both"))
        .await
        .unwrap()
        .await
        .unwrap();
    for c in [&r1, &r2] {
        let m = c.receive(EXPECT).await.unwrap();
        assert_eq!(m.payload().as_ref(), b"to both");
        c.acknowledge(&m).await.unwrap();
    }
    let err = backend
        .create_consumer(
            &response,
            ConsumerOptions::new("x").consumer_type(ConsumerType::Failover),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    a.unsubscribe().await.unwrap();
    b.unsubscribe().await.unwrap();
    support::delete_exchanges(
        &url(),
        &[
            format!("tg.flow.{name}"),
            format!("tg.request.{name}"),
            format!("tg.response.{name}"),
        ],
    )
    .await;
    backend.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_errors_stay_on_their_channel() {
    let Some(backend) = connect("").await else {
        return;
    };
    let name = unique("busy");
    let topic = Topic::new(Qos::Q1, "conf", "flow", &name).unwrap();
    let other = Topic::new(Qos::Q1, "conf", "flow", &format!("{name}-other")).unwrap();
    let exclusive = ConsumerOptions::new("solo").consumer_type(ConsumerType::Exclusive);
    let first = backend
        .create_consumer(&topic, exclusive.clone())
        .await
        .unwrap();
    let bystander = backend
        .create_consumer(&other, ConsumerOptions::new("b"))
        .await
        .unwrap();
    // ACCESS_REFUSED (exclusive use) and PRECONDITION_FAILED (x-single-active-consumer missing on
    // the existing queue) each close the refused consumer's channel
    let err = backend
        .create_consumer(&topic, exclusive.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConsumerBusy, "{err}");
    let err = backend
        .create_consumer(
            &topic,
            ConsumerOptions::new("solo").consumer_type(ConsumerType::Failover),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(err.message().contains("x-single-active-consumer"), "{err}");
    assert!(err.message().contains("declared it first"), "{err}");
    // the others go on, on the same connection
    for (t, c) in [(&topic, &first), (&other, &bystander)] {
        let p = backend
            .create_producer(t, Default::default())
            .await
            .unwrap();
        p.send(OutboundMessage::new("still here"))
            .await
            .unwrap()
            .await
            .unwrap();
        let m = c.receive(EXPECT).await.unwrap();
        assert_eq!(m.payload().as_ref(), b"still here");
        c.acknowledge(&m).await.unwrap();
    }
    first.unsubscribe().await.unwrap();
    bystander.unsubscribe().await.unwrap();
    support::delete_exchanges(
        &url(),
        &[
            format!("conf.flow.{name}"),
            format!("conf.flow.{name}-other"),
        ],
    )
    .await;
    backend.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_count_and_dead_letter() {
    let name = unique("quorum");
    let dead = Topic::new(Qos::Q1, "conf", "flow", &format!("{name}-dead")).unwrap();
    let options =
        format!("?queue_type=quorum&dead_letter_exchange=conf.flow.{name}-dead&delivery_limit=1");
    let Some(backend) = connect(&options).await else {
        return;
    };
    assert!(backend.capabilities(Qos::Q1).redelivery_count);
    assert!(!backend.capabilities(Qos::Q1).exclusive);
    assert_eq!(backend.config().options.queue_type, QueueType::Quorum);
    let topic = Topic::new(Qos::Q1, "conf", "flow", &name).unwrap();
    let dead_letters = backend
        .create_consumer(&dead, ConsumerOptions::new("dlq"))
        .await
        .unwrap();
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("work"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    producer
        .send(OutboundMessage::new("poison").property("id", "p-1"))
        .await
        .unwrap()
        .await
        .unwrap();
    let first = consumer.receive(EXPECT).await.unwrap();
    assert_eq!(first.redelivery_count(), 0);
    consumer.negative_acknowledge(&first).await.unwrap();
    let second = consumer.receive(EXPECT).await.unwrap();
    assert_eq!(second.redelivery_count(), 1, "x-delivery-count");
    assert_eq!(
        second.id(),
        first.id(),
        "the message id survives redelivery"
    );
    consumer.negative_acknowledge(&second).await.unwrap();
    // past delivery_limit the broker moves it to the dead-letter exchange
    let dl = dead_letters.receive(EXPECT).await.unwrap();
    assert_eq!(dl.payload().as_ref(), b"poison");
    assert_eq!(dl.property("id"), Some("p-1"));
    dead_letters.acknowledge(&dl).await.unwrap();
    let err = consumer
        .receive(Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    consumer.unsubscribe().await.unwrap();
    dead_letters.unsubscribe().await.unwrap();
    support::delete_exchanges(
        &url(),
        &[
            format!("conf.flow.{name}"),
            format!("conf.flow.{name}-dead"),
        ],
    )
    .await;
    backend.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_are_auth_or_connection() {
    if connect("").await.is_none() {
        return;
    }
    let base = RabbitConfig::from_url(&url()).unwrap();
    let wrong = format!(
        "amqp://{}:wrong-s3cret-pw@{}:{}/%2f",
        base.username, base.host, base.port
    );
    let err = RabbitBackend::connect(RabbitConfig::from_url(&wrong).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(
        !format!("{err} {err:?}").contains("wrong-s3cret-pw"),
        "{err:?}"
    );
    let no_vhost = format!(
        "amqp://{}:{}@{}:{}/no-such-vhost",
        base.username,
        base.password.expose(),
        base.host,
        base.port
    );
    let err = RabbitBackend::connect(RabbitConfig::from_url(&no_vhost).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    let closed = format!("amqp://127.0.0.1:{}?connect_timeout=2s", free_port());
    let started = std::time::Instant::now();
    let err = RabbitBackend::connect(RabbitConfig::from_url(&closed).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.is_temporary());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_sending() {
    let Some(backend) = connect("?max_payload=1024").await else {
        return;
    };
    let name = unique("input");
    let topic = Topic::new(Qos::Q1, "conf", "flow", &name).unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    let err = producer
        .send(OutboundMessage::new(vec![0u8; 1025]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    // a key is the routing key, a short string
    let err = producer
        .send(OutboundMessage::new("k").key("k".repeat(256)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.message().contains("255"), "{err}");
    // a queue name over 255 bytes (an exchange name is always shorter: topics are at most 255)
    let longish = Topic::new(Qos::Q1, "conf", "flow", &"q".repeat(192)).unwrap();
    let err = backend
        .create_consumer(&longish, ConsumerOptions::new("s".repeat(100)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(err.message().contains("at most 255 bytes"), "{err}");
    let err = backend
        .create_producer(
            &Topic::new(Qos::Q1, "tg", "request", "x").unwrap(),
            Default::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    support::delete_exchanges(&url(), &[format!("conf.flow.{name}")]).await;
    backend.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_comes_back_after_its_queue_is_deleted() {
    let Some(backend) = connect("").await else {
        return;
    };
    let name = unique("cancelled");
    let topic = Topic::new(Qos::Q1, "conf", "flow", &name).unwrap();
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    // another client deletes the queue: the broker cancels the consumer
    let conn = raw().await;
    conn.create_channel()
        .await
        .unwrap()
        .queue_delete(
            format!("conf.flow.{name}.s").into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let err = consumer.receive(Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    producer
        .send(OutboundMessage::new("after"))
        .await
        .unwrap()
        .await
        .unwrap();
    let m = consumer.receive(EXPECT).await.unwrap();
    assert_eq!(m.payload().as_ref(), b"after");
    consumer.acknowledge(&m).await.unwrap();
    consumer.unsubscribe().await.unwrap();
    support::delete_exchanges(&url(), &[format!("conf.flow.{name}")]).await;
    backend.close().await.unwrap();
}
