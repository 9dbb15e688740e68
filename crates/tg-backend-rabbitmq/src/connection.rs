//! One AMQP connection that comes back: channels are opened on the current connection, and when it
//! is gone (broker restart, network, a connection-level error) the next caller reconnects, one at a
//! time, with exponential back-off. Producers and consumers hold channels, never the connection,
//! and open a new channel here when theirs closes.

use std::fmt;
use std::time::Duration;

use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Channel, Connection, ConnectionProperties};
use tg_backend_api::{Backoff, Error, ErrorKind, Result};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::RabbitConfig;
use crate::error::{connect_error, convert};

/// `operation` bounded by `limit`: a broker that stops answering (blocked by a resource alarm,
/// or a connection that died without a FIN) fails the call with `Timeout` instead of hanging it.
pub(crate) async fn bounded<T>(
    limit: Duration,
    doing: &str,
    operation: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, operation).await {
        Ok(result) => result.map_err(|e| convert(e, doing)),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!("RabbitMQ: {doing}: no answer within {limit:?}"),
        )),
    }
}

/// A connection of the backend (one for producers, one for consumers), reconnected on demand.
pub(crate) struct Link {
    /// `producers` or `consumers`, for logs and the broker's connection list.
    role: &'static str,
    uri: AMQPUri,
    server: String,
    connect_timeout: Duration,
    backoff: Backoff,
    closed: CancellationToken,
    state: tokio::sync::Mutex<State>,
}

struct State {
    connection: Option<Connection>,
    /// Connections made so far (a channel remembers the one it was opened on).
    generation: u64,
    /// Failed attempts since the last success.
    failures: u32,
    /// No attempt before this.
    next_attempt: Instant,
    last_error: Option<Error>,
}

impl Link {
    pub(crate) fn new(
        role: &'static str,
        config: &RabbitConfig,
        closed: CancellationToken,
    ) -> Self {
        let o = &config.options;
        let uri = AMQPUri {
            scheme: if config.tls {
                AMQPScheme::AMQPS
            } else {
                AMQPScheme::AMQP
            },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: config.username.clone(),
                    password: config.password.expose().to_owned(),
                },
                host: config.host.clone(),
                port: config.port,
            },
            vhost: config.vhost.clone(),
            query: AMQPQueryString {
                heartbeat: Some(u16::try_from(o.heartbeat.as_secs()).unwrap_or(u16::MAX)),
                connection_timeout: Some(
                    u64::try_from(o.connect_timeout.as_millis()).unwrap_or(u64::MAX),
                ),
                ..AMQPQueryString::default()
            },
        };
        Self {
            role,
            uri,
            server: config.server(),
            connect_timeout: o.connect_timeout,
            backoff: Backoff::new(Duration::from_millis(50), o.reconnect_max),
            closed,
            state: tokio::sync::Mutex::new(State {
                connection: None,
                generation: 0,
                failures: 0,
                next_attempt: Instant::now(),
                last_error: None,
            }),
        }
    }

    /// The bound of one broker operation (`connect_timeout`).
    pub(crate) fn op_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The server, for messages: `amqp://host:port/vhost`.
    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// One connection attempt, bounded by `connect_timeout`.
    async fn connect_once(&self) -> Result<Connection> {
        let properties = ConnectionProperties::default().with_connection_name(
            format!("tg-pubsub {} (pid {})", self.role, std::process::id()).into(),
        );
        match tokio::time::timeout(
            self.connect_timeout,
            Connection::connect_uri(self.uri.clone(), properties),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(connect_error(e, &self.server)),
            Err(_) => Err(Error::new(
                ErrorKind::Connection,
                format!(
                    "cannot connect to RabbitMQ at {}: no answer within {:?}",
                    self.server, self.connect_timeout
                ),
            )),
        }
    }

    /// Connects now, once: the first connection of a backend, whose errors `connect` returns.
    pub(crate) async fn start(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        let connection = self.connect_once().await?;
        state.connection = Some(connection);
        state.generation += 1;
        Ok(())
    }

    /// A new channel on the current connection and that connection's generation, reconnecting
    /// first if it is gone. Waits through the back-off until `deadline`, then fails with the last
    /// connection error; a refused login fails at once.
    pub(crate) async fn channel(&self, deadline: Instant) -> Result<(Channel, u64)> {
        loop {
            if self.closed.is_cancelled() {
                return Err(Error::closed("RabbitMQ backend"));
            }
            let mut state = self.state.lock().await;
            if let Some(connection) = &state.connection {
                if connection.status().connected() {
                    let opened =
                        tokio::time::timeout(self.connect_timeout, connection.create_channel())
                            .await;
                    match opened {
                        Ok(Ok(channel)) => return Ok((channel, state.generation)),
                        Ok(Err(e)) if connection.status().connected() => {
                            return Err(convert(e, "opening a channel"))
                        }
                        Err(_) => {
                            tracing::warn!(
                                role = self.role,
                                "no answer to channel.open within {:?}; reconnecting",
                                self.connect_timeout
                            );
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(role = self.role, error = %e, "the connection closed while opening a channel");
                        }
                    }
                }
                tracing::warn!(role = self.role, server = %self.server, "RabbitMQ connection lost; reconnecting");
                state.connection = None;
            }
            let now = Instant::now();
            if now < state.next_attempt {
                let wait = state.next_attempt;
                let last = state.last_error.as_ref().map(clone_error);
                drop(state);
                if wait > deadline {
                    return Err(last.unwrap_or_else(|| {
                        Error::connection(format!("RabbitMQ at {} is unreachable", self.server))
                    }));
                }
                tokio::select! {
                    () = tokio::time::sleep_until(wait) => {}
                    () = self.closed.cancelled() => {}
                }
                continue;
            }
            match self.connect_once().await {
                Ok(connection) => {
                    if state.failures > 0 {
                        tracing::info!(role = self.role, server = %self.server, attempts = state.failures + 1, "RabbitMQ connection back");
                    }
                    state.connection = Some(connection);
                    state.generation += 1;
                    state.failures = 0;
                    state.last_error = None;
                }
                Err(e) => {
                    state.failures = state.failures.saturating_add(1);
                    state.next_attempt = Instant::now() + self.backoff.delay(state.failures);
                    tracing::debug!(role = self.role, error = %e, failures = state.failures, "RabbitMQ reconnect failed");
                    if e.kind() == ErrorKind::Auth || Instant::now() >= deadline {
                        return Err(e);
                    }
                    state.last_error = Some(clone_error(&e));
                }
            }
        }
    }

    /// Closes the connection (the backend closes).
    pub(crate) async fn close(&self) {
        let connection = self.state.lock().await.connection.take();
        if let Some(connection) = connection {
            if connection.status().connected() {
                let _ = bounded(
                    self.connect_timeout,
                    "closing the connection",
                    connection.close(200, "tg-pubsub backend closed".into()),
                )
                .await;
            }
        }
    }
}

/// Errors hold their source and are not `Clone`; the copy a waiting caller gets keeps the kind
/// and the text.
fn clone_error(e: &Error) -> Error {
    Error::new(e.kind(), e.message().to_owned())
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("role", &self.role)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}
