//! Configuration of the Kafka backend: the brokers, security and credentials from the settings
//! (`KAFKA_URL`, or the Python framework's `KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_SECURITY_PROTOCOL`
//! and `KAFKA_SASL_*`), and the options from the URL's query.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::Deserialize;
use tg_backend_api::kit::config::{self, require, Secret};
use tg_backend_api::kit::Settings;
use tg_backend_api::{Error, Result};

/// The broker's name in messages.
pub(crate) const TITLE: &str = "Kafka";
/// `kafka://` (plaintext) and `kafka+ssl://` (TLS).
pub(crate) const SCHEMES: &[&str] = &[KafkaConfig::SCHEME, KafkaConfig::TLS_SCHEME];
/// The port a broker address without one gets.
const DEFAULT_PORT: u16 = 9092;

/// How clients talk to the brokers: Kafka's `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    Plaintext,
    /// TLS, no SASL.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The name Kafka spells it with (`SASL_SSL`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }

    /// Whether connections use TLS.
    pub const fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    /// Whether connections authenticate with SASL.
    pub const fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    fn of(tls: bool, sasl: bool) -> Self {
        match (tls, sasl) {
            (false, false) => Self::Plaintext,
            (true, false) => Self::Ssl,
            (false, true) => Self::SaslPlaintext,
            (true, true) => Self::SaslSsl,
        }
    }
}

impl FromStr for SecurityProtocol {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        [
            Self::Plaintext,
            Self::Ssl,
            Self::SaslPlaintext,
            Self::SaslSsl,
        ]
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| {
            Error::config(format!(
                "unknown Kafka security protocol {s:?}; expected PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
            ))
        })
    }
}

impl fmt::Display for SecurityProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SASL credentials. The password is a [`Secret`]: `Debug` prints `***`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sasl {
    /// `PLAIN` (the default), `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: String,
    /// The user name.
    pub username: String,
    /// The password.
    pub password: Secret,
}

/// The URL query options of the Kafka backend; every one is optional (see `docs/kafka.md`).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaOptions {
    /// Partitions of the topics the backend creates. Default: 1, as the framework creates them.
    /// With one partition a topic keeps one producer's order and a consumer group has one
    /// active member; with more, members share the partitions and order holds per key.
    pub partitions: u32,
    /// Replicas of the topics the backend creates; `0` leaves it to the broker's
    /// `default.replication.factor`. Default: 1 (the framework's).
    pub replication_factor: u16,
    /// `retention.ms` of the q1 and q2 topics the backend creates. Default: 7 days (the
    /// framework's, for its `flow` class).
    #[serde(with = "config::duration")]
    pub retention: Duration,
    /// `retention.ms` of the q0 topics the backend creates. Default: 5 minutes (the framework's,
    /// for its `request`, `response` and `notify` classes).
    #[serde(with = "config::duration")]
    pub q0_retention: Duration,
    /// Largest payload in bytes. Default: 1,000,000 (the brokers' default record limit is
    /// 1,048,588 bytes per batch, headers and framing included).
    pub max_payload: usize,
    /// How long `connect` waits for the brokers, and the clients' connection setup timeout.
    /// Default: 10 s.
    #[serde(with = "config::duration")]
    pub connect_timeout: Duration,
    /// How long a message may wait for the broker's acknowledgement before its send fails
    /// (`message.timeout.ms`); `ProducerOptions::send_timeout` overrides it per producer.
    /// Default: 30 s.
    #[serde(with = "config::duration")]
    pub send_timeout: Duration,
    /// Ceiling of the reconnect back-off (`reconnect.backoff.max.ms`). Default: 10 s.
    #[serde(with = "config::duration")]
    pub reconnect_max: Duration,
    /// How long the producer waits for more messages to batch (`linger.ms`). Default: 5 ms.
    #[serde(with = "config::duration")]
    pub batch_delay: Duration,
    /// Whether q1 and q2 producers are idempotent (no duplicates or reordering from their
    /// retries). Default: true.
    pub idempotence: bool,
    /// A group member not heard from for this long is removed from its group
    /// (`session.timeout.ms`; heartbeats every third of it, at most every second). Default: 10 s.
    #[serde(with = "config::duration")]
    pub session_timeout: Duration,
    /// How long creating a consumer waits for its group to give it its partitions. Default: 30 s.
    #[serde(with = "config::duration")]
    pub join_timeout: Duration,
    /// Acknowledgements are committed at least this often. Default: 100 ms.
    #[serde(with = "config::duration")]
    pub commit_interval: Duration,
    /// …or as soon as this many acknowledgements wait. Default: 500.
    pub commit_batch: usize,
    /// Messages a consumer holds fetched and not yet received before it pauses fetching (it
    /// also pauses at 64 MiB of payloads). Default: 100,000, librdkafka's own prefetch bound:
    /// librdkafka drops what it prefetched for a paused partition and fetches it again, so the
    /// bound is one the consumer seldom reaches.
    pub receiver_queue: usize,
    /// How long a broker may hold a fetch that finds nothing new (`fetch.wait.max.ms`).
    /// Default: 500 ms (Kafka's).
    #[serde(with = "config::duration")]
    pub fetch_wait: Duration,
    /// How long a q2 consumer remembers a `tg-dedup-id`. Default: 10 minutes.
    #[serde(with = "config::duration")]
    pub dedup_window: Duration,
    /// Most `tg-dedup-id`s a q2 consumer remembers (oldest forgotten first); `0` turns
    /// de-duplication off. Default: 100,000.
    pub dedup_capacity: usize,
    /// A PEM file of the certificate authorities trusted for TLS (`ssl.ca.location`); default:
    /// the system's.
    pub ca_file: Option<String>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            partitions: 1,
            replication_factor: 1,
            retention: Duration::from_secs(7 * 24 * 3600),
            q0_retention: Duration::from_secs(300),
            max_payload: 1_000_000,
            connect_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            reconnect_max: Duration::from_secs(10),
            batch_delay: Duration::from_millis(5),
            idempotence: true,
            session_timeout: Duration::from_secs(10),
            join_timeout: Duration::from_secs(30),
            commit_interval: Duration::from_millis(100),
            commit_batch: 500,
            receiver_queue: 100_000,
            fetch_wait: Duration::from_millis(500),
            dedup_window: Duration::from_secs(600),
            dedup_capacity: 100_000,
            ca_file: None,
        }
    }
}

impl KafkaOptions {
    fn checked(self) -> Result<Self> {
        for (value, min, max, option) in [
            (u64::from(self.partitions), 1, 100_000, "partitions"),
            (
                u64::from(self.replication_factor),
                0,
                32,
                "replication_factor",
            ),
            (self.max_payload as u64, 1, 1 << 30, "max_payload"),
            (self.commit_batch as u64, 1, 1 << 20, "commit_batch"),
            (self.receiver_queue as u64, 1, 1 << 20, "receiver_queue"),
            (self.dedup_capacity as u64, 0, 1 << 24, "dedup_capacity"),
        ] {
            let rule = format!("between {min} and {max}");
            require((min..=max).contains(&value), TITLE, option, &rule)?;
        }
        let (ms, s, min, h) = (
            Duration::from_millis(1),
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::from_secs(3600),
        );
        let century = h * 24 * 365 * 100;
        for (value, low, high, option) in [
            (self.retention, s, century, "retention"),
            (self.q0_retention, s, century, "q0_retention"),
            (self.connect_timeout, 100 * ms, h, "connect_timeout"),
            (self.send_timeout, 100 * ms, h, "send_timeout"),
            (self.reconnect_max, 100 * ms, h, "reconnect_max"),
            (self.batch_delay, Duration::ZERO, min, "batch_delay"),
            (self.session_timeout, s, h, "session_timeout"),
            (self.join_timeout, 100 * ms, h, "join_timeout"),
            (self.commit_interval, ms, min, "commit_interval"),
            (self.fetch_wait, Duration::ZERO, 5 * min, "fetch_wait"),
        ] {
            let rule = format!(
                "between {} and {}",
                humantime::format_duration(low),
                humantime::format_duration(high)
            );
            require((low..=high).contains(&value), TITLE, option, &rule)?;
        }
        let ca_file = self.ca_file.as_ref().is_none_or(|p| !p.trim().is_empty());
        require(ca_file, TITLE, "ca_file", "a file name")?;
        Ok(self)
    }
}

/// Configuration of [`KafkaBackend`](crate::KafkaBackend).
///
/// From a URL (`KAFKA_URL` / `--kafka-url`): `kafka://host:port[,host:port…][?option=value&…]`,
/// `kafka+ssl://` for TLS, `kafka://user:password@host` for SASL; or, as the Python framework
/// configures Kafka, from `KAFKA_BOOTSTRAP_SERVERS` (`host:port,host:port`),
/// `KAFKA_SECURITY_PROTOCOL` and `KAFKA_SASL_MECHANISM` / `_USERNAME` / `_PASSWORD`
/// ([`KafkaConfig::from_env`]).
///
/// ```
/// use std::time::Duration;
/// use tg_backend_kafka::{KafkaConfig, SecurityProtocol};
///
/// let c = KafkaConfig::from_url("kafka://b1:9092,b2?partitions=3&commit_interval=50ms").unwrap();
/// assert_eq!(c.bootstrap_servers(), "b1:9092,b2:9092");
/// assert_eq!(c.options.partitions, 3);
/// assert_eq!(c.options.commit_interval, Duration::from_millis(50));
///
/// let sasl = KafkaConfig::from_url("kafka+ssl://svc:s3cret@kafka.example.com:9093").unwrap();
/// assert_eq!(sasl.security_protocol, SecurityProtocol::SaslSsl);
/// assert!(!format!("{sasl:?}").contains("s3cret"));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// The bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// TLS and SASL.
    pub security_protocol: SecurityProtocol,
    /// SASL credentials, for the SASL protocols.
    pub sasl: Option<Sasl>,
    /// The URL options.
    pub options: KafkaOptions,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: vec![format!("localhost:{DEFAULT_PORT}")],
            security_protocol: SecurityProtocol::Plaintext,
            sasl: None,
            options: KafkaOptions::default(),
        }
    }
}

impl KafkaConfig {
    /// `kafka://`: plaintext (SASL_PLAINTEXT with credentials).
    pub const SCHEME: &'static str = "kafka";
    /// `kafka+ssl://`: TLS (SASL_SSL with credentials).
    pub const TLS_SCHEME: &'static str = "kafka+ssl";
    /// The URL variable.
    pub const ENV_URL: &'static str = "KAFKA_URL";
    /// The brokers as the Python framework names them (`host:port,host:port`).
    pub const ENV_BOOTSTRAP: &'static str = "KAFKA_BOOTSTRAP_SERVERS";
    /// The framework's `security.protocol` variable.
    pub const ENV_SECURITY_PROTOCOL: &'static str = "KAFKA_SECURITY_PROTOCOL";
    /// The framework's SASL mechanism variable.
    pub const ENV_SASL_MECHANISM: &'static str = "KAFKA_SASL_MECHANISM";
    /// The framework's SASL user variable.
    pub const ENV_SASL_USERNAME: &'static str = "KAFKA_SASL_USERNAME";
    /// The framework's SASL password variable (a secret).
    pub const ENV_SASL_PASSWORD: &'static str = "KAFKA_SASL_PASSWORD";
    /// The brokers when nothing names them.
    pub const DEFAULT_BOOTSTRAP: &'static str = "localhost:9092";

    /// A configuration for these brokers (`host:port`), plaintext, every option at its default.
    pub fn new(brokers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            brokers: brokers.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Parses `kafka://[user:password@]host[:port][,host[:port]…][?option=value&…]` or
    /// `kafka+ssl://…`. A bare `host[:port],…` is read as `kafka://host[:port],…`.
    pub fn from_url(url: &str) -> Result<Self> {
        let url = url.trim();
        let full = if url.contains("://") {
            url.to_owned()
        } else {
            format!("{}://{url}", Self::SCHEME)
        };
        // A URL has one host; Kafka lists its bootstrap brokers with commas. The first stays in
        // the URL, the others are read as URLs of their own.
        let (first, more) = split_brokers(&full);
        let parsed = config::parse_url::<KafkaOptions>(TITLE, SCHEMES, &first)?;
        if !parsed.path.is_empty() {
            return Err(Error::config(format!(
                "Kafka URL must not have a path, got {:?}",
                parsed.path
            )));
        }
        let mut brokers = vec![broker(
            &parsed.require_host(TITLE, "kafka://host:port")?,
            parsed.port,
        )];
        for other in more {
            let url = format!("{}://{other}", Self::SCHEME);
            let parsed = config::parse_url::<KafkaOptions>(TITLE, SCHEMES, &url).map_err(|e| {
                let message = format!("Kafka broker {other:?} in the URL: {}", e.message());
                e.with_message(message)
            })?;
            let host = parsed.require_host(TITLE, "kafka://host:port,host:port")?;
            if parsed.username.is_some() || !parsed.path.is_empty() {
                return Err(Error::config(format!(
                    "Kafka broker {other:?} in the URL must be host[:port]"
                )));
            }
            brokers.push(broker(&host, parsed.port));
        }
        let sasl = match (parsed.username, parsed.password) {
            (Some(username), password) => Some(Sasl {
                mechanism: "PLAIN".to_owned(),
                username,
                password: password.unwrap_or_default(),
            }),
            (None, Some(_)) => {
                return Err(Error::config("Kafka URL has a password but no user name"))
            }
            (None, None) => None,
        };
        let tls = parsed.scheme == Self::TLS_SCHEME;
        Ok(Self {
            brokers,
            security_protocol: SecurityProtocol::of(tls, sasl.is_some()),
            sasl,
            options: parsed.options.checked()?,
        })
    }

    /// The configuration from the environment: `KAFKA_URL`, else `KAFKA_BOOTSTRAP_SERVERS`, else
    /// `localhost:9092`; then `KAFKA_SECURITY_PROTOCOL` and the `KAFKA_SASL_*` variables when set
    /// and not empty (they win over the URL's). Errors name the variable.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] with another source of variables (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String> + Sync) -> Result<Self> {
        Self::from_settings(&Settings::new(&crate::DRIVER, &get))
    }

    /// The configuration from the driver's settings (what `DRIVER` connects with).
    pub(crate) fn from_settings(settings: &Settings<'_>) -> Result<Self> {
        let given = |env: &str| {
            settings
                .given(env)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let (env, url) = match given(Self::ENV_URL) {
            Some(url) => (Self::ENV_URL, url),
            None => (
                Self::ENV_BOOTSTRAP,
                settings
                    .get(Self::ENV_BOOTSTRAP)
                    .unwrap_or_else(|| Self::DEFAULT_BOOTSTRAP.to_owned()),
            ),
        };
        let mut config = Self::from_url(&url).map_err(|e| settings.named(env, e))?;
        let username = given(Self::ENV_SASL_USERNAME);
        let password = given(Self::ENV_SASL_PASSWORD);
        let mechanism = given(Self::ENV_SASL_MECHANISM);
        if username.is_some() || password.is_some() || mechanism.is_some() {
            let from_url = config.sasl.take();
            let sasl = Sasl {
                mechanism: mechanism
                    .or_else(|| from_url.as_ref().map(|s| s.mechanism.clone()))
                    .unwrap_or_else(|| "PLAIN".to_owned()),
                username: username
                    .or_else(|| from_url.as_ref().map(|s| s.username.clone()))
                    .unwrap_or_default(),
                password: password
                    .map(Secret::new)
                    .or_else(|| from_url.map(|s| s.password))
                    .unwrap_or_default(),
            };
            config.security_protocol =
                SecurityProtocol::of(config.security_protocol.tls(), !sasl.username.is_empty());
            config.sasl = (!sasl.username.is_empty()).then_some(sasl);
        }
        if let Some(protocol) = given(Self::ENV_SECURITY_PROTOCOL) {
            config.security_protocol = protocol
                .parse()
                .map_err(|e| settings.named(Self::ENV_SECURITY_PROTOCOL, e))?;
        }
        if config.security_protocol.sasl() && config.sasl.is_none() {
            return Err(settings.named(
                Self::ENV_SECURITY_PROTOCOL,
                Error::config(format!(
                    "{} needs a user name: set KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD, or kafka://user:password@host",
                    config.security_protocol
                )),
            ));
        }
        Ok(config)
    }

    /// The bootstrap brokers as librdkafka takes them: `host:port,host:port`.
    pub fn bootstrap_servers(&self) -> String {
        self.brokers.join(",")
    }

    /// Sets the security protocol.
    #[must_use]
    pub fn security_protocol(mut self, protocol: SecurityProtocol) -> Self {
        self.security_protocol = protocol;
        self
    }

    /// Sets SASL credentials (mechanism `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`) and a SASL
    /// protocol (SASL_SSL if TLS was on, else SASL_PLAINTEXT).
    #[must_use]
    pub fn sasl(
        mut self,
        mechanism: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.sasl = Some(Sasl {
            mechanism: mechanism.into(),
            username: username.into(),
            password: Secret::new(password),
        });
        self.security_protocol = SecurityProtocol::of(self.security_protocol.tls(), true);
        self
    }

    /// Sets the partitions of the topics the backend creates (at least 1).
    #[must_use]
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.options.partitions = partitions.max(1);
        self
    }

    /// Sets the largest payload (at least 1 byte).
    #[must_use]
    pub fn max_payload(mut self, max: usize) -> Self {
        self.options.max_payload = max.max(1);
        self
    }

    /// Sets how often acknowledgements are committed at least (at least 1 ms).
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.options.commit_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets the session timeout of consumers (at least 1 s).
    #[must_use]
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.options.session_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// The largest message librdkafka sends or fetches: the payload limit and room for the key,
    /// the headers and the framing.
    pub(crate) fn message_max_bytes(&self) -> usize {
        (self.options.max_payload + 64 * 1024).max(1_000_000)
    }

    /// The settings every client of the backend shares: brokers, security, time-outs.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        let ms = |d: Duration| d.as_millis().to_string();
        c.set("bootstrap.servers", self.bootstrap_servers())
            .set("client.id", "tg-pubsub")
            .set("security.protocol", self.security_protocol.as_str())
            .set(
                "socket.connection.setup.timeout.ms",
                ms(self.options.connect_timeout.max(Duration::from_secs(1))),
            )
            .set("reconnect.backoff.max.ms", ms(self.options.reconnect_max))
            .set("message.max.bytes", self.message_max_bytes().to_string());
        if let Some(sasl) = &self.sasl {
            c.set("sasl.mechanisms", &sasl.mechanism)
                .set("sasl.username", &sasl.username)
                .set("sasl.password", sasl.password.expose());
        }
        if let Some(ca) = &self.options.ca_file {
            c.set("ssl.ca.location", ca);
        }
        c
    }

    /// The common settings plus a group member's: session and heartbeat, and fetches large
    /// enough for the largest message.
    pub(crate) fn consumer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        let session = self.options.session_timeout;
        // heartbeats are how a member learns of a rebalance: often, as the framework's (1 s)
        let heartbeat = (session / 3).min(Duration::from_secs(1));
        c.set("session.timeout.ms", session.as_millis().to_string())
            // the framework's aiokafka members offer `roundrobin` only: offered first, it is the
            // protocol a group of Rust and Python members agrees on (tansu keeps the first
            // member's first choice for good, docs/kafka.md)
            .set("partition.assignment.strategy", "roundrobin,range")
            .set("heartbeat.interval.ms", heartbeat.as_millis().to_string())
            .set(
                "fetch.wait.max.ms",
                self.options.fetch_wait.as_millis().to_string(),
            )
            .set(
                "max.partition.fetch.bytes",
                self.message_max_bytes().max(1 << 20).to_string(),
            );
        c
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn broker(host: &str, port: Option<u16>) -> String {
    let port = port.unwrap_or(DEFAULT_PORT);
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `scheme://[user@]a:1,b:2,c?query` into `scheme://[user@]a:1?query` and `["b:2", "c"]`.
fn split_brokers(url: &str) -> (String, Vec<String>) {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return (url.to_owned(), Vec::new());
    };
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let authority = &url[start..end];
    let hosts_at = authority.rfind('@').map_or(0, |i| i + 1);
    let mut hosts = authority[hosts_at..].split(',');
    let first = hosts.next().unwrap_or_default();
    let more: Vec<String> = hosts.map(str::to_owned).collect();
    if more.is_empty() {
        return (url.to_owned(), more);
    }
    let rebuilt = format!(
        "{}{}{first}{}",
        &url[..start],
        &authority[..hosts_at],
        &url[end..]
    );
    (rebuilt, more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tg_backend_api::ErrorKind;

    fn lookup(vars: &[(&str, &str)]) -> Result<KafkaConfig> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        KafkaConfig::from_lookup(move |name| vars.get(name).cloned())
    }

    #[test]
    fn urls() {
        let c =
            KafkaConfig::from_url("kafka://a,b:9093,[::1]:7?partitions=2&send_timeout=5s").unwrap();
        assert_eq!(c.brokers, ["a:9092", "b:9093", "[::1]:7"]);
        assert_eq!(c.security_protocol, SecurityProtocol::Plaintext);
        assert_eq!(c.options.partitions, 2);
        assert_eq!(c.options.send_timeout, Duration::from_secs(5));
        assert_eq!(
            KafkaConfig::from_url("broker").unwrap().brokers,
            ["broker:9092"]
        );
        let tls = KafkaConfig::from_url("kafka+ssl://k?ca_file=/etc/ca.pem").unwrap();
        assert_eq!(tls.security_protocol, SecurityProtocol::Ssl);
        assert_eq!(tls.options.ca_file.as_deref(), Some("/etc/ca.pem"));
        let sasl = KafkaConfig::from_url("kafka://u%40x:p%3Aw@k1,k2").unwrap();
        assert_eq!(sasl.brokers, ["k1:9092", "k2:9092"]);
        assert_eq!(sasl.security_protocol, SecurityProtocol::SaslPlaintext);
        let creds = sasl.sasl.unwrap();
        assert_eq!(
            (creds.username.as_str(), creds.password.expose()),
            ("u@x", "p:w")
        );
        assert_eq!(
            KafkaConfig::from_url("kafka://localhost:9092").unwrap(),
            KafkaConfig::default()
        );
    }

    #[test]
    fn bad_urls_name_the_problem() {
        for (url, needle) in [
            ("redis://x", "kafka://"),
            (
                "kafka://k?partitions=0",
                "partitions must be between 1 and 100000",
            ),
            (
                "kafka://k?colour=blue",
                "\"colour\"; known: partitions, replication_factor",
            ),
            ("kafka://k?send_timeout=100", "a duration needs a unit"),
            (
                "kafka://k?connect_timeout=50ms",
                "connect_timeout must be between 100ms and 1h",
            ),
            ("kafka://k/path", "must not have a path"),
            ("kafka://:pw@k", "password but no user name"),
            ("kafka://k,b:x", "Kafka broker \"b:x\""),
            ("kafka://k?ca_file=", "ca_file must be a file name"),
        ] {
            let err = KafkaConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn framework_variables() {
        let c = lookup(&[]).unwrap();
        assert_eq!(c.bootstrap_servers(), "localhost:9092");
        let c = lookup(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092"),
            ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_SASL_USERNAME", "svc"),
            ("KAFKA_SASL_PASSWORD", "hunter2"),
        ])
        .unwrap();
        assert_eq!(c.bootstrap_servers(), "k1:9092,k2:9092");
        assert_eq!(c.security_protocol, SecurityProtocol::SaslSsl);
        let sasl = c.sasl.clone().unwrap();
        assert_eq!(sasl.mechanism, "SCRAM-SHA-512");
        assert_eq!(sasl.password.expose(), "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
        // the URL wins over the framework's brokers
        let c = lookup(&[
            ("KAFKA_URL", "kafka://u:p@url-broker"),
            ("KAFKA_BOOTSTRAP_SERVERS", "other:9092"),
        ])
        .unwrap();
        assert_eq!(c.brokers, ["url-broker:9092"]);
        assert_eq!(c.security_protocol, SecurityProtocol::SaslPlaintext);
        let err = lookup(&[("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")]).unwrap_err();
        assert!(err.message().contains("needs a user name"), "{err}");
        assert!(
            err.message()
                .starts_with("KAFKA_SECURITY_PROTOCOL / --kafka-security-protocol"),
            "{err}"
        );
        let err = lookup(&[("KAFKA_SECURITY_PROTOCOL", "TLS")]).unwrap_err();
        assert!(
            err.message().contains("unknown Kafka security protocol"),
            "{err}"
        );
        let err = lookup(&[("KAFKA_URL", "kafka://k?partitions=x")]).unwrap_err();
        assert!(
            err.message().starts_with("KAFKA_URL / --kafka-url"),
            "{err}"
        );
    }

    #[test]
    fn client_settings_carry_the_secret_only_to_librdkafka() {
        let c = KafkaConfig::from_url("kafka+ssl://svc:hunter2@k?max_payload=2000000").unwrap();
        let cc = c.client_config();
        assert_eq!(cc.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cc.get("sasl.password"), Some("hunter2"));
        assert_eq!(cc.get("message.max.bytes"), Some("2065536"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
