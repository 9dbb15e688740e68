//! The in-memory backend.

use std::sync::Arc;

use async_trait::async_trait;
use tg_backend_api::{
    next_consumer_id, Backend, Capabilities, Consumer, ConsumerOptions, InitialPosition, Producer,
    ProducerOptions, Qos, Result, Topic,
};

use crate::config::MemoryConfig;
use crate::consumer::MemoryConsumer;
use crate::producer::MemoryProducer;
use crate::topic::Broker;

/// An in-process broker. Clones share the same broker; [`MemoryBackend::new`] makes a fresh one.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::time::Duration;
/// use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage};
/// use tg_backend_memory::MemoryBackend;
///
/// let backend = MemoryBackend::new();
/// let topic = tg_backend_api::topic("tasks")?;
/// let consumer = backend.create_consumer(&topic, ConsumerOptions::new("workers")).await?;
/// let producer = backend.create_producer(&topic, Default::default()).await?;
/// producer.send(OutboundMessage::new("job-1")).await?.await?;
/// let msg = consumer.receive(Duration::from_secs(1)).await?;
/// consumer.acknowledge(&msg).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    broker: Arc<Broker>,
}

impl MemoryBackend {
    /// The name `PUBSUB_BACKEND` uses for this backend.
    pub const NAME: &'static str = "memory";

    /// A fresh broker with the default configuration.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A fresh broker with this configuration.
    pub fn with_config(config: MemoryConfig) -> Self {
        Self {
            broker: Arc::new(Broker::new(config)),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MemoryConfig {
        &self.broker.config
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn capabilities(&self, qos: Qos) -> Capabilities {
        let mut caps = Capabilities::NONE;
        caps.durable_subscriptions = qos.is_persistent();
        caps.earliest = qos.is_persistent();
        caps.deduplication = qos == Qos::Q2;
        caps.ordered = true;
        caps.shared = true;
        caps.exclusive = true;
        caps.failover = true;
        caps.nack_redelivery = true;
        caps.redelivery_count = true;
        caps.redeliver_unacked_on_close = true;
        caps.acknowledgement = true;
        caps.max_payload = self.broker.config.max_payload;
        caps
    }

    async fn create_producer(
        &self,
        topic: &Topic,
        _options: ProducerOptions,
    ) -> Result<Box<dyn Producer>> {
        self.broker.check_open()?;
        let state = self.broker.topic(topic);
        Ok(Box::new(MemoryProducer::new(self.broker.clone(), state)))
    }

    async fn create_consumer(
        &self,
        topic: &Topic,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        options.validate()?;
        self.broker.check_open()?;
        if options.initial_position == InitialPosition::Earliest && !topic.qos().is_persistent() {
            tracing::debug!(%topic, "q0 topics retain nothing: Earliest behaves as Latest");
        }
        let state = self.broker.topic(topic);
        let id = next_consumer_id();
        let sub = state.attach(
            &options.subscription,
            id,
            options.consumer_type,
            options.initial_position,
        )?;
        Ok(Box::new(MemoryConsumer::new(
            id,
            self.broker.clone(),
            state,
            sub,
        )))
    }

    async fn ping(&self) -> Result<()> {
        self.broker.check_open()
    }

    async fn close(&self) -> Result<()> {
        self.broker.close();
        Ok(())
    }
}
