//! The in-memory backend.

use std::borrow::Cow;
use std::sync::Arc;

use tg_backend_api::kit::{BackendConfig, Feature, Lifecycle, RawBackend};
use tg_backend_api::{Capabilities, ConsumerOptions, ProducerOptions, Qos, Result, Topic};

use crate::config::MemoryConfig;
use crate::consumer::MemoryConsumer;
use crate::core::Core;
use crate::producer::MemoryProducer;

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
    core: Arc<Core>,
}

impl MemoryBackend {
    /// A fresh broker with the default configuration.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A fresh broker with this configuration.
    pub fn with_config(config: MemoryConfig) -> Self {
        Self {
            core: Arc::new(Core::new(config)),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MemoryConfig {
        &self.core.config
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl RawBackend for MemoryBackend {
    type Producer = MemoryProducer;
    type Consumer = MemoryConsumer;

    const NAME: &'static str = "memory";

    fn lifecycle(&self) -> &Lifecycle {
        &self.core.life
    }

    fn caps(&self, qos: Qos) -> Capabilities {
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
        caps.max_payload = self.core.config.max_payload;
        caps
    }

    fn why_not(&self, _qos: Qos, feature: Feature) -> Cow<'static, str> {
        match feature {
            Feature::Retained => {
                "the memory backend keeps no retained messages; use a q1 topic and Earliest".into()
            }
            Feature::Earliest => "q0 topics retain nothing".into(),
            Feature::Consumer(t) => format!("the memory backend has no {t} consumers").into(),
        }
    }

    async fn open_producer(
        &self,
        topic: &Topic,
        _options: &ProducerOptions,
    ) -> Result<MemoryProducer> {
        Ok(MemoryProducer::new(
            self.core.clone(),
            self.core.topic(topic),
        ))
    }

    async fn open_consumer(
        &self,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<MemoryConsumer> {
        let state = self.core.topic(topic);
        let sub = state.attach(
            &options.subscription,
            id,
            options.consumer_type,
            options.initial_position,
        )?;
        Ok(MemoryConsumer::new(id, state, sub))
    }

    async fn remove_topic(&self, topic: &Topic) -> Result<()> {
        self.core.remove_topic(topic);
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        self.core.wake_all();
        Ok(())
    }
}

impl BackendConfig for MemoryConfig {
    type Backend = MemoryBackend;

    async fn connect(self) -> Result<MemoryBackend> {
        Ok(MemoryBackend::with_config(self))
    }
}
