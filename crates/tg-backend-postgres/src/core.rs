//! The state a backend shares with its producers, consumers and background tasks: configuration,
//! lifecycle, connection pool, statements, topic ids, the `LISTEN` connection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use parking_lot::Mutex;
use tg_backend_api::kit::Lifecycle;
use tg_backend_api::{Error, ErrorKind, Result, Topic};
use tokio_postgres::NoTls;

use crate::config::PostgresConfig;
use crate::error;
use crate::listener::Listener;
use crate::sql::{Sql, CLEANUP_LOCK, SCHEMA_LOCK, SCHEMA_VERSION};
use crate::tls::Tls;
use crate::topic::channel_of;

/// One backend on one database.
pub(crate) struct Core {
    pub(crate) config: PostgresConfig,
    pub(crate) life: Lifecycle,
    pub(crate) tls: Tls,
    /// `host:port`, for messages.
    pub(crate) server: String,
    pub(crate) pool: Pool,
    pub(crate) sql: Sql,
    pub(crate) listener: Arc<Listener>,
    /// Topic name → id in the topics table.
    topics: Mutex<HashMap<String, i64>>,
    /// q0 subscriptions with a consumer in this process (one consumer each).
    pub(crate) q0_subs: Mutex<HashSet<(String, String)>>,
}

impl Core {
    /// The state of a backend on `config`, without connecting (the pool connects on first use).
    pub(crate) fn new(config: PostgresConfig) -> Result<Self> {
        config.validate()?;
        let server = config.server();
        let tls = Tls::for_mode(config.ssl_mode(), config.ssl_root_cert_path())?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Tls::Plain => Manager::from_config(config.pg_config(), NoTls, manager_config),
            Tls::Rustls(make) => {
                Manager::from_config(config.pg_config(), make.clone(), manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(config.connect_timeout))
            .wait_timeout(Some(config.send_timeout))
            .build()
            .map_err(|e| Error::config(format!("PostgreSQL pool: {e}")))?;
        Ok(Self {
            sql: Sql::new(&config.schema),
            listener: Listener::new(server.clone()),
            life: Lifecycle::new("PostgreSQL backend"),
            tls,
            server,
            pool,
            topics: Mutex::new(HashMap::new()),
            q0_subs: Mutex::new(HashSet::new()),
            config,
        })
    }

    /// `synchronous_commit` for consumer state changes.
    pub(crate) fn synchronous(&self) -> &'static str {
        if self.config.consumer_synchronous_commit {
            "on"
        } else {
            "off"
        }
    }

    /// A pooled connection. It works while the backend closes, so closing producers and consumers
    /// can still flush and give their claims back; the pool itself closes last.
    pub(crate) async fn conn(&self) -> Result<deadpool_postgres::Object> {
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
        self.life.check_open()?;
        self.tls
            .connect_spawned(&self.config.pg_config())
            .await
            .map_err(|e| self.pg(e, "connect"))
    }

    /// Deletes `topic`'s row with its messages, subscriptions and deliveries, in one statement,
    /// and forgets its id (a later producer or consumer creates the topic anew).
    pub(crate) async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        let client = self.conn().await?;
        client
            .query_one(&self.sql.delete_topic, &[&topic.as_str()])
            .await
            .map_err(|e| self.pg(e, "delete topic"))?;
        self.topics.lock().remove(topic.as_str());
        Ok(())
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

    /// The `LISTEN`/`NOTIFY` channel of `topic`.
    pub(crate) fn channel(&self, topic: &Topic) -> String {
        channel_of(&self.config.schema, topic)
    }

    /// Creates the schema's tables if needed, under a transaction-level advisory lock so that
    /// processes starting together do not race; refuses a newer layout.
    pub(crate) async fn create_schema(&self) -> Result<()> {
        let mut client = self.conn().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.pg(e, "schema setup"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(|e| self.pg(e, "schema lock"))?;
        tx.batch_execute(&self.sql.create)
            .await
            .map_err(|e| self.pg(e, "schema setup"))?;
        let version: String = tx
            .query_one(&self.sql.version, &[])
            .await
            .map_err(|e| self.pg(e, "schema version"))?
            .get(0);
        tx.commit().await.map_err(|e| self.pg(e, "schema setup"))?;
        match version.parse::<i32>() {
            Ok(v) if v <= SCHEMA_VERSION => Ok(()),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "schema {:?} has layout version {version}; this library knows up to {SCHEMA_VERSION}",
                    self.config.schema
                ),
            )),
        }
    }

    /// One run of retention, unless another backend on the database is running it.
    pub(crate) async fn cleanup_once(&self) -> Result<()> {
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

impl Drop for Core {
    /// A backend dropped without `close` (its last producer and consumer gone too) stops its
    /// `LISTEN` connection and cleanup task as a closed one does.
    fn drop(&mut self) {
        self.life.mark_closed();
    }
}
