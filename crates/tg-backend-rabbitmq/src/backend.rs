//! The RabbitMQ backend.

use std::borrow::Cow;
use std::sync::Arc;

use tg_backend_api::kit::{Feature, Lifecycle, RawBackend};
use tg_backend_api::{
    Capabilities, ConsumerOptions, ConsumerType, Error, ErrorKind, ProducerOptions, Qos, Result,
    Topic,
};
use tokio::time::Instant;

use crate::config::{QueueType, RabbitConfig};
use crate::consumer::RabbitConsumer;
use crate::core::Core;
use crate::producer::RabbitProducer;

/// tg-pubsub over RabbitMQ, wire-compatible with the Python framework's RabbitMQ deployments.
/// Clones share the connections.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> tg_backend_api::Result<()> {
/// use std::time::Duration;
/// use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage};
/// use tg_backend_rabbitmq::{RabbitBackend, RabbitConfig};
///
/// let backend = RabbitBackend::connect(RabbitConfig::from_url("amqp://guest:guest@localhost:5672/%2f")?).await?;
/// let topic = tg_backend_api::topic("tasks")?; // exchange tg.flow.tasks
/// let consumer = backend.create_consumer(&topic, ConsumerOptions::new("workers")).await?;
/// let producer = backend.create_producer(&topic, Default::default()).await?;
/// producer.send(OutboundMessage::new("job-1")).await?.await?; // confirmed by the broker
/// let msg = consumer.receive(Duration::from_secs(1)).await?;
/// consumer.acknowledge(&msg).await?;
/// backend.close().await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RabbitBackend {
    core: Arc<Core>,
}

impl RabbitBackend {
    /// Connects (both connections), failing with `Connection` when the broker does not answer
    /// within `connect_timeout` and `Auth` when it refuses the login or the vhost.
    pub async fn connect(config: RabbitConfig) -> Result<Self> {
        let core = Arc::new(Core::new(config));
        core.producers.start().await?;
        core.consumers.start().await?;
        tracing::debug!(server = %core.producers.server(), "RabbitMQ backend connected");
        Ok(Self { core })
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.core.config
    }
}

impl RawBackend for RabbitBackend {
    type Producer = RabbitProducer;
    type Consumer = RabbitConsumer;

    const NAME: &'static str = "rabbitmq";

    fn lifecycle(&self) -> &Lifecycle {
        &self.core.life
    }

    fn caps(&self, qos: Qos) -> Capabilities {
        let persistent = qos.is_persistent();
        let quorum = persistent && self.core.config.options.queue_type == QueueType::Quorum;
        let mut caps = Capabilities::NONE;
        caps.persistent = persistent;
        caps.durable_subscriptions = persistent;
        caps.ordered = true;
        caps.shared = true;
        // quorum queues accept an exclusive consume without enforcing it
        caps.exclusive = !quorum;
        caps.failover = true;
        caps.nack_redelivery = true;
        caps.redelivery_count = quorum;
        caps.redeliver_unacked_on_close = persistent;
        caps.deduplication = qos == Qos::Q2;
        caps.acknowledgement = true;
        caps.max_payload = self.core.config.options.max_payload;
        caps
    }

    fn why_not(&self, qos: Qos, feature: Feature) -> Cow<'static, str> {
        match feature {
            Feature::Retained => "RabbitMQ keeps no retained messages: `retain(true)` is refused; \
                use a q1 topic and read the last message yourself"
                .into(),
            Feature::Earliest => format!(
                "a RabbitMQ queue starts empty when its subscription is created and the exchange keeps \
                 nothing, so there is nothing to replay on {qos} topics"
            )
            .into(),
            Feature::Consumer(ConsumerType::Exclusive) => format!(
                "RabbitMQ quorum queues (queue_type=quorum) do not enforce exclusive consumers, so \
                 {qos} topics have none; use Failover, or queue_type=classic"
            )
            .into(),
            Feature::Consumer(t) => {
                format!("the RabbitMQ backend has no {t} consumers on {qos} topics").into()
            }
        }
    }

    async fn remove_topic(&self, topic: &Topic) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the RabbitMQ backend cannot delete topic {topic}: AMQP 0-9-1 cannot list the \
                 queues bound to its exchange; `unsubscribe` deletes a subscription's queue"
            ),
        ))
    }

    async fn open_producer(
        &self,
        topic: &Topic,
        options: &ProducerOptions,
    ) -> Result<RabbitProducer> {
        RabbitProducer::open(self.core.clone(), topic, options.send_timeout).await
    }

    async fn open_consumer(
        &self,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<RabbitConsumer> {
        RabbitConsumer::open(self.core.clone(), topic, options, id).await
    }

    async fn probe(&self) -> Result<()> {
        let deadline = Instant::now() + self.core.config.options.connect_timeout;
        let (channel, _) = self.core.producers.channel(deadline).await?;
        let limit = self.core.producers.op_timeout();
        let _ = crate::connection::bounded(
            limit,
            "closing a channel",
            channel.close(200, "probe".into()),
        )
        .await;
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        self.core.producers.close().await;
        self.core.consumers.close().await;
        Ok(())
    }
}
