//! The PostgreSQL backend: pool, schema, topic cache, LISTEN connection, cleanup.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use parking_lot::Mutex;
use tg_backend_api::{
    next_consumer_id, Backend, Capabilities, Consumer, ConsumerOptions, ConsumerType, Error,
    ErrorKind, InitialPosition, Producer, ProducerOptions, Qos, Result, Topic,
};
use tokio::sync::watch;
use tokio_postgres::NoTls;

use crate::tls::Tls;

use crate::config::PostgresConfig;
use crate::consumer::PgConsumer;
use crate::error;
use crate::listener::Listener;
use crate::producer::PgProducer;
use crate::q0::{Q0Consumer, Q0Producer};
use crate::sql::{Sql, CLEANUP_LOCK, SCHEMA_LOCK, SCHEMA_VERSION};
use crate::topic::{channel_of, Q0_MAX_PAYLOAD};

/// State shared by a backend, its producers and consumers.
pub(crate) struct Shared {
    pub(crate) config: PostgresConfig,
    pub(crate) tls: Tls,
    pub(crate) server: String,
    pub(crate) pool: Pool,
    pub(crate) sql: Sql,
    pub(crate) listener: Arc<Listener>,
    topics: Mutex<HashMap<String, i64>>,
    /// q0 subscriptions with a consumer in this process (one consumer each).
    pub(crate) q0_subs: Mutex<HashSet<(String, String)>>,
    closed: AtomicBool,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed("PostgreSQL backend"))
        } else {
            Ok(())
        }
    }

    pub(crate) fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) fn synchronous(&self) -> &'static str {
        if self.config.consumer_synchronous_commit {
            "on"
        } else {
            "off"
        }
    }

    /// A pooled connection.
    pub(crate) async fn conn(&self) -> Result<deadpool_postgres::Object> {
        self.check_open()?;
        self.pool
            .get()
            .await
            .map_err(|e| error::pool(e, &self.server))
    }

    pub(crate) fn pg(&self, e: tokio_postgres::Error, what: &'static str) -> Error {
        error::pg(e, what, &self.server)
    }

    /// A dedicated connection outside the pool (advisory locks); the returned task drives it.
    pub(crate) async fn dedicated(
        &self,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
        self.check_open()?;
        self.tls
            .connect_spawned(&self.config.pg_config())
            .await
            .map_err(|e| self.pg(e, "connect"))
    }

    /// The id of `topic` in the topics table, created if needed.
    pub(crate) async fn topic_id(&self, topic: &Topic) -> Result<i64> {
        if let Some(id) = self.topics.lock().get(topic.as_str()) {
            return Ok(*id);
        }
        let client = self.conn().await?;
        let stmt = client
            .prepare_cached(&self.sql.topic_id)
            .await
            .map_err(|e| self.pg(e, "prepare"))?;
        for _ in 0..3 {
            let rows = client
                .query(&stmt, &[&topic.as_str()])
                .await
                .map_err(|e| self.pg(e, "topic lookup"))?;
            if let Some(row) = rows.first() {
                let id: i64 = row.get(0);
                self.topics.lock().insert(topic.as_str().to_owned(), id);
                return Ok(id);
            }
        }
        Err(
            Error::new(ErrorKind::Unexpected, "could not create the topic row")
                .with_context("topic", topic),
        )
    }

    pub(crate) fn channel(&self, topic: &Topic) -> String {
        channel_of(&self.config.schema, topic)
    }

    async fn cleanup_once(&self) -> Result<()> {
        let mut client = self.conn().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.pg(e, "cleanup"))?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&CLEANUP_LOCK])
            .await
            .map_err(|e| self.pg(e, "cleanup"))?
            .get(0);
        if !locked {
            return Ok(());
        }
        let ms = self.config.retention.as_secs_f64() * 1000.0;
        let n = tx
            .execute(&self.sql.cleanup_consumed, &[&ms])
            .await
            .map_err(|e| self.pg(e, "cleanup"))?;
        let mut m = 0;
        if let Some(unconsumed) = self.config.unconsumed_retention {
            let ms = unconsumed.as_secs_f64() * 1000.0;
            m = tx
                .execute(&self.sql.cleanup_unconsumed, &[&ms])
                .await
                .map_err(|e| self.pg(e, "cleanup"))?;
        }
        tx.commit().await.map_err(|e| self.pg(e, "cleanup"))?;
        if n + m > 0 {
            tracing::debug!(
                consumed = n,
                unconsumed = m,
                "retention cleanup deleted messages"
            );
        }
        Ok(())
    }
}

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
    shared: Arc<Shared>,
}

impl PostgresBackend {
    /// The name `PUBSUB_BACKEND` uses for this backend.
    pub const NAME: &'static str = "postgres";

    /// Connects, creates the schema if needed and starts the `LISTEN` connection. Fails with
    /// [`ErrorKind::Connection`] (or [`ErrorKind::Auth`]) naming the server when it cannot be
    /// reached.
    pub async fn connect(config: PostgresConfig) -> Result<Self> {
        config.validate()?;
        let server = config.server();
        let tls = config.tls()?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Tls::Plain => Manager::from_config(config.pg_config(), NoTls, manager_config),
            Tls::Rustls(make) => {
                Manager::from_config(config.pg_config(), make.clone(), manager_config)
            }
        };
        let connect_timeout = config
            .pg_config()
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(connect_timeout))
            .wait_timeout(Some(config.send_timeout))
            .build()
            .map_err(|e| Error::config(format!("PostgreSQL pool: {e}")))?;
        let sql = Sql::new(&config.schema);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let listener = Listener::new(server.clone());
        let shared = Arc::new(Shared {
            tls: tls.clone(),
            server: server.clone(),
            pool,
            sql,
            listener: listener.clone(),
            topics: Mutex::new(HashMap::new()),
            q0_subs: Mutex::new(HashSet::new()),
            closed: AtomicBool::new(false),
            shutdown,
            config,
        });
        let with_context = |e: Error| e.with_context("database", shared.config.dbname());
        create_schema(&shared).await.map_err(with_context)?;
        listener
            .start(&shared.config, tls, shutdown_rx)
            .await
            .map_err(with_context)?;
        spawn_cleanup(Arc::downgrade(&shared), shared.shutdown_rx());
        Ok(Self { shared })
    }

    /// The configuration.
    pub fn config(&self) -> &PostgresConfig {
        &self.shared.config
    }

    /// The `LISTEN`/`NOTIFY` channel a topic maps to (see [`channel_name`](crate::channel_name)).
    pub fn channel_for(&self, topic: &Topic) -> String {
        self.shared.channel(topic)
    }

    /// Runs retention cleanup now (normally every `cleanup_interval`).
    pub async fn cleanup(&self) -> Result<()> {
        self.shared.cleanup_once().await
    }
}

async fn create_schema(shared: &Shared) -> Result<()> {
    let mut client = shared.conn().await?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| shared.pg(e, "schema setup"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(|e| shared.pg(e, "schema lock"))?;
    tx.batch_execute(&shared.sql.create)
        .await
        .map_err(|e| shared.pg(e, "schema setup"))?;
    let version: String = tx
        .query_one(&shared.sql.version, &[])
        .await
        .map_err(|e| shared.pg(e, "schema version"))?
        .get(0);
    tx.commit()
        .await
        .map_err(|e| shared.pg(e, "schema setup"))?;
    match version.parse::<i32>() {
        Ok(v) if v <= SCHEMA_VERSION => Ok(()),
        _ => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "schema {:?} has layout version {version}; this library knows up to {SCHEMA_VERSION}",
                shared.config.schema
            ),
        )),
    }
}

fn spawn_cleanup(shared: std::sync::Weak<Shared>, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            let interval = match shared.upgrade() {
                Some(s) => s.config.cleanup_interval,
                None => return,
            };
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            let Some(s) = shared.upgrade() else { return };
            if let Err(e) = s.cleanup_once().await {
                tracing::warn!(error = %e, "retention cleanup failed");
            }
        }
    });
}

#[async_trait]
impl Backend for PostgresBackend {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn capabilities(&self, qos: Qos) -> Capabilities {
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
        caps.max_payload = self.shared.config.max_payload;
        caps
    }

    async fn create_producer(
        &self,
        topic: &Topic,
        options: ProducerOptions,
    ) -> Result<Box<dyn Producer>> {
        self.shared.check_open()?;
        if topic.qos() == Qos::Q0 {
            return Ok(Box::new(Q0Producer::new(
                self.shared.clone(),
                topic.clone(),
            )));
        }
        let topic_id = self.shared.topic_id(topic).await?;
        Ok(Box::new(PgProducer::new(
            self.shared.clone(),
            topic.clone(),
            topic_id,
            options,
        )))
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
                    "q0 topics on PostgreSQL have no {} consumers: NOTIFY reaches every listener",
                    options.consumer_type
                ))
                .with_context("topic", topic));
            }
            if options.initial_position == InitialPosition::Earliest {
                tracing::debug!(%topic, "q0 topics retain nothing: Earliest behaves as Latest");
            }
            return Ok(Box::new(
                Q0Consumer::create(self.shared.clone(), topic.clone(), options).await?,
            ));
        }
        let id = next_consumer_id();
        Ok(Box::new(
            PgConsumer::create(self.shared.clone(), id, topic.clone(), options).await?,
        ))
    }

    async fn ping(&self) -> Result<()> {
        let client = self.shared.conn().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| self.shared.pg(e, "ping"))?;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if !self.shared.closed.swap(true, Ordering::AcqRel) {
            self.shared.shutdown.send_replace(true);
            self.shared.pool.close();
        }
        Ok(())
    }
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("server", &self.shared.server)
            .field("database", &self.shared.config.dbname())
            .field("schema", &self.shared.config.schema)
            .field("listening", &self.shared.listener.is_connected())
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}
