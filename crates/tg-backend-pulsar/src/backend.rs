//! The Pulsar backend: what it offers per quality of service, and where producers and consumers
//! come from.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use pulsar::{Pulsar, TokioExecutor};
use tg_backend_api::kit::{BackendConfig, Feature, Lifecycle, RawBackend};
use tg_backend_api::{
    Capabilities, ConsumerOptions, Error, ErrorKind, ProducerOptions, Qos, Result, Topic,
};

use crate::config::PulsarConfig;
use crate::consumer::PulsarConsumer;
use crate::core::Core;
use crate::producer::PulsarProducer;

/// A connection to one Pulsar cluster (see the crate docs for the mapping).
///
/// Clones share the connection.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::time::Duration;
/// use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage};
/// use tg_backend_pulsar::{PulsarBackend, PulsarConfig};
///
/// let backend = PulsarBackend::connect(PulsarConfig::from_env()?).await?;
/// let topic = tg_backend_api::Topic::parse("q1/tg/flow/tasks")?; // persistent://tg/flow/tasks
/// let consumer = backend.create_consumer(&topic, ConsumerOptions::new("workers")).await?;
/// let producer = backend.create_producer(&topic, Default::default()).await?;
/// producer.send(OutboundMessage::new("job-1")).await?.await?;
/// let msg = consumer.receive(Duration::from_secs(1)).await?;
/// consumer.acknowledge(&msg).await?;
/// backend.close().await
/// # }
/// ```
#[derive(Clone)]
pub struct PulsarBackend {
    core: Arc<Core>,
}

impl PulsarBackend {
    /// Connects to the broker, failing within [`PulsarConfig::connect_timeout`] with
    /// [`ErrorKind::Connection`](tg_backend_api::ErrorKind::Connection) (unreachable) or
    /// [`ErrorKind::Auth`](tg_backend_api::ErrorKind::Auth) (token refused); the error names the
    /// server, never the token. Once connected, the client reconnects by itself after the
    /// connection breaks (e.g. a broker restart), and producers and consumers resume.
    pub async fn connect(config: PulsarConfig) -> Result<Self> {
        Ok(Self {
            core: Arc::new(Core::connect(config).await?),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PulsarConfig {
        &self.core.config
    }

    /// The underlying `pulsar` client of this backend's producers, for what tg-pubsub does not
    /// cover (readers, lookups). Producers and consumers made from it are not tracked by
    /// [`Backend::close`](tg_backend_api::Backend::close).
    pub fn client(&self) -> &Pulsar<TokioExecutor> {
        &self.core.client
    }
}

impl fmt::Debug for PulsarBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PulsarBackend")
            .field("server", &self.core.server)
            .field("closed", &self.core.life.is_closed())
            .finish_non_exhaustive()
    }
}

impl RawBackend for PulsarBackend {
    type Producer = PulsarProducer;
    type Consumer = PulsarConsumer;

    const NAME: &'static str = "pulsar";

    fn lifecycle(&self) -> &Lifecycle {
        &self.core.life
    }

    fn caps(&self, qos: Qos) -> Capabilities {
        let mut caps = Capabilities::NONE;
        caps.max_payload = self.core.config.max_payload;
        caps.ordered = true;
        caps.shared = true;
        caps.exclusive = true;
        caps.failover = true;
        if qos == Qos::Q0 {
            // non-persistent topics: delivered to the consumers connected now, never stored,
            // never redelivered
            return caps;
        }
        caps.persistent = true;
        caps.durable_subscriptions = true;
        caps.earliest = true;
        caps.nack_redelivery = true;
        // the broker sends the count (CommandMessage.redelivery_count) but the pulsar crate does
        // not hand it to consumers
        caps.redelivery_count = false;
        caps.redeliver_unacked_on_close = true;
        caps.acknowledgement = true;
        caps.deduplication = qos == Qos::Q2 && self.core.config.dedup_capacity > 0;
        caps
    }

    fn why_not(&self, qos: Qos, feature: Feature) -> Cow<'static, str> {
        match feature {
            Feature::Retained => "Pulsar has no retained messages; a consumer that needs the \
                                  last value can subscribe with InitialPosition::Earliest on a \
                                  q1 topic"
                .into(),
            Feature::Earliest => "non-persistent (q0) Pulsar topics keep nothing".into(),
            Feature::Consumer(t) => {
                format!("the Pulsar backend has no {t} consumers on {qos} topics").into()
            }
        }
    }

    async fn remove_topic(&self, topic: &Topic) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the Pulsar backend cannot delete topic {topic}: the binary protocol has no topic \
                 deletion (the admin REST API does); `unsubscribe` deletes a subscription"
            ),
        ))
    }

    async fn open_producer(
        &self,
        topic: &Topic,
        options: &ProducerOptions,
    ) -> Result<PulsarProducer> {
        PulsarProducer::create(self.core.clone(), topic.clone(), options).await
    }

    async fn open_consumer(
        &self,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<PulsarConsumer> {
        PulsarConsumer::create(self.core.clone(), topic.clone(), options, id).await
    }

    async fn probe(&self) -> Result<()> {
        self.core
            .bounded(
                "Pulsar did not answer a topic lookup",
                self.core
                    .client
                    .lookup_topic("non-persistent://public/default/tg-pubsub-ping"),
            )
            .await
            .map(drop)
    }
}

impl BackendConfig for PulsarConfig {
    type Backend = PulsarBackend;

    async fn connect(self) -> Result<PulsarBackend> {
        PulsarBackend::connect(self).await
    }
}
