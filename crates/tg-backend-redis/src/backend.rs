//! The Redis backend: connection handling and the [`Backend`] implementation.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::AsyncConnectionConfig;
use tg_backend_api::{
    Backend, Capabilities, Consumer, ConsumerOptions, ConsumerType, Error, ErrorKind,
    HandleRegistry, InitialPosition, Producer, ProducerOptions, Qos, Result, Topic,
};

use crate::config::RedisConfig;
use crate::consumer::{ConsumerCore, StreamConsumer};
use crate::error::convert;
use crate::producer::{ProducerCore, RedisProducer};
use crate::pubsub::{PubSubConsumer, PubSubHub};

/// State shared by the backend and everything it created.
pub(crate) struct Shared {
    pub(crate) config: RedisConfig,
    pub(crate) server: String,
    pub(crate) client: redis::Client,
    pub(crate) conn: ConnectionManager,
    closed: AtomicBool,
    pubsub: tokio::sync::OnceCell<Arc<PubSubHub>>,
    consumers: HandleRegistry<ConsumerCore>,
    producers: HandleRegistry<ProducerCore>,
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed("redis backend").with_context("server", &self.server))
        } else {
            Ok(())
        }
    }

    /// A clone of the shared multiplexed, self-reconnecting command connection.
    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub(crate) fn err(&self, e: redis::RedisError, what: &str) -> Error {
        convert(e, what, &self.server)
    }

    /// Settings of a new connection; `response_timeout` None for connections that block.
    pub(crate) fn async_config(&self, response_timeout: Option<Duration>) -> AsyncConnectionConfig {
        let mut cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(self.config.connect_timeout)
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        if let Some(t) = response_timeout {
            cfg = cfg.set_response_timeout(t);
        }
        cfg
    }

    /// A dedicated connection (for one consumer's blocking reads), bounded by the connect timeout.
    pub(crate) async fn dedicated_connection(&self) -> Result<MultiplexedConnection> {
        let cfg = self.async_config(None);
        match tokio::time::timeout(
            self.config.connect_timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&cfg),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.err(e, "cannot connect to Redis")),
            Err(_) => Err(Error::connection(format!(
                "timed out after {:?} connecting to Redis",
                self.config.connect_timeout
            ))
            .with_context("server", &self.server)),
        }
    }

    pub(crate) fn register_consumer(&self, core: &Arc<ConsumerCore>) {
        self.consumers.register(core);
    }

    pub(crate) fn register_producer(&self, core: &Arc<ProducerCore>) {
        self.producers.register(core);
    }

    async fn pubsub(self: &Arc<Self>) -> Result<Arc<PubSubHub>> {
        self.pubsub
            .get_or_try_init(|| PubSubHub::connect(self.clone()))
            .await
            .cloned()
    }
}

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
    shared: Arc<Shared>,
}

impl RedisBackend {
    /// The name `PUBSUB_BACKEND` uses for this backend.
    pub const NAME: &'static str = "redis";

    /// Connects to the server, failing within [`RedisConfig::connect_timeout`] with
    /// [`ErrorKind::Connection`] (unreachable) or [`ErrorKind::Auth`] (credentials refused); the
    /// error names the server, never the password.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let server = config.server();
        let info = config.connection_info()?;
        let client = redis::Client::open(info)
            .map_err(|e| convert(e, "invalid Redis connection settings", &server))?;
        let timeout = config.connect_timeout;
        let timed_out = || {
            Error::connection(format!("timed out after {timeout:?} connecting to Redis"))
                .with_context("server", &server)
        };
        let probe_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        let probe = async {
            let mut c = client
                .get_multiplexed_async_connection_with_config(&probe_cfg)
                .await?;
            redis::cmd("PING").query_async::<()>(&mut c).await
        };
        match tokio::time::timeout(timeout, probe).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => {
                // anything but refused credentials means: no usable Redis there (Connection,
                // which the facade's fallback acts on)
                return Err(if crate::error::kind_of(&e) == ErrorKind::Auth {
                    convert(e, "Redis refused the credentials", &server)
                } else {
                    Error::connection(format!("cannot connect to Redis: {e}"))
                        .with_context("server", &server)
                });
            }
            Ok(Ok(())) => {}
        }
        let manager_cfg = manager_config(&config);
        let conn = match tokio::time::timeout(
            timeout,
            ConnectionManager::new_with_config(client.clone(), manager_cfg),
        )
        .await
        {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => return Err(convert(e, "cannot connect to Redis", &server)),
            Ok(Ok(c)) => c,
        };
        tracing::debug!(server = %server, "connected to Redis");
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                server,
                client,
                conn,
                closed: AtomicBool::new(false),
                pubsub: tokio::sync::OnceCell::new(),
                consumers: HandleRegistry::new(),
                producers: HandleRegistry::new(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }
}

/// Settings of the self-reconnecting connections: reconnect for ever (callers bound their
/// waits with their own timeouts), at most a second apart.
pub(crate) fn manager_config(config: &RedisConfig) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(config.connect_timeout)
        .set_number_of_retries(1_000_000)
        .set_factor(50)
        .set_max_delay(1000)
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("server", &self.shared.server)
            .field("closed", &self.shared.is_closed())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn capabilities(&self, qos: Qos) -> Capabilities {
        let mut caps = Capabilities::NONE;
        caps.max_payload = self.shared.config.max_payload;
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

    async fn create_producer(
        &self,
        topic: &Topic,
        options: ProducerOptions,
    ) -> Result<Box<dyn Producer>> {
        self.shared.check_open()?;
        let producer = RedisProducer::new(self.shared.clone(), topic.clone(), &options);
        self.shared.register_producer(producer.core());
        Ok(Box::new(producer))
    }

    async fn create_consumer(
        &self,
        topic: &Topic,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        options.validate()?;
        self.shared.check_open()?;
        if topic.qos() == Qos::Q0 {
            if options.consumer_type != ConsumerType::Shared {
                return Err(Error::unsupported(format!(
                    "q0 topics use Redis PUBLISH/SUBSCRIBE, where every subscriber gets every \
                     message; {} consumers need a q1 topic",
                    options.consumer_type
                ))
                .with_context("topic", topic));
            }
            if options.initial_position == InitialPosition::Earliest {
                tracing::debug!(%topic, "q0 topics retain nothing: Earliest behaves as Latest");
            }
            let hub = self.shared.pubsub().await?;
            let consumer = PubSubConsumer::subscribe(hub, topic.clone(), options).await?;
            return Ok(Box::new(consumer));
        }
        let consumer = StreamConsumer::create(self.shared.clone(), topic.clone(), options).await?;
        self.shared.register_consumer(consumer.core());
        Ok(Box::new(consumer))
    }

    async fn ping(&self) -> Result<()> {
        self.shared.check_open()?;
        let mut conn = self.shared.conn();
        match tokio::time::timeout(
            self.shared.config.connect_timeout,
            redis::cmd("PING").query_async::<()>(&mut conn),
        )
        .await
        {
            Ok(r) => r.map_err(|e| self.shared.err(e, "PING failed")),
            Err(_) => Err(
                Error::new(ErrorKind::Timeout, "Redis did not answer PING in time")
                    .with_context("server", &self.shared.server),
            ),
        }
    }

    async fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for p in self.shared.producers.drain_live() {
            let _ = p.shutdown().await;
        }
        for c in self.shared.consumers.drain_live() {
            let _ = c.shutdown(false).await;
        }
        if let Some(hub) = self.shared.pubsub.get() {
            hub.close();
        }
        Ok(())
    }
}
