//! The MQTT backend.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tg_backend_api::kit::{BackendConfig, Feature, Lifecycle, RawBackend};
use tg_backend_api::{
    Capabilities, ConsumerOptions, ConsumerType, Error, ErrorKind, ProducerOptions, Qos, Result,
    Topic,
};

use crate::config::MqttConfig;
use crate::consumer::MqttConsumer;
use crate::core::Core;
use crate::producer::MqttProducer;

/// How long the backend's close waits for the broker to confirm what its producers sent.
const SHUTDOWN_FLUSH_LIMIT: Duration = Duration::from_secs(5);

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
    core: Arc<Core>,
}

impl MqttBackend {
    /// Connects the backend's producer connection; fails with `Connection` (unreachable
    /// broker), `Auth` (refused credentials) or `ConfigInvalid`, naming the broker.
    pub async fn connect(config: MqttConfig) -> Result<Self> {
        Ok(Self {
            core: Arc::new(Core::connect(config).await?),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MqttConfig {
        &self.core.config
    }
}

// Here rather than in config.rs, so that config.rs imports nothing of the crate.
impl BackendConfig for MqttConfig {
    type Backend = MqttBackend;

    async fn connect(self) -> Result<MqttBackend> {
        MqttBackend::connect(self).await
    }
}

impl RawBackend for MqttBackend {
    type Producer = MqttProducer;
    type Consumer = MqttConsumer;

    const NAME: &'static str = "mqtt";

    fn lifecycle(&self) -> &Lifecycle {
        &self.core.life
    }

    fn caps(&self, qos: Qos) -> Capabilities {
        let mut caps = Capabilities::NONE;
        let confirmed = qos != Qos::Q0;
        caps.ordered = true;
        caps.shared = true;
        caps.retained = true;
        caps.acknowledgement = confirmed;
        caps.nack_redelivery = confirmed;
        caps.redelivery_count = confirmed;
        caps.deduplication = qos == Qos::Q2;
        caps.max_payload = self.core.max_payload();
        caps
    }

    fn why_not(&self, _qos: Qos, feature: Feature) -> Cow<'static, str> {
        match feature {
            Feature::Consumer(ConsumerType::Exclusive) => {
                "MQTT has no exclusive subscriptions: a broker cannot refuse a second subscriber \
                 of a topic, and taking over a client id disconnects the first consumer instead \
                 of refusing the second; use a shared consumer"
                    .into()
            }
            Feature::Consumer(ConsumerType::Failover) => {
                "MQTT has no failover subscriptions: shared subscriptions spread messages over \
                 every consumer, and nothing in MQTT 5 elects one active consumer; use a shared \
                 consumer"
                    .into()
            }
            Feature::Earliest => {
                "MQTT keeps no message history (retained messages are delivered either way)".into()
            }
            other => format!("the MQTT backend has no {other}").into(),
        }
    }

    async fn remove_topic(&self, topic: &Topic) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the MQTT backend cannot delete topic {topic}: MQTT has no topic objects; a broker \
                 keeps messages only in the sessions of subscriptions (`unsubscribe` ends one) and \
                 in a retained message (send an empty retained message to clear it)"
            ),
        ))
    }

    async fn open_producer(
        &self,
        topic: &Topic,
        options: &ProducerOptions,
    ) -> Result<MqttProducer> {
        Ok(MqttProducer::new(
            topic,
            self.core.clone(),
            options.send_timeout,
        ))
    }

    async fn open_consumer(
        &self,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<MqttConsumer> {
        MqttConsumer::open(self.core.clone(), topic, options, id).await
    }

    async fn probe(&self) -> Result<()> {
        let producer = &self.core.producer;
        if producer.is_connected() {
            Ok(())
        } else {
            Err(producer.status_error())
        }
    }

    /// Every consumer has closed (handing its held messages back through the producer
    /// connection): flush that connection and close it.
    async fn shutdown(&self) -> Result<()> {
        let producer = &self.core.producer;
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH_LIMIT, producer.flush()).await;
        producer.close().await;
        Ok(())
    }
}

impl fmt::Debug for MqttBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttBackend")
            .field("broker", &self.core.config.redacted_url())
            .field("producer_client_id", &self.core.producer.client_id())
            .field("closed", &self.core.life.is_closed())
            .finish()
    }
}
