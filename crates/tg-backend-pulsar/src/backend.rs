//! The Pulsar backend: the client connection and the [`Backend`] implementation.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pulsar::{
    Authentication, ConnectionRetryOptions, OperationRetryOptions, Pulsar, TokioExecutor,
};
use tg_backend_api::{
    Backend, Capabilities, Consumer, ConsumerOptions, Error, ErrorKind, HandleRegistry, Producer,
    ProducerOptions, Qos, Result, Topic,
};

use crate::config::PulsarConfig;
use crate::consumer::{ConsumerCore, PulsarConsumer};
use crate::error::convert;
use crate::producer::{ProducerCore, PulsarProducer};

/// State shared by the backend and everything it created.
pub(crate) struct Shared {
    pub(crate) config: PulsarConfig,
    /// The service URL, for messages (never with the token).
    pub(crate) server: String,
    /// The client (connection) of producers.
    pub(crate) client: Pulsar<TokioExecutor>,
    /// The client (connection) of consumers.
    pub(crate) consumer_client: Pulsar<TokioExecutor>,
    closed: AtomicBool,
    consumers: HandleRegistry<ConsumerCore>,
    producers: HandleRegistry<ProducerCore>,
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed("pulsar backend").with_context("server", &self.server))
        } else {
            Ok(())
        }
    }

    pub(crate) fn err(&self, e: pulsar::Error, what: &str) -> Error {
        convert(e, what, &self.server)
    }

    /// Runs a broker operation, failing with `Timeout` after the operation timeout.
    pub(crate) async fn bounded<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = std::result::Result<T, pulsar::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.operation_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.err(e, what)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{what}: no answer from the broker within {:?}",
                    self.config.operation_timeout
                ),
            )
            .with_context("server", &self.server)),
        }
    }

    fn register_consumer(&self, core: &Arc<ConsumerCore>) {
        self.consumers.register(core);
    }

    fn register_producer(&self, core: &Arc<ProducerCore>) {
        self.producers.register(core);
    }
}

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
    shared: Arc<Shared>,
}

impl PulsarBackend {
    /// The name `PUBSUB_BACKEND` uses for this backend.
    pub const NAME: &'static str = "pulsar";

    /// Connects to the broker, failing within [`PulsarConfig::connect_timeout`] with
    /// [`ErrorKind::Connection`] (unreachable) or [`ErrorKind::Auth`] (token refused); the error
    /// names the server, never the token. Once connected, the client reconnects by itself after
    /// the connection breaks (e.g. a broker restart), and producers and consumers resume.
    pub async fn connect(config: PulsarConfig) -> Result<Self> {
        config.validate()?;
        let server = config.service_url();
        if let Some(listener) = &config.listener {
            tracing::warn!(
                server = %server,
                listener = %listener,
                "PULSAR_LISTENER is set, but the pulsar crate cannot send a listener name in \
                 lookups: the broker answers with its default listener"
            );
        }
        let builder = || -> Result<_> {
            let mut builder = Pulsar::builder(server.clone(), TokioExecutor)
                .with_connection_retry_options(ConnectionRetryOptions {
                    min_backoff: Duration::from_millis(100),
                    max_backoff: config.reconnect_max_delay,
                    max_retries: u32::MAX,
                    connection_timeout: config.connect_timeout,
                    keep_alive: Duration::from_secs(30),
                    ..ConnectionRetryOptions::default()
                })
                .with_operation_retry_options(OperationRetryOptions {
                    operation_timeout: config.operation_timeout,
                    retry_delay: Duration::from_millis(500),
                    max_retries: None,
                })
                .with_outbound_channel_size(10_000);
            if let Some(token) = &config.token {
                builder = builder.with_auth(Authentication {
                    name: "token".to_owned(),
                    data: token.clone().into_bytes(),
                });
            }
            if let Some(ca) = &config.ca_file {
                builder = builder.with_certificate_chain_file(ca).map_err(|e| {
                    Error::config(format!("cannot read ca_file {}: {e}", ca.display()))
                        .with_context("server", &server)
                })?;
            }
            Ok(builder)
        };
        // Two clients, so two connections: one for producers, one for consumers. The pulsar
        // crate does not set TCP_NODELAY, so a small write waits (Nagle) until the broker
        // acknowledged the previous one; consumer acknowledgements get no answer that would
        // carry that TCP acknowledgement, and on a shared connection they held sends back by up
        // to the broker's delayed-ACK time (40 ms on Linux). See docs/pulsar.md.
        let (producers, consumers) = (builder()?, builder()?);
        let timeout = config.connect_timeout;
        let both = async { futures::try_join!(producers.build(), consumers.build()) };
        let (client, consumer_client) = match tokio::time::timeout(timeout, both).await {
            Err(_) => {
                return Err(Error::connection(format!(
                    "no connection to Pulsar within {timeout:?}"
                ))
                .with_context("server", &server))
            }
            Ok(Err(e)) => {
                let kind = crate::error::kind_of(&e);
                return Err(if kind == ErrorKind::Auth {
                    convert(e, "Pulsar refused the token", &server)
                } else {
                    Error::connection(format!("cannot connect to Pulsar: {e}"))
                        .with_context("server", &server)
                });
            }
            Ok(Ok(clients)) => clients,
        };
        tracing::debug!(server = %server, "connected to Pulsar");
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                server,
                client,
                consumer_client,
                closed: AtomicBool::new(false),
                consumers: HandleRegistry::new(),
                producers: HandleRegistry::new(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PulsarConfig {
        &self.shared.config
    }

    /// The underlying `pulsar` client of this backend's producers, for what tg-pubsub does not
    /// cover (readers, lookups). Producers and consumers made from it are not tracked by
    /// [`Backend::close`].
    pub fn client(&self) -> &Pulsar<TokioExecutor> {
        &self.shared.client
    }
}

impl fmt::Debug for PulsarBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PulsarBackend")
            .field("server", &self.shared.server)
            .field("closed", &self.shared.is_closed())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Backend for PulsarBackend {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn capabilities(&self, qos: Qos) -> Capabilities {
        let mut caps = Capabilities::NONE;
        caps.max_payload = self.shared.config.max_payload;
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
        caps.deduplication = qos == Qos::Q2 && self.shared.config.dedup_window > 0;
        caps
    }

    async fn create_producer(
        &self,
        topic: &Topic,
        options: ProducerOptions,
    ) -> Result<Box<dyn Producer>> {
        self.shared.check_open()?;
        let producer = PulsarProducer::create(self.shared.clone(), topic.clone(), options).await?;
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
        let consumer = PulsarConsumer::create(self.shared.clone(), topic.clone(), options).await?;
        self.shared.register_consumer(consumer.core());
        Ok(Box::new(consumer))
    }

    async fn ping(&self) -> Result<()> {
        self.shared.check_open()?;
        self.shared
            .bounded(
                "Pulsar did not answer a topic lookup",
                self.shared
                    .client
                    .lookup_topic("non-persistent://public/default/tg-pubsub-ping"),
            )
            .await
            .map(drop)
    }

    async fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for p in self.shared.producers.drain_live() {
            let _ = p.shutdown().await;
        }
        for c in self.shared.consumers.drain_live() {
            let _ = c.shutdown().await;
        }
        Ok(())
    }
}
