//! The backend's shared command connection: one multiplexed connection for sends,
//! acknowledgements, scripts, leases and probes, replaced when it breaks — and when it goes silent.
//!
//! On a silent network (bytes vanish both ways, no FIN, no RST) a socket can look alive for good:
//! TCP keep-alive is satisfied by any host that acknowledges segments, and redis-rs's own
//! `ConnectionManager` reconnects only on refused, reset, broken-pipe or EOF errors, so it kept
//! sending to a dead socket whose commands merely timed out. Redis has no keep-alive of its own,
//! so this one is the backend's: every command on the shared connection waits at most
//! `keep_alive` for its answer, a `PING` goes out every `keep_alive` (so an idle connection is
//! checked too), and a connection that leaves either unanswered that long is dropped. The commands
//! still waiting on it fail with a connection error (sends and acknowledgements retry that within
//! their send timeout), its socket closes once the last of them is gone (the multiplexed
//! connection's driver ends with its last handle), and the next command opens a new connection.

use std::io;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A handle on the shared connection; clones share it.
#[derive(Clone)]
pub(crate) struct SharedConn(Arc<Inner>);

struct Inner {
    client: Client,
    /// Settings of each new connection (connect timeout, no-delay; no response timeout: the
    /// handle bounds each command itself, to know which connection to drop).
    settings: AsyncConnectionConfig,
    connect_timeout: Duration,
    keep_alive: Duration,
    db: i64,
    /// How logs name the server (no credentials).
    server: String,
    current: Mutex<Current>,
    /// Held while a connection is being opened: callers arriving meanwhile wait for it rather
    /// than open one each.
    opening: tokio::sync::Mutex<()>,
}

/// The connection in use, numbered so that a stale verdict (about a connection already
/// replaced) drops nothing.
#[derive(Default)]
struct Current {
    generation: u64,
    conn: Option<MultiplexedConnection>,
}

impl SharedConn {
    /// Opens the first connection (bounded by `connect_timeout`).
    pub(crate) async fn open(
        client: Client,
        settings: AsyncConnectionConfig,
        connect_timeout: Duration,
        keep_alive: Duration,
        db: i64,
        server: String,
    ) -> RedisResult<Self> {
        let shared = Self(Arc::new(Inner {
            client,
            settings,
            connect_timeout,
            keep_alive,
            db,
            server,
            current: Mutex::new(Current::default()),
            opening: tokio::sync::Mutex::new(()),
        }));
        shared.get().await?;
        Ok(shared)
    }

    /// The current connection, or a new one if there is none.
    async fn get(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.0.current() {
            return Ok(current);
        }
        let _opening = self.0.opening.lock().await;
        if let Some(current) = self.0.current() {
            return Ok(current);
        }
        let conn = match tokio::time::timeout(
            self.0.connect_timeout,
            self.0
                .client
                .get_multiplexed_async_connection_with_config(&self.0.settings),
        )
        .await
        {
            Ok(conn) => conn?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "timed out after {:?} connecting to Redis",
                        self.0.connect_timeout
                    ),
                )
                .into())
            }
        };
        let generation = {
            let mut current = self.0.current.lock();
            current.generation += 1;
            current.conn = Some(conn.clone());
            current.generation
        };
        tracing::debug!(server = %self.0.server, generation, "opened the shared Redis connection");
        tokio::spawn(keep_alive(Arc::downgrade(&self.0), generation));
        Ok((generation, conn))
    }

    /// Runs one request on the current connection, bounded by `keep_alive`; a request left
    /// unanswered that long, or failing with a connection error, drops the connection.
    async fn run<'a, T>(
        &'a self,
        request: impl FnOnce(MultiplexedConnection) -> RedisFuture<'a, T>,
    ) -> RedisResult<T> {
        let (generation, conn) = self.get().await?;
        match tokio::time::timeout(self.0.keep_alive, request(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_unrecoverable_error() || e.is_io_error() {
                    self.0.drop_connection(generation, "it failed");
                }
                Err(e)
            }
            Err(_) => {
                self.0
                    .drop_connection(generation, "a command went unanswered for keep_alive");
                Err(self.0.unanswered())
            }
        }
    }
}

impl Inner {
    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        let current = self.current.lock();
        current
            .conn
            .as_ref()
            .map(|c| (current.generation, c.clone()))
    }

    /// Forgets connection `generation` if it is still the current one.
    fn drop_connection(&self, generation: u64, why: &str) {
        let dropped = {
            let mut current = self.current.lock();
            if current.generation == generation {
                current.conn.take()
            } else {
                None
            }
        };
        if dropped.is_some() {
            tracing::info!(server = %self.server, generation, "dropping the shared Redis connection: {why}; the next command opens a new one");
        }
    }

    /// The error of a command left unanswered for `keep_alive` (a connection error: retried by
    /// sends and acknowledgements).
    fn unanswered(&self) -> redis::RedisError {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "Redis did not answer within {:?} (keep_alive); the connection was replaced",
                self.keep_alive
            ),
        )
        .into()
    }
}

/// `PING`s connection `generation` every `keep_alive` while it is the current one, and drops it
/// when a `PING` is not answered within `keep_alive`: an idle connection that went silent is
/// noticed within twice `keep_alive`, not at the next command.
async fn keep_alive(inner: Weak<Inner>, generation: u64) {
    loop {
        let Some(every) = inner.upgrade().map(|i| i.keep_alive) else {
            return;
        };
        tokio::time::sleep(every).await;
        // (holding only the connection while waiting: the backend may go meanwhile)
        let Some(mut conn) = inner
            .upgrade()
            .and_then(|i| i.current())
            .filter(|(g, _)| *g == generation)
            .map(|(_, c)| c)
        else {
            return;
        };
        let answer =
            tokio::time::timeout(every, redis::cmd("PING").query_async::<()>(&mut conn)).await;
        drop(conn);
        let why = match answer {
            Ok(Ok(())) => continue,
            Ok(Err(e)) if !(e.is_unrecoverable_error() || e.is_io_error()) => continue,
            Ok(Err(_)) => "PING failed",
            Err(_) => "PING went unanswered for keep_alive",
        };
        if let Some(inner) = inner.upgrade() {
            inner.drop_connection(generation, why);
        }
        return;
    }
}

impl ConnectionLike for SharedConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.run(|mut c| Box::pin(async move { c.req_packed_command(cmd).await }))
                .await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.run(|mut c| {
                Box::pin(async move { c.req_packed_commands(pipe, offset, count).await })
            })
            .await
        })
    }

    fn get_db(&self) -> i64 {
        self.0.db
    }
}
