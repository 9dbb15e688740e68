//! The MQTT backend.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::v5::Filter;
use tg_backend_api::{
    next_consumer_id, Backend, Capabilities, Consumer, ConsumerOptions, ConsumerType, Error,
    InitialPosition, Message, Producer, ProducerOptions, Qos, Result, Topic,
};
use tokio::sync::mpsc;

use crate::config::MqttConfig;
use crate::connection::{Connection, ConnectionSpec, PACKET_HEADROOM};
use crate::consumer::{ConsumerCore, MqttConsumer};
use crate::producer::MqttProducer;
use crate::topic::{
    consumer_client_id, mqtt_qos, mqtt_topic, producer_client_id, redeliver_topic, share_filter,
};

/// A connection to an MQTT 5 broker. Clones share the connection.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::time::Duration;
/// use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage};
/// use tg_backend_mqtt::{MqttBackend, MqttConfig};
///
/// let backend = MqttBackend::connect(MqttConfig::from_url("mqtt://127.0.0.1:1883")?).await?;
/// let topic = tg_backend_api::Topic::parse("q1/tg/flow/tasks")?;
/// let consumer = backend.create_consumer(&topic, ConsumerOptions::new("workers")).await?;
/// let producer = backend.create_producer(&topic, Default::default()).await?;
/// producer.send(OutboundMessage::new("job-1")).await?.await?;
/// let msg = consumer.receive(Duration::from_secs(1)).await?;
/// consumer.acknowledge(&msg).await?;
/// backend.close().await
/// # }
/// ```
#[derive(Clone)]
pub struct MqttBackend {
    inner: Arc<Inner>,
}

/// A q1/q2 consumer's buffer, in multiples of `receive_maximum`. A broker that keeps to Receive
/// Maximum never fills more than one of them. Mosquitto 2.0.11 does not keep to it: it sends a
/// consumer with a backlog everything it holds for it, which with its default
/// `max_queued_messages` (1,000) is up to about 1,100 messages; 20 × the default 100 takes that
/// without refusing (refusing means resuming the session, see `ConsumerCore::deliver`).
const Q12_BUFFER_FACTOR: usize = 20;

pub(crate) struct Inner {
    config: MqttConfig,
    producer: Arc<Connection>,
    consumers: Mutex<HashMap<u64, Weak<MqttConsumer>>>,
    closed: AtomicBool,
    earliest_warned: AtomicBool,
}

impl Inner {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn producer(&self) -> Result<&Arc<Connection>> {
        if self.is_closed() {
            return Err(Error::closed("MQTT backend"));
        }
        Ok(&self.producer)
    }

    /// The payload limit: the configured one, lowered to fit the broker's Maximum Packet Size.
    pub(crate) fn max_payload(&self) -> usize {
        let broker = self.producer.broker_max_packet();
        let headroom = PACKET_HEADROOM.min(broker / 4);
        self.config.max_payload.min(broker - headroom)
    }

    pub(crate) fn forget_consumer(&self, id: u64) {
        self.consumers.lock().remove(&id);
    }
}

impl MqttBackend {
    /// The name `PUBSUB_BACKEND` uses for this backend.
    pub const NAME: &'static str = "mqtt";

    /// Connects the backend's producer connection; fails with `Connection` (unreachable
    /// broker), `Auth` (refused credentials) or `ConfigInvalid`, naming the broker.
    pub async fn connect(config: MqttConfig) -> Result<Self> {
        config.validate()?;
        let spec = ConnectionSpec {
            client_id: producer_client_id(&config.client_id_prefix),
            session_expiry: None,
            consumer: None,
        };
        let producer = Connection::open(&config, spec).await?;
        tracing::debug!(broker = %config.redacted_url(), client_id = producer.client_id(), "MQTT backend connected");
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer,
                consumers: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
                earliest_warned: AtomicBool::new(false),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MqttConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Backend for MqttBackend {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn capabilities(&self, qos: Qos) -> Capabilities {
        let mut caps = Capabilities::NONE;
        let confirmed = qos != Qos::Q0;
        caps.ordered = true;
        caps.shared = true;
        caps.retained = true;
        caps.acknowledgement = confirmed;
        caps.nack_redelivery = confirmed;
        caps.redelivery_count = confirmed;
        caps.deduplication = qos == Qos::Q2;
        caps.max_payload = self.inner.max_payload();
        caps
    }

    async fn create_producer(
        &self,
        topic: &Topic,
        options: ProducerOptions,
    ) -> Result<Box<dyn Producer>> {
        let conn = self.inner.producer()?.clone();
        Ok(Box::new(MqttProducer::new(
            topic.clone(),
            conn,
            self.inner.clone(),
            options.send_timeout,
        )))
    }

    async fn create_consumer(
        &self,
        topic: &Topic,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        options.validate()?;
        if self.inner.is_closed() {
            return Err(Error::closed("MQTT backend"));
        }
        match options.consumer_type {
            ConsumerType::Shared => {}
            ConsumerType::Exclusive => {
                return Err(Error::unsupported(
                    "MQTT has no exclusive subscriptions: a broker cannot refuse a second \
                     subscriber of a topic, and taking over a client id disconnects the first \
                     consumer instead of refusing the second; use a shared consumer",
                )
                .with_context("subscription", &options.subscription))
            }
            ConsumerType::Failover => {
                return Err(Error::unsupported(
                    "MQTT has no failover subscriptions: shared subscriptions spread messages \
                     over every consumer, and nothing in MQTT 5 elects one active consumer; \
                     use a shared consumer",
                )
                .with_context("subscription", &options.subscription))
            }
        }
        if options.initial_position == InitialPosition::Earliest
            && !self.inner.earliest_warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                %topic, subscription = %options.subscription,
                "MQTT keeps no message history: InitialPosition::Earliest behaves as Latest \
                 (retained messages are delivered either way); logged once"
            );
        }
        let config = &self.inner.config;
        let id = next_consumer_id();
        let mqtt = mqtt_topic(topic);
        let redeliver = redeliver_topic(topic, &options.subscription);
        // q1/q2: room for what a broker that exceeds Receive Maximum sends (see
        // `Q12_BUFFER_FACTOR`); q0 drops what does not fit.
        let factor = if topic.qos() == Qos::Q0 {
            2
        } else {
            Q12_BUFFER_FACTOR
        };
        let capacity = usize::from(config.receive_maximum) * factor;
        let (tx, rx) = mpsc::channel::<Message>(capacity);
        let core = Arc::new(ConsumerCore::new(
            id,
            topic.qos(),
            mqtt.clone(),
            redeliver.clone(),
            config.dedup_window,
            tx,
        ));
        let persistent = topic.qos() != Qos::Q0;
        let spec = ConnectionSpec {
            client_id: consumer_client_id(
                &config.client_id_prefix,
                &options.subscription,
                options.consumer_name.as_deref(),
            ),
            session_expiry: persistent
                .then(|| config.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32),
            consumer: Some(core.clone()),
        };
        let conn = Connection::open(config, spec).await?;
        let qos = mqtt_qos(topic.qos());
        let mut filters = vec![Filter::new(share_filter(&options.subscription, &mqtt), qos)];
        if persistent {
            filters.push(Filter::new(
                share_filter(&options.subscription, &redeliver),
                qos,
            ));
        }
        core.set_filters(filters.clone());
        if let Err(e) = conn.subscribe(filters).await {
            conn.close().await;
            return Err(e
                .with_context("topic", topic)
                .with_context("subscription", &options.subscription));
        }
        let consumer = Arc::new(MqttConsumer::new(
            core,
            conn,
            self.inner.clone(),
            topic.clone(),
            options.subscription.clone(),
            options.consumer_name.is_some(),
            rx,
        ));
        self.inner
            .consumers
            .lock()
            .insert(consumer.id(), Arc::downgrade(&consumer));
        Ok(Box::new(ConsumerBox(consumer)))
    }

    async fn ping(&self) -> Result<()> {
        let producer = self.inner.producer()?;
        if producer.is_connected() {
            Ok(())
        } else {
            Err(producer.status_error())
        }
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let consumers: Vec<Arc<MqttConsumer>> = self
            .inner
            .consumers
            .lock()
            .drain()
            .filter_map(|(_, w)| w.upgrade())
            .collect();
        // Consumers hand their held messages back through the producer connection: close
        // them first.
        futures::future::join_all(consumers.iter().map(|c| c.close_from_backend())).await;
        self.inner.closed.store(true, Ordering::Release);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.producer.flush()).await;
        self.inner.producer.close().await;
        Ok(())
    }
}

impl fmt::Debug for MqttBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttBackend")
            .field("broker", &self.inner.config.redacted_url())
            .field("producer_client_id", &self.inner.producer.client_id())
            .field("closed", &self.inner.is_closed())
            .finish()
    }
}

/// What `create_consumer` hands out: the backend keeps a weak reference to close it.
#[derive(Debug)]
struct ConsumerBox(Arc<MqttConsumer>);

impl Drop for ConsumerBox {
    fn drop(&mut self) {
        // Dropped without close: close in the background (an anonymous consumer's session would
        // otherwise stay in the shared subscription and keep taking messages until it expires).
        if !self.0.is_closed() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let consumer = self.0.clone();
                runtime.spawn(async move { consumer.close_from_backend().await });
            }
        }
    }
}

#[async_trait]
impl Consumer for ConsumerBox {
    fn topic(&self) -> &Topic {
        self.0.topic()
    }

    fn subscription(&self) -> &str {
        self.0.subscription()
    }

    async fn receive(&self, timeout: Duration) -> Result<Message> {
        self.0.receive(timeout).await
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        self.0.acknowledge(message).await
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        self.0.negative_acknowledge(message).await
    }

    async fn unsubscribe(&self) -> Result<()> {
        self.0.unsubscribe().await
    }

    async fn close(&self) -> Result<()> {
        self.0.close().await
    }
}
