//! The state every producer, consumer and task of one Redis backend shares: its configuration,
//! lifecycle and connections.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tg_backend_api::kit::Lifecycle;
use tg_backend_api::{Error, ErrorKind, Result};

use crate::config::RedisConfig;
use crate::error::{convert, kind_of};
use crate::shared::SharedConn;

/// One connected Redis server.
pub(crate) struct Core {
    pub(crate) config: RedisConfig,
    /// How errors and logs name the server (no credentials).
    pub(crate) server: String,
    pub(crate) client: redis::Client,
    /// The shared multiplexed command connection, replaced when it breaks or goes silent.
    conn: SharedConn,
    pub(crate) life: Lifecycle,
}

impl Core {
    /// Connects to the server, failing within the connect timeout with `Connection`
    /// (unreachable) or `Auth` (credentials refused); errors name the server, never the password.
    pub(crate) async fn connect(config: RedisConfig) -> Result<Self> {
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
                return Err(if kind_of(&e) == ErrorKind::Auth {
                    convert(e, "Redis refused the credentials", &server)
                } else {
                    Error::connection(format!("cannot connect to Redis: {e}"))
                        .with_context("server", &server)
                });
            }
            Ok(Ok(())) => {}
        }
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(timeout)
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let conn = SharedConn::open(
            client.clone(),
            settings,
            timeout,
            config.keep_alive,
            config.db,
            server.clone(),
        )
        .await
        .map_err(|e| convert(e, "cannot connect to Redis", &server))?;
        tracing::debug!(server = %server, "connected to Redis");
        Ok(Self {
            config,
            server,
            client,
            conn,
            life: Lifecycle::new("Redis backend"),
        })
    }

    /// A handle on the shared command connection (it reconnects by itself).
    pub(crate) fn conn(&self) -> SharedConn {
        self.conn.clone()
    }

    /// Deletes the stream (or nothing, for a q0 channel) named `main` and every key under it: the
    /// subscriptions' retry streams and leases and the q2 de-duplication ids. The consumer groups
    /// go with the stream. Keys are found with `SCAN` (never `KEYS`, which blocks the server) and
    /// removed with `UNLINK`, which frees their memory off the server's main thread.
    pub(crate) async fn delete_keys_of(&self, main: &str) -> Result<()> {
        let mut conn = self.conn();
        // `main` contains no glob characters but the prefix might: escape them
        let mut pattern = String::with_capacity(main.len() + 2);
        for c in main.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str("/*");
        let mut keys = vec![main.to_owned()];
        let mut cursor: u64 = 0;
        loop {
            let (next, found): (u64, Vec<String>) = self
                .bounded(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn),
                )
                .await?
                .map_err(|e| self.err(e, "SCAN"))?;
            keys.extend(found);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        for chunk in keys.chunks(512) {
            let () = self
                .bounded(redis::cmd("UNLINK").arg(chunk).query_async(&mut conn))
                .await?
                .map_err(|e| self.err(e, "UNLINK"))?;
        }
        Ok(())
    }

    /// A client error, naming what we did and the server.
    pub(crate) fn err(&self, e: redis::RedisError, what: &str) -> Error {
        convert(e, what, &self.server)
    }

    /// `Timeout` naming the server.
    pub(crate) fn timeout(&self, message: &'static str) -> Error {
        Error::new(ErrorKind::Timeout, message).with_context("server", &self.server)
    }

    /// Runs a command future bounded by the send timeout.
    pub(crate) async fn bounded<T>(&self, fut: impl std::future::Future<Output = T>) -> Result<T> {
        tokio::time::timeout(self.config.send_timeout, fut)
            .await
            .map_err(|_| self.timeout("Redis did not answer in time"))
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

    /// `PING` within the connect timeout.
    pub(crate) async fn ping(&self) -> Result<()> {
        let mut conn = self.conn();
        match tokio::time::timeout(
            self.config.connect_timeout,
            redis::cmd("PING").query_async::<()>(&mut conn),
        )
        .await
        {
            Ok(r) => r.map_err(|e| self.err(e, "PING failed")),
            Err(_) => Err(self.timeout("Redis did not answer PING in time")),
        }
    }
}
