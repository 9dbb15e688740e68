//! The Kafka backend: what it guarantees per quality of service, and opening producers and
//! consumers on the shared [`Core`].

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use tg_backend_api::kit::{BackendConfig, Feature, Lifecycle, RawBackend};
use tg_backend_api::{
    Capabilities, ConsumerOptions, ConsumerType, Error, ProducerOptions, Qos, Result, Topic,
};

use crate::config::KafkaConfig;
use crate::consumer::KafkaConsumer;
use crate::core::Core;
use crate::delivery::Kind;
use crate::member::{Member, Settings};
use crate::producer::KafkaProducer;
use crate::topic;

/// A connection to one Kafka cluster (see the crate docs for the mapping). Clones share it.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::time::Duration;
/// use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage};
/// use tg_backend_kafka::{KafkaBackend, KafkaConfig};
///
/// let backend = KafkaBackend::connect(KafkaConfig::from_url("kafka://127.0.0.1:9092")?).await?;
/// let topic = tg_backend_api::Topic::parse("q1/tg/flow/tasks")?;
/// let consumer = backend.create_consumer(&topic, ConsumerOptions::new("workers")).await?;
/// let producer = backend.create_producer(&topic, Default::default()).await?;
/// producer.send(OutboundMessage::new("job-1")).await?.await?;
/// let msg = consumer.receive(Duration::from_secs(5)).await?;
/// consumer.acknowledge(&msg).await?;
/// backend.close().await
/// # }
/// ```
#[derive(Clone)]
pub struct KafkaBackend {
    core: Arc<Core>,
}

impl KafkaBackend {
    /// The name `PUBSUB_BACKEND` uses for this backend.
    pub const NAME: &'static str = "kafka";

    /// Connects: creates the admin client and checks within
    /// [`connect_timeout`](crate::KafkaOptions::connect_timeout) that a broker answers, failing
    /// with [`ErrorKind::Connection`](tg_backend_api::ErrorKind::Connection) (unreachable) or
    /// [`ErrorKind::Auth`](tg_backend_api::ErrorKind::Auth) (credentials refused); the error
    /// names the brokers, never the password.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        Ok(Self {
            core: Core::connect(config).await?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.core.config
    }
}

impl BackendConfig for KafkaConfig {
    type Backend = KafkaBackend;

    async fn connect(self) -> Result<KafkaBackend> {
        KafkaBackend::connect(self).await
    }
}

impl fmt::Debug for KafkaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBackend")
            .field("core", &self.core)
            .finish()
    }
}

/// What the backend guarantees for topics of `qos`.
fn capabilities(config: &KafkaConfig, qos: Qos) -> Capabilities {
    let one_partition = config.options.partitions == 1;
    let mut caps = Capabilities::NONE;
    caps.persistent = qos.is_persistent();
    caps.durable_subscriptions = true;
    caps.ordered = one_partition;
    caps.shared = !one_partition;
    caps.failover = true;
    caps.earliest = true;
    caps.nack_redelivery = true;
    caps.redeliver_unacked_on_close = true;
    caps.deduplication = qos == Qos::Q2;
    caps.acknowledgement = true;
    caps.max_payload = config.options.max_payload;
    caps
}

impl RawBackend for KafkaBackend {
    type Producer = KafkaProducer;
    type Consumer = KafkaConsumer;

    const NAME: &'static str = KafkaBackend::NAME;

    fn lifecycle(&self) -> &Lifecycle {
        &self.core.life
    }

    fn caps(&self, qos: Qos) -> Capabilities {
        capabilities(&self.core.config, qos)
    }

    fn why_not(&self, _qos: Qos, feature: Feature) -> Cow<'static, str> {
        match feature {
            Feature::Retained => "Kafka keeps no retained message per topic; use a q1 topic and \
                                  an Earliest subscription to replay what the topic retains"
                .into(),
            Feature::Consumer(ConsumerType::Exclusive) => {
                "a Kafka consumer group cannot refuse a member: a second consumer joins and \
                 waits for a partition; use Failover (one active member per partition)"
                    .into()
            }
            other => format!("the Kafka backend has no {other}").into(),
        }
    }

    async fn remove_topic(&self, topic: &Topic) -> Result<()> {
        self.core.delete_topic(&topic::kafka_topic(topic)?).await
    }

    async fn open_producer(
        &self,
        topic: &Topic,
        options: &ProducerOptions,
    ) -> Result<KafkaProducer> {
        let kafka_topic = topic::kafka_topic(topic)?;
        self.core.ensure_topic(&kafka_topic, topic.qos()).await?;
        let config = &self.core.config.options;
        let all_replicas = topic.qos().is_persistent();
        let timeout = options.send_timeout.unwrap_or(config.send_timeout);
        let kind = Kind {
            all_replicas,
            idempotent: all_replicas && config.idempotence,
            timeout,
            linger: if options.batching == Some(false) {
                std::time::Duration::ZERO
            } else {
                config.batch_delay
            },
        };
        let client = self.core.client(kind)?;
        Ok(KafkaProducer::new(
            client,
            topic.clone(),
            kafka_topic,
            timeout,
        ))
    }

    async fn open_consumer(
        &self,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<KafkaConsumer> {
        let kafka_topic = topic::kafka_topic(topic)?;
        let private = topic::private_groups(topic);
        let config = &self.core.config;
        let one_partition = config.options.partitions == 1;
        let claim = if one_partition && !private && options.consumer_type == ConsumerType::Shared {
            let claim = self.core.claim(&kafka_topic, &options.subscription);
            if claim.is_none() {
                return Err(Error::unsupported(format!(
                    "subscription {:?} of {topic} already has its consumer in this backend: with one \
                     partition per topic (partitions=1) a Kafka consumer group gives it to one member, \
                     so a second one would only stand by; use Failover consumers for stand-bys, or \
                     topics with more partitions for consumers that share the work",
                    options.subscription
                ))
                .with_context("topic", topic)
                .with_context("subscription", &options.subscription));
            }
            claim
        } else {
            None
        };
        self.core.ensure_topic(&kafka_topic, topic.qos()).await?;
        let group = topic::group_id(topic, &options.subscription);
        let settings = Settings {
            topic: kafka_topic,
            group: group.clone(),
            position: options.initial_position,
            private,
            request_timeout: config.options.connect_timeout,
            commit_interval: config.options.commit_interval,
            commit_batch: config.options.commit_batch,
            receiver_queue: config.options.receiver_queue,
            dedup: (topic.qos() == Qos::Q2)
                .then_some((config.options.dedup_window, config.options.dedup_capacity)),
        };
        let member = Member::join(
            config.consumer_config(),
            settings,
            config.options.join_timeout,
            self.core.life.token(),
        )
        .await
        .map_err(|e| {
            e.with_context("topic", topic)
                .with_context("subscription", &options.subscription)
        })?;
        Ok(KafkaConsumer::new(id, member, topic.clone(), group, claim))
    }

    async fn probe(&self) -> Result<()> {
        self.core.probe().await
    }

    async fn shutdown(&self) -> Result<()> {
        self.core.shutdown().await;
        Ok(())
    }
}
