//! Configuration of the RabbitMQ backend: `RABBITMQ_URL`, or the Python framework's
//! `RABBITMQ_HOST`, `RABBITMQ_PORT`, `RABBITMQ_USERNAME`, `RABBITMQ_PASSWORD` and `RABBITMQ_VHOST`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tg_backend_api::kit::config::{self, require, Secret};
use tg_backend_api::kit::{BackendConfig, Settings};
use tg_backend_api::{Error, Result};

use crate::RabbitBackend;

/// The queue type of the durable queues tg-pubsub declares (q1, q2 and the `flow` namespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Classic queues, as the Python framework declares them (no `x-queue-type`): the default, so
    /// that both sides can declare the same queue. Redeliveries carry only the `redelivered` flag.
    #[default]
    Classic,
    /// Quorum queues (`x-queue-type=quorum`): replicated, and they count deliveries
    /// (`x-delivery-count`), so `Message::redelivery_count` is exact. The framework's declare of
    /// the same queue then fails with `PRECONDITION_FAILED`.
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// The URL query options of the RabbitMQ backend (`amqp://host/vhost?prefetch=1&…`).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitOptions {
    /// Unacknowledged messages the broker hands one consumer ahead (`basic.qos`). Default: 256;
    /// 1 is what the Python framework uses.
    pub prefetch: u16,
    /// The type of the durable queues tg-pubsub declares. Default: classic.
    pub queue_type: QueueType,
    /// Largest payload in bytes; larger sends fail with `PayloadTooLarge` before anything is sent.
    /// Default: 16 MiB (RabbitMQ's own `max_message_size` is 128 MiB by default; set this at most
    /// to the server's).
    pub max_payload: usize,
    /// Bound of one connection attempt (TCP, TLS and the AMQP handshake). Default: 5 s.
    #[serde(with = "config::duration")]
    pub connect_timeout: Duration,
    /// How long a send may wait for a channel (through a reconnection) before failing; producers
    /// override it with `ProducerOptions::send_timeout`. Default: 30 s.
    #[serde(with = "config::duration")]
    pub send_timeout: Duration,
    /// Ceiling of the reconnect back-off, which starts at 50 ms and never gives up. Default: 5 s.
    #[serde(with = "config::duration")]
    pub reconnect_max: Duration,
    /// AMQP heartbeat interval asked of the broker: a dead connection is noticed within about two
    /// of them. Default: 10 s.
    #[serde(with = "config::duration")]
    pub heartbeat: Duration,
    /// How long a q2 consumer remembers a de-duplication id. Default: 10 minutes.
    #[serde(with = "config::duration")]
    pub dedup_window: Duration,
    /// Most de-duplication ids a q2 consumer remembers (oldest forgotten first). Default: 100,000.
    pub dedup_capacity: usize,
    /// Dead-letter exchange of the durable queues tg-pubsub declares (`x-dead-letter-exchange`):
    /// where the broker moves messages past `delivery_limit`. Default: none.
    pub dead_letter_exchange: Option<String>,
    /// Deliveries after which a quorum queue dead-letters (or drops) a message
    /// (`x-delivery-limit`; needs `queue_type=quorum`). Default: none.
    pub delivery_limit: Option<u32>,
}

impl Default for RabbitOptions {
    fn default() -> Self {
        Self {
            prefetch: 256,
            queue_type: QueueType::Classic,
            max_payload: 16 << 20,
            connect_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(30),
            reconnect_max: Duration::from_secs(5),
            heartbeat: Duration::from_secs(10),
            dedup_window: Duration::from_secs(600),
            dedup_capacity: 100_000,
            dead_letter_exchange: None,
            delivery_limit: None,
        }
    }
}

/// RabbitMQ's hard ceiling of `max_message_size`.
const SERVER_CEILING: usize = 512 << 20;

impl RabbitOptions {
    fn checked(self) -> Result<Self> {
        let what = crate::DRIVER.title;
        require(self.prefetch >= 1, what, "prefetch", "at least 1")?;
        require(
            (1..=SERVER_CEILING).contains(&self.max_payload),
            what,
            "max_payload",
            "between 1 and 536870912 (RabbitMQ's ceiling of max_message_size)",
        )?;
        require(
            !self.connect_timeout.is_zero(),
            what,
            "connect_timeout",
            "more than 0s",
        )?;
        require(
            self.heartbeat.as_secs() <= u64::from(u16::MAX),
            what,
            "heartbeat",
            "at most 65535s",
        )?;
        require(
            self.delivery_limit.is_none() || self.queue_type == QueueType::Quorum,
            what,
            "delivery_limit",
            "used with queue_type=quorum (classic queues have no delivery limit)",
        )?;
        if let Some(dlx) = &self.dead_letter_exchange {
            require(
                !dlx.is_empty() && dlx.len() <= crate::topic::MAX_NAME,
                what,
                "dead_letter_exchange",
                "1 to 255 bytes long",
            )?;
        }
        Ok(self)
    }
}

/// Configuration of [`RabbitBackend`](crate::RabbitBackend): where the broker is, how to log in,
/// and the [`RabbitOptions`].
///
/// ```
/// use std::time::Duration;
/// use tg_backend_rabbitmq::RabbitConfig;
///
/// let c = RabbitConfig::from_url("amqp://app:s3cret@mq:5673/prod?prefetch=1&send_timeout=5s").unwrap();
/// assert_eq!((c.host.as_str(), c.port, c.vhost.as_str()), ("mq", 5673, "prod"));
/// assert_eq!(c.options.prefetch, 1);
/// assert_eq!(c.options.send_timeout, Duration::from_secs(5));
/// assert!(!format!("{c:?}").contains("s3cret"));
/// assert_eq!(RabbitConfig::from_url("amqp://localhost").unwrap().vhost, "/");
/// ```
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitConfig {
    /// TLS (`amqps://`), with the system's root certificates.
    pub tls: bool,
    /// The broker's host. Default: `localhost`.
    pub host: String,
    /// The broker's port. Default: 5672 (5671 with TLS).
    pub port: u16,
    /// The user. Default: `guest`.
    pub username: String,
    /// The password. Default: `guest`.
    pub password: Secret,
    /// The virtual host. Default: `/`.
    pub vhost: String,
    /// The URL options.
    pub options: RabbitOptions,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            tls: false,
            host: "localhost".into(),
            port: 5672,
            username: "guest".into(),
            password: Secret::new("guest"),
            vhost: "/".into(),
            options: RabbitOptions::default(),
        }
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("server", &self.server())
            .field("username", &self.username)
            .field("password", &self.password)
            .field("options", &self.options)
            .finish()
    }
}

impl RabbitConfig {
    /// Parses `amqp://[user[:password]@]host[:port][/vhost][?option=value&…]` (`amqps://` for
    /// TLS). An absent or empty path is the vhost `/`; write other vhosts percent-encoded.
    pub fn from_url(url: &str) -> Result<Self> {
        let d = &crate::DRIVER;
        let parsed = config::parse_url::<RabbitOptions>(d.title, d.schemes, url)?;
        let tls = parsed.scheme == "amqps";
        let host = parsed.require_host(d.title, "amqp://host[:port][/vhost]")?;
        let defaults = Self::default();
        Ok(Self {
            tls,
            host,
            port: parsed.port.unwrap_or(if tls { 5671 } else { 5672 }),
            username: parsed.username.unwrap_or(defaults.username),
            password: parsed.password.unwrap_or(defaults.password),
            vhost: if parsed.path.is_empty() {
                defaults.vhost
            } else {
                parsed.path
            },
            options: parsed.options.checked()?,
        })
    }

    /// The Python framework's settings: host, port, user, password and vhost, with its defaults.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        username: impl Into<String>,
        password: impl Into<String>,
        vhost: impl Into<String>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            username: username.into(),
            password: Secret::new(password),
            vhost: vhost.into(),
            ..Self::default()
        }
    }

    /// `RABBITMQ_URL` if given, else the framework's host, port, user, password and vhost.
    pub(crate) fn from_settings(settings: &Settings<'_>) -> Result<Self> {
        if let Some(url) = settings.given("RABBITMQ_URL") {
            return Self::from_url(&url).map_err(|e| settings.named("RABBITMQ_URL", e));
        }
        let get = |env: &str| settings.get(env).unwrap_or_default();
        let port_text = get("RABBITMQ_PORT");
        let port: u16 = port_text.trim().parse().map_err(|_| {
            settings.named(
                "RABBITMQ_PORT",
                Error::config(format!("{port_text:?} is not a port number (1-65535)")),
            )
        })?;
        Ok(Self::new(
            get("RABBITMQ_HOST"),
            port,
            get("RABBITMQ_USERNAME"),
            get("RABBITMQ_PASSWORD"),
            get("RABBITMQ_VHOST"),
        ))
    }

    /// `host:port/vhost` with the scheme, for messages (no credentials).
    pub fn server(&self) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        format!("{scheme}://{}:{}/{}", self.host, self.port, self.vhost)
    }

    /// Sets the options.
    #[must_use]
    pub fn options(mut self, options: RabbitOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets the prefetch (at least 1; 1 is the framework's).
    #[must_use]
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.options.prefetch = prefetch.max(1);
        self
    }

    /// Sets the queue type of durable queues.
    #[must_use]
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.options.queue_type = queue_type;
        self
    }

    /// Sets the largest payload.
    #[must_use]
    pub fn max_payload(mut self, max_payload: usize) -> Self {
        self.options.max_payload = max_payload.clamp(1, SERVER_CEILING);
        self
    }

    /// Sets the ceiling of the reconnect back-off.
    #[must_use]
    pub fn reconnect_max(mut self, reconnect_max: Duration) -> Self {
        self.options.reconnect_max = reconnect_max;
        self
    }
}

impl BackendConfig for RabbitConfig {
    type Backend = RabbitBackend;

    async fn connect(self) -> Result<RabbitBackend> {
        RabbitBackend::connect(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tg_backend_api::ErrorKind;

    #[test]
    fn url_parts_and_options() {
        let c = RabbitConfig::from_url(
            "amqps://u%40x:p%3Aw@mq.example/tg%2Fprod?prefetch=1&queue_type=quorum&max_payload=1024&connect_timeout=1s&send_timeout=2s&reconnect_max=3s&heartbeat=4s&dedup_window=5s&dedup_capacity=6&dead_letter_exchange=dlx&delivery_limit=7",
        )
        .unwrap();
        assert!(c.tls);
        assert_eq!((c.host.as_str(), c.port), ("mq.example", 5671));
        assert_eq!((c.username.as_str(), c.password.expose()), ("u@x", "p:w"));
        assert_eq!(c.vhost, "tg/prod");
        let o = &c.options;
        assert_eq!(
            (o.prefetch, o.queue_type, o.max_payload),
            (1, QueueType::Quorum, 1024)
        );
        assert_eq!(
            [
                o.connect_timeout,
                o.send_timeout,
                o.reconnect_max,
                o.heartbeat,
                o.dedup_window
            ],
            [1, 2, 3, 4, 5].map(Duration::from_secs)
        );
        assert_eq!(o.dedup_capacity, 6);
        assert_eq!(o.dead_letter_exchange.as_deref(), Some("dlx"));
        assert_eq!(o.delivery_limit, Some(7));
        let d = RabbitConfig::from_url("amqp://localhost").unwrap();
        assert_eq!(d, RabbitConfig::default());
        assert_eq!(RabbitConfig::from_url("amqp://h/%2f").unwrap().vhost, "/");
    }

    #[test]
    fn bad_urls_name_the_problem_and_hide_the_password() {
        for (url, needle) in [
            ("redis://x", "amqp://"),
            ("amqp://h?prefetch=0", "prefetch must be at least 1"),
            ("amqp://h?prefetch=70000", "prefetch=\"70000\""),
            ("amqp://h?queue_type=stream", "queue_type=\"stream\""),
            ("amqp://h?delivery_limit=3", "queue_type=quorum"),
            ("amqp://h?connect_timeout=5", "a duration needs a unit"),
            ("amqp://h?max_payload=0", "max_payload must be"),
            (
                "amqp://u:s3cret@h?colour=blue",
                "\"colour\"; known: prefetch, queue_type",
            ),
            ("amqp://u:s3cret@", "malformed"),
        ] {
            let err = RabbitConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
            assert!(!err.to_string().contains("s3cret"), "{url}: {err}");
        }
    }
}
