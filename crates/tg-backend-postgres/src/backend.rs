//! The PostgreSQL backend: connecting (schema, `LISTEN` connection, cleanup task), what it
//! guarantees per quality of service, and the kit's [`RawBackend`].

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use tg_backend_api::kit::{BackendConfig, Feature, Lifecycle, RawBackend};
use tg_backend_api::{Capabilities, ConsumerOptions, Error, ProducerOptions, Qos, Result, Topic};

use crate::config::PostgresConfig;
use crate::consumer::PostgresConsumer;
use crate::core::Core;
use crate::producer::PostgresProducer;
use crate::q0::Q0_MAX_PAYLOAD;

/// A backend on one PostgreSQL database. Clones share the pool and the `LISTEN` connection.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::time::Duration;
/// use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage};
/// use tg_backend_postgres::{PostgresBackend, PostgresConfig};
///
/// let config = PostgresConfig::from_url("postgres://postgres@127.0.0.1:5432/test")?;
/// let backend = PostgresBackend::connect(config).await?;
/// let topic = tg_topic::topic("tasks")?;
/// let consumer = backend.create_consumer(&topic, ConsumerOptions::new("workers")).await?;
/// let producer = backend.create_producer(&topic, Default::default()).await?;
/// producer.send(OutboundMessage::new("job-1")).await?.await?;
/// let msg = consumer.receive(Duration::from_secs(1)).await?;
/// consumer.acknowledge(&msg).await?;
/// backend.close().await
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresBackend {
    core: Arc<Core>,
}

impl PostgresBackend {
    /// The name `PUBSUB_BACKEND` uses for this backend.
    pub const NAME: &'static str = "postgres";

    /// Connects, creates the schema if needed and starts the `LISTEN` connection. Fails with
    /// [`ErrorKind::Connection`](tg_backend_api::ErrorKind::Connection) (or
    /// [`ErrorKind::Auth`](tg_backend_api::ErrorKind::Auth)) naming the server when it cannot be
    /// reached.
    pub async fn connect(config: PostgresConfig) -> Result<Self> {
        let core = Arc::new(Core::new(config)?);
        let with_context = |e: Error| e.with_context("database", core.config.dbname());
        core.create_schema().await.map_err(with_context)?;
        core.listener
            .start(core.config.pg_config(), core.tls.clone(), core.life.token())
            .await
            .map_err(with_context)?;
        spawn_cleanup(&core);
        Ok(Self { core })
    }

    /// The configuration.
    pub fn config(&self) -> &PostgresConfig {
        &self.core.config
    }

    /// The `LISTEN`/`NOTIFY` channel a topic maps to (see [`channel_name`](crate::channel_name)).
    pub fn channel_for(&self, topic: &Topic) -> String {
        self.core.channel(topic)
    }

    /// Runs retention cleanup now (normally every `cleanup_interval`).
    pub async fn cleanup(&self) -> Result<()> {
        self.core.cleanup_once().await
    }
}

/// Runs retention every `cleanup_interval` until the backend closes or is gone.
fn spawn_cleanup(core: &Arc<Core>) {
    let weak = Arc::downgrade(core);
    let stop = core.life.token();
    let interval = core.config.cleanup_interval;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
            let Some(core) = weak.upgrade() else { return };
            if let Err(e) = core.cleanup_once().await {
                tracing::warn!(error = %e, "retention cleanup failed");
            }
        }
    });
}

/// What the backend guarantees for topics of `qos`.
fn capabilities(core: &Core, qos: Qos) -> Capabilities {
    let mut caps = Capabilities::NONE;
    if qos == Qos::Q0 {
        caps.max_payload = Q0_MAX_PAYLOAD;
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
    caps.deduplication = qos == Qos::Q2;
    caps.acknowledgement = true;
    caps.max_payload = core.config.max_payload;
    caps
}

impl RawBackend for PostgresBackend {
    type Producer = PostgresProducer;
    type Consumer = PostgresConsumer;

    const NAME: &'static str = PostgresBackend::NAME;

    fn lifecycle(&self) -> &Lifecycle {
        &self.core.life
    }

    fn caps(&self, qos: Qos) -> Capabilities {
        capabilities(&self.core, qos)
    }

    fn why_not(&self, qos: Qos, feature: Feature) -> Cow<'static, str> {
        match feature {
            Feature::Retained if qos == Qos::Q0 => {
                "the PostgreSQL backend keeps no retained messages".into()
            }
            Feature::Retained => "the PostgreSQL backend keeps no retained messages; subscribe at \
                                  Earliest to replay the retained history instead"
                .into(),
            Feature::Earliest => "q0 topics retain nothing".into(),
            Feature::Consumer(t) => format!(
                "q0 topics on PostgreSQL have no {t} consumers: NOTIFY reaches every listener"
            )
            .into(),
        }
    }

    async fn open_producer(
        &self,
        topic: &Topic,
        options: &ProducerOptions,
    ) -> Result<PostgresProducer> {
        PostgresProducer::open(&self.core, topic, options).await
    }

    async fn open_consumer(
        &self,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<PostgresConsumer> {
        PostgresConsumer::open(&self.core, topic, options, id).await
    }

    async fn probe(&self) -> Result<()> {
        let client = self.core.conn().await?;
        client.run("ping", client.simple_query("SELECT 1")).await?;
        Ok(())
    }

    async fn remove_topic(&self, topic: &Topic) -> Result<()> {
        // q0 topics keep nothing in the database: nothing to delete
        if topic.qos().is_persistent() {
            self.core.delete_topic(topic).await?;
        }
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        // the LISTEN connection and the cleanup task stopped when the lifecycle closed
        self.core.pool.close();
        Ok(())
    }
}

impl BackendConfig for PostgresConfig {
    type Backend = PostgresBackend;

    async fn connect(self) -> Result<PostgresBackend> {
        PostgresBackend::connect(self).await
    }
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = &self.core;
        f.debug_struct("PostgresBackend")
            .field("server", &core.server)
            .field("database", &core.config.dbname())
            .field("schema", &core.config.schema)
            .field("listening", &core.listener.is_connected())
            .field("life", &core.life)
            .finish()
    }
}
