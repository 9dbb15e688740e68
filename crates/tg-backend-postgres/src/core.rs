//! The state a backend shares with its producers, consumers and background tasks: configuration,
//! lifecycle, connection pool, statements, topic ids, the `LISTEN` connection.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use parking_lot::Mutex;
use tg_backend_api::kit::Lifecycle;
use tg_backend_api::{Error, ErrorKind, Result, Topic};
use tokio_postgres::NoTls;

use crate::config::PostgresConfig;
use crate::error;
use crate::listener::{Listener, Timing};
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
            listener: Listener::new(
                server.clone(),
                Timing {
                    connect: config.connect_timeout,
                    check_every: config.safety_interval,
                    answer_within: config.query_timeout,
                },
            ),
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

    /// A pooled connection whose statements are bounded by `query_timeout` (see [`Conn`]). It
    /// works while the backend closes, so closing producers and consumers can still flush and
    /// give their claims back; the pool itself closes last.
    pub(crate) async fn conn(&self) -> Result<Conn<'_>> {
        let object = self
            .pool
            .get()
            .await
            .map_err(|e| error::pool(e, &self.server))?;
        Ok(Conn {
            object: Some(object),
            guard: Guard {
                core: self,
                clean: AtomicBool::new(true),
            },
        })
    }

    /// A statement went unanswered for `query_timeout`: the network to the server may have gone
    /// silent. The pool's idle connections were opened on it too and would each cost a
    /// `query_timeout` to find out: they are closed (new ones cost a connect), and the `LISTEN`
    /// connection is checked at once.
    fn went_silent(&self) {
        self.pool.retain(|_, _| false);
        self.listener.check_now();
    }

    pub(crate) fn pg(&self, e: tokio_postgres::Error, what: &'static str) -> Error {
        error::pg(e, what, &self.server)
    }

    /// A dedicated connection outside the pool (advisory locks); the returned task drives it.
    /// Bounded by `connect_timeout` as a whole: tokio-postgres bounds only the TCP connect, and on
    /// a silent network the start-up exchange after it never ends.
    pub(crate) async fn dedicated(
        &self,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
        self.life.check_open()?;
        match tokio::time::timeout(
            self.config.connect_timeout,
            self.tls.connect_spawned(&self.config.pg_config()),
        )
        .await
        {
            Ok(connected) => connected.map_err(|e| self.pg(e, "connect")),
            Err(_) => Err(self.connect_timed_out()),
        }
    }

    /// The error of a connection attempt that took longer than `connect_timeout`.
    pub(crate) fn connect_timed_out(&self) -> Error {
        Error::connection(format!(
            "PostgreSQL did not complete the connection within {:?} (connect_timeout)",
            self.config.connect_timeout
        ))
        .with_context("server", &self.server)
    }

    /// Runs one statement on a dedicated connection (outside the pool), bounded by
    /// `query_timeout`; `Err(None)` when it went unanswered (the caller closes that connection).
    pub(crate) async fn bounded<T>(
        &self,
        what: &'static str,
        statement: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> std::result::Result<T, Option<Error>> {
        match tokio::time::timeout(self.config.query_timeout, statement).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Some(self.pg(e, what))),
            Err(_) => {
                self.went_silent();
                Err(None)
            }
        }
    }

    /// The error of a statement that went unanswered for `query_timeout`.
    pub(crate) fn unanswered(&self, what: &'static str) -> Error {
        Error::connection(format!(
            "PostgreSQL did not answer the {what} within {:?} (query_timeout); the connection \
             was closed",
            self.config.query_timeout
        ))
        .with_context("server", &self.server)
    }

    /// Deletes `topic`'s row with its messages, subscriptions and deliveries, in one statement,
    /// and forgets its id (a later producer or consumer creates the topic anew).
    pub(crate) async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        let client = self.conn().await?;
        client
            .run(
                "delete topic",
                client.query_one(&self.sql.delete_topic, &[&topic.as_str()]),
            )
            .await?;
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
            .run("prepare", client.prepare_cached(&self.sql.topic_id))
            .await?;
        for _ in 0..3 {
            let rows = client
                .run("topic lookup", client.query(&stmt, &[&topic.as_str()]))
                .await?;
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
        let mut conn = self.conn().await?;
        let (client, guard) = conn.parts();
        let version: String = guard
            .bounded("schema setup", async {
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
                Ok(version)
            })
            .await?;
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
        let mut conn = self.conn().await?;
        let (client, guard) = conn.parts();
        let (n, m) = guard
            .bounded("cleanup", async {
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
                    return Ok((0, 0));
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
                Ok((n, m))
            })
            .await?;
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

/// A pooled connection, each statement on it bounded by `query_timeout`: on a silent network
/// (bytes vanish both ways, no FIN, no RST, TCP keep-alive still content) a statement's answer
/// never comes, and nothing else would end the wait. A connection whose statement did not
/// complete — it went unanswered, or its caller gave up on it midway — is closed when dropped
/// instead of going back to the pool, where the next user would queue behind the lost answer.
pub(crate) struct Conn<'a> {
    object: Option<Object>,
    guard: Guard<'a>,
}

/// Bounds the statements of one [`Conn`] and remembers whether one was left incomplete.
pub(crate) struct Guard<'a> {
    core: &'a Core,
    /// False from the start of a statement until it completed.
    clean: AtomicBool,
}

impl Conn<'_> {
    /// Runs `statement` (a future of this connection's client), bounded by `query_timeout`;
    /// `what` names it in errors.
    pub(crate) async fn run<T>(
        &self,
        what: &'static str,
        statement: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        let core = self.guard.core;
        self.guard
            .bounded(what, async {
                statement.await.map_err(|e| core.pg(e, what))
            })
            .await
    }

    /// The client, mutable (for a transaction), and the guard that bounds what runs on it.
    pub(crate) fn parts(&mut self) -> (&mut Object, &Guard<'_>) {
        let object = self.object.as_mut().expect("a connection until dropped");
        (object, &self.guard)
    }
}

impl Guard<'_> {
    /// Runs `work` on the connection (statements, or a whole transaction), bounded by
    /// `query_timeout`.
    pub(crate) async fn bounded<T>(
        &self,
        what: &'static str,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.clean.store(false, Ordering::Release);
        match tokio::time::timeout(self.core.config.query_timeout, work).await {
            Ok(done) => {
                // an error answered by the server leaves the connection usable (a transaction's
                // is rolled back when it is dropped); a broken one the pool recognises as closed
                self.clean.store(true, Ordering::Release);
                done
            }
            Err(_) => {
                self.core.went_silent();
                Err(self.core.unanswered(what))
            }
        }
    }
}

impl Deref for Conn<'_> {
    type Target = Object;

    fn deref(&self) -> &Object {
        self.object.as_ref().expect("a connection until dropped")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            if !self.guard.clean.load(Ordering::Acquire) {
                // out of the pool and dropped: that aborts the task driving the connection,
                // which closes the socket
                drop(Object::take(object));
                tracing::debug!(server = %self.guard.core.server, "closed a connection whose statement did not complete");
            }
        }
    }
}
