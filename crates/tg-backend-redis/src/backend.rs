//! The Redis backend: what it guarantees per quality of service, and opening producers and
//! consumers on the shared [`Core`].

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use tg_backend_api::kit::{BackendConfig, Feature, Lifecycle, RawBackend};
use tg_backend_api::{Capabilities, ConsumerOptions, ProducerOptions, Qos, Result, Topic};
use tokio::sync::OnceCell;

use crate::config::RedisConfig;
use crate::consumer::{Kind, RedisConsumer, StreamConsumer};
use crate::core::Core;
use crate::producer::RedisProducer;
use crate::q0::{PubSubHub, Q0Consumer};
use crate::topic::TopicKeys;

/// A connection to one Redis server (see the crate docs for the mapping).
///
/// Clones share the connections.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::time::Duration;
/// use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage};
/// use tg_backend_redis::{RedisBackend, RedisConfig};
///
/// let backend = RedisBackend::connect(RedisConfig::from_url("redis://127.0.0.1:6379")?).await?;
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
pub struct RedisBackend {
    core: Arc<Core>,
    /// The q0 pub/sub connection, opened with the first q0 consumer.
    hub: Arc<OnceCell<Arc<PubSubHub>>>,
}

impl RedisBackend {
    /// The name `PUBSUB_BACKEND` uses for this backend.
    pub const NAME: &'static str = "redis";

    /// Connects to the server, failing within [`RedisConfig::connect_timeout`] with
    /// [`ErrorKind::Connection`](tg_backend_api::ErrorKind::Connection) (unreachable) or
    /// [`ErrorKind::Auth`](tg_backend_api::ErrorKind::Auth) (credentials refused); the error
    /// names the server, never the password.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        Ok(Self {
            core: Arc::new(Core::connect(config).await?),
            hub: Arc::new(OnceCell::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.core.config
    }

    async fn hub(&self) -> Result<Arc<PubSubHub>> {
        self.hub
            .get_or_try_init(|| PubSubHub::connect(self.core.clone()))
            .await
            .cloned()
    }
}

impl BackendConfig for RedisConfig {
    type Backend = RedisBackend;

    async fn connect(self) -> Result<RedisBackend> {
        RedisBackend::connect(self).await
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("server", &self.core.server)
            .field("closed", &self.core.life.is_closed())
            .finish_non_exhaustive()
    }
}

/// What the backend guarantees for topics of `qos`.
fn capabilities(config: &RedisConfig, qos: Qos) -> Capabilities {
    let mut caps = Capabilities::NONE;
    // (queued records carry 32-bit lengths; Redis itself takes at most 512 MiB by default)
    caps.max_payload = config.max_payload.min(u32::MAX as usize);
    if qos == Qos::Q0 {
        // PUBLISH/SUBSCRIBE: whoever is subscribed now gets a copy, nothing is kept.
        caps.ordered = true;
        return caps;
    }
    caps.persistent = true;
    caps.durable_subscriptions = true;
    caps.ordered = true;
    caps.shared = true;
    caps.exclusive = true;
    caps.failover = true;
    caps.earliest = true;
    caps.nack_redelivery = true;
    caps.redelivery_count = true;
    caps.redeliver_unacked_on_close = true;
    caps.acknowledgement = true;
    caps.deduplication = qos == Qos::Q2;
    caps
}

impl RawBackend for RedisBackend {
    type Producer = RedisProducer;
    type Consumer = RedisConsumer;

    const NAME: &'static str = RedisBackend::NAME;

    fn lifecycle(&self) -> &Lifecycle {
        &self.core.life
    }

    fn caps(&self, qos: Qos) -> Capabilities {
        capabilities(&self.core.config, qos)
    }

    fn why_not(&self, qos: Qos, feature: Feature) -> Cow<'static, str> {
        match feature {
            Feature::Retained => "the Redis backend keeps no retained messages; use a q1 topic \
                                  and an Earliest subscription to replay what a stream holds"
                .into(),
            Feature::Earliest => "q0 topics retain nothing".into(),
            Feature::Consumer(t) if qos == Qos::Q0 => format!(
                "q0 topics use Redis PUBLISH/SUBSCRIBE, where every subscriber gets every \
                 message; {t} consumers need a q1 topic"
            )
            .into(),
            Feature::Consumer(t) => format!("the Redis backend has no {t} consumers").into(),
        }
    }

    async fn open_producer(
        &self,
        topic: &Topic,
        options: &ProducerOptions,
    ) -> Result<RedisProducer> {
        Ok(RedisProducer::new(
            self.core.clone(),
            topic.clone(),
            options,
        ))
    }

    async fn open_consumer(
        &self,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<RedisConsumer> {
        if topic.qos() == Qos::Q0 {
            let hub = self.hub().await?;
            return Ok(RedisConsumer(Kind::Q0(
                Q0Consumer::subscribe(hub, topic, options, id).await?,
            )));
        }
        Ok(RedisConsumer(Kind::Stream(
            StreamConsumer::create(self.core.clone(), topic, options, id).await?,
        )))
    }

    async fn probe(&self) -> Result<()> {
        self.core.ping().await
    }

    async fn remove_topic(&self, topic: &Topic) -> Result<()> {
        let keys = TopicKeys::new(&self.core.config.prefix, topic);
        self.core.delete_keys_of(&keys.main).await
    }

    async fn shutdown(&self) -> Result<()> {
        if let Some(hub) = self.hub.get() {
            hub.close();
        }
        Ok(())
    }
}
