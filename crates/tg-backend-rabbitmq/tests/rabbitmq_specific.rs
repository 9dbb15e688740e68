//! What the conformance suite does not cover on RabbitMQ: the framework's declare arguments read
//! back from the broker, consumer-type errors that close one channel and no other, quorum queues
//! and the dead-letter exchange, connection errors, names over AMQP's limit, and coming back after
//! the broker cancels a consumer or closes a connection.
//!
//! Against `RABBITMQ_URL`, else the local broker; each test uses names of its own and deletes its
//! queues. Without a broker the tests say why and pass, except under `CI=true`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tg_backend_api::{
    Backend, Consumer, ConsumerOptions, ConsumerType, ErrorKind, Message, OutboundMessage, Qos,
    Topic,
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

/// Counts the consumer's `multiple` frames (its trace event `multiple_up_to`) on the thread it
/// is installed on.
#[derive(Clone, Default)]
struct MultipleFrames(Arc<AtomicUsize>);

impl MultipleFrames {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for MultipleFrames {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().fields().field("multiple_up_to").is_some() {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Receives batches until `n` messages came.
async fn receive_n(consumer: &dyn Consumer, n: usize) -> Vec<Message> {
    let mut got = Vec::new();
    while got.len() < n {
        let batch = consumer.receive_batch(n, EXPECT).await.unwrap();
        assert!(!batch.is_empty(), "{} of {n} came", got.len());
        got.extend(batch);
    }
    got
}

fn texts(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect()
}

/// `acknowledge_batch` and `negative_acknowledge_batch` send one frame with `multiple` where the
/// batch is every open delivery up to its highest tag, and a frame per delivery otherwise; a
/// second acknowledgement of a delivery a `multiple` frame settled sends nothing (the broker
/// would close the channel for an unknown tag). A new consumer of the subscription then finds
/// nothing left. The current-thread runtime keeps the consumer's trace events on the thread the
/// counting layer watches.
#[tokio::test(flavor = "current_thread")]
async fn batches_are_settled_with_multiple_only_where_exact() {
    use tracing_subscriber::layer::SubscriberExt;
    let Some(backend) = connect("").await else {
        return;
    };
    let multiple = MultipleFrames::default();
    let _watch =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(multiple.clone()));
    let name = unique("multiple");
    let topic = Topic::new(Qos::Q1, "conf", "flow", &name).unwrap();
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .unwrap();
    // a bad key anywhere refuses the whole batch before anything is published
    let err = producer
        .send_batch(vec![
            OutboundMessage::new("never"),
            OutboundMessage::new("k").key("k".repeat(256)),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let batch = (0..8)
        .map(|i| OutboundMessage::new(i.to_string()))
        .collect();
    for receipt in producer.send_batch(batch).await.unwrap() {
        receipt.await.unwrap();
    }
    let got = receive_n(&*consumer, 8).await;
    assert_eq!(texts(&got), ["0", "1", "2", "3", "4", "5", "6", "7"]);
    consumer.acknowledge_batch(&got[..3]).await.unwrap();
    assert_eq!(multiple.count(), 1, "0..=2 is every open delivery up to 2");
    consumer.acknowledge_batch(&got[4..6]).await.unwrap();
    assert_eq!(multiple.count(), 1, "3 is open below 4 and 5");
    // settled by the multiple frame: nothing is sent, the channel stays open
    consumer.acknowledge(&got[1]).await.unwrap();
    consumer.acknowledge_batch(&got[..2]).await.unwrap();
    // 3 and 6 are every open delivery up to 6 (7 is above)
    consumer
        .negative_acknowledge_batch(&[got[3].clone(), got[6].clone()])
        .await
        .unwrap();
    assert_eq!(multiple.count(), 2, "one nack for 3 and 6");
    consumer.acknowledge_batch(&got[7..]).await.unwrap();
    let mut again = receive_n(&*consumer, 2).await;
    again.sort_by_key(|m| m.payload().clone());
    assert_eq!(texts(&again), ["3", "6"], "the nacked ones came back");
    consumer.acknowledge_batch(&again).await.unwrap();
    assert_eq!(multiple.count(), 3, "the redeliveries are all that is open");
    let left = consumer
        .receive_batch(10, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(texts(&left), Vec::<String>::new(), "nothing else came");
    consumer.close().await.unwrap();
    let next = backend
        .create_consumer(&topic, ConsumerOptions::new("s"))
        .await
        .unwrap();
    let left = next
        .receive_batch(10, Duration::from_millis(700))
        .await
        .unwrap();
    assert_eq!(
        texts(&left),
        Vec::<String>::new(),
        "everything was acknowledged"
    );
    next.unsubscribe().await.unwrap();
    support::delete_exchanges(&url(), &[format!("conf.flow.{name}")]).await;
    backend.close().await.unwrap();
}
