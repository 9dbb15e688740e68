//! Configuration of the MQTT backend: the options struct, its URL form and builder methods.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tg_backend_api::kit::config::{self, require, Secret};
use tg_backend_api::{Error, Result};

/// The broker's name in messages.
pub(crate) const TITLE: &str = "MQTT";

/// MQTT's largest packet: 268,435,455 bytes (a remaining length of 4 bytes).
pub(crate) const MAX_PACKET: u32 = 268_435_455;

/// Configuration of [`MqttBackend`](crate::MqttBackend).
///
/// From a URL (`MQTT_URL` / `--mqtt-url`):
/// `mqtt://user:pass@host:1883?client_id=tg&keep_alive=30s&tcp_nodelay=true` — `mqtts://` for
/// TLS (default port 8883). Every query option is optional; see each field for its name and
/// default. From flags (`--mqtt-host`, `--mqtt-port`, `--mqtt-username`, `--mqtt-password`):
/// [`MqttConfig::new`] and the builder methods.
///
/// ```
/// use std::time::Duration;
/// use tg_backend_mqtt::MqttConfig;
///
/// let c = MqttConfig::from_url("mqtt://svc:s3cret@broker:1884?client_id=loader&keep_alive=15s").unwrap();
/// assert_eq!((c.host.as_str(), c.port, c.keep_alive), ("broker", 1884, Duration::from_secs(15)));
/// assert_eq!(c.client_id_prefix, "loader");
/// assert!(!format!("{c:?}").contains("s3cret"));
///
/// let same = MqttConfig::new("broker", 1884).credentials("svc", "s3cret").client_id_prefix("loader");
/// assert_eq!(same.username.as_deref(), Some("svc"));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host name or address (the URL's host). Default: `localhost`.
    #[serde(skip)]
    pub host: String,
    /// Broker port (the URL's port). Default: 1883 (`mqtt://`), 8883 (`mqtts://`).
    #[serde(skip)]
    pub port: u16,
    /// TLS (the `mqtts://` scheme). Default: false.
    #[serde(skip)]
    pub tls: bool,
    /// User name (the URL's user). Default: none (anonymous).
    #[serde(skip)]
    pub username: Option<String>,
    /// Password (the URL's password); prints as `***`. Default: none.
    #[serde(skip)]
    pub password: Option<Secret>,
    /// Prefix of every MQTT client id this backend makes (URL option `client_id`): the producer
    /// connection is `{prefix}-p-{random}`, a consumer `{prefix}-{subscription}-{consumer name or
    /// random}`. 1 to 64 characters of `A-Z a-z 0-9 - _ . :`. Default: `tg`.
    #[serde(rename = "client_id")]
    pub client_id_prefix: String,
    /// MQTT keep-alive (`keep_alive`), 5 s to 65535 s. Default: 30 s.
    #[serde(with = "config::duration")]
    pub keep_alive: Duration,
    /// How long the broker keeps a q1/q2 consumer's session (its subscription and unacknowledged
    /// messages) after the connection drops (`session_expiry`, whole seconds on the wire).
    /// Default: 5 minutes.
    #[serde(with = "config::duration")]
    pub session_expiry: Duration,
    /// Disable Nagle's algorithm on the client socket (`tcp_nodelay`). Default: true — a
    /// message is written at once (p50 ≈ 0.1 ms on loopback when the broker also sets
    /// `set_tcp_nodelay true`) instead of waiting up to ~40 ms for more bytes; costs some
    /// throughput under flood. See `docs/mqtt.md`.
    pub tcp_nodelay: bool,
    /// Largest payload in bytes (`max_payload`). Also bounded by the broker's Maximum Packet
    /// Size (minus 64 KiB for topic and properties) when its CONNACK announces one.
    /// Default: 1 MiB.
    pub max_payload: usize,
    /// Requests (publishes, acks) queued towards one connection before `send` waits (URL option
    /// `capacity`, 1 to 1,048,576); acknowledgements never wait (beyond it they queue in the
    /// consumer, bounded by the messages it holds). Default: 1,000.
    #[serde(rename = "capacity")]
    pub request_capacity: usize,
    /// Unacknowledged QoS 1/2 publishes one connection keeps in flight (`inflight`, 1–65535);
    /// the broker's Receive Maximum lowers it. Default: 100.
    pub inflight: u16,
    /// Unacknowledged QoS 1/2 messages the broker may send one consumer before it waits for
    /// acknowledgements (`receive_maximum`, 1–65535, MQTT 5 Receive Maximum). A q1/q2
    /// consumer's buffer holds twenty times this (room for brokers that send more, as Mosquitto
    /// 2.0.11 does), a q0 consumer's twice. Default: 100.
    pub receive_maximum: u16,
    /// Time allowed for TCP + MQTT connect (`connect_timeout`, 1 s to 1 h; the TCP connect is
    /// given it in whole seconds, rounded up). Default: 5 s.
    #[serde(with = "config::duration")]
    pub connect_timeout: Duration,
    /// Ceiling of the reconnect back-off (`reconnect_max`, 100 ms to 1 h). The n-th delay is
    /// drawn uniformly from zero to `min(100 ms × 2ⁿ⁻¹, reconnect_max)` ("full jitter"), so a
    /// client tries again at most this long after the broker is back. Default: 2 s.
    #[serde(with = "config::duration")]
    pub reconnect_max: Duration,
    /// De-duplication ids (`tg-dedup-id`) one q2 consumer remembers (`dedup_capacity`, at most
    /// 16,777,216; 0 turns de-duplication off); the oldest is forgotten first. Default: 10,000.
    pub dedup_capacity: usize,
    /// For this long after a connection is re-established (`rejoin_grace`, up to 1 h; `0s` =
    /// off), a q1/q2 publish the broker answers with "no matching subscribers" is published
    /// again (after 100 ms, doubling to 1 s) instead of being confirmed as routed to nobody:
    /// after a broker restart its consumers need time to reconnect and resubscribe, and
    /// Mosquitto does not route to a shared subscription it restored until then. Keep it above
    /// the consumers' `reconnect_max`. While `request_capacity` publishes wait like this, new
    /// ones wait to be queued (as for a full request queue). Default: 15 s.
    #[serde(with = "config::duration")]
    pub rejoin_grace: Duration,
    /// PEM file of the certificate authorities trusted for TLS (`ca_file`); the system's root
    /// certificates when unset. Default: none.
    pub ca_file: Option<PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "localhost".to_owned(),
            port: Self::DEFAULT_PORT,
            tls: false,
            username: None,
            password: None,
            client_id_prefix: "tg".to_owned(),
            keep_alive: Duration::from_secs(30),
            session_expiry: Duration::from_secs(300),
            tcp_nodelay: true,
            max_payload: 1024 * 1024,
            request_capacity: 1000,
            inflight: 100,
            receive_maximum: 100,
            connect_timeout: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(2),
            dedup_capacity: 10_000,
            rejoin_grace: Duration::from_secs(15),
            ca_file: None,
        }
    }
}

/// The bounds the options are checked against.
const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(65_535));
const CONNECT_TIMEOUT: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));
const RECONNECT_MAX: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3600));
const MAX_REJOIN_GRACE: Duration = Duration::from_secs(3600);
const MAX_REQUEST_CAPACITY: usize = 1 << 20;
const MAX_DEDUP_CAPACITY: usize = 1 << 24;

impl MqttConfig {
    /// The plain URL scheme, `mqtt`.
    pub const SCHEME: &'static str = "mqtt";
    /// The TLS URL scheme, `mqtts`.
    pub const TLS_SCHEME: &'static str = "mqtts";
    /// The default port of `mqtt://`.
    pub const DEFAULT_PORT: u16 = 1883;
    /// The default port of `mqtts://`.
    pub const DEFAULT_TLS_PORT: u16 = 8883;

    /// A configuration for `host:port` with every other value at its default (the flag form).
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            ..Self::default()
        }
    }

    /// Parses `mqtt://[user[:password]@]host[:port][?option=value&…]` or `mqtts://…`.
    pub fn from_url(url: &str) -> Result<Self> {
        let url = config::parse_url::<Self>(TITLE, &[Self::SCHEME, Self::TLS_SCHEME], url)?;
        let host = url.require_host(TITLE, "mqtt://host:port")?;
        if !url.path.is_empty() {
            return Err(Error::config(format!(
                "MQTT URL must not have a path, got {:?}",
                url.path
            )));
        }
        let tls = url.scheme == Self::TLS_SCHEME;
        let port = url.port.unwrap_or(if tls {
            Self::DEFAULT_TLS_PORT
        } else {
            Self::DEFAULT_PORT
        });
        let config = Self {
            host,
            port,
            tls,
            username: url.username,
            password: url.password,
            ..url.options
        };
        config.check()?;
        Ok(config)
    }

    /// Checks every value against its bounds (the URL form, and [`MqttBackend::connect`] for a
    /// configuration made in code, whose fields are public).
    ///
    /// [`MqttBackend::connect`]: crate::MqttBackend::connect
    pub(crate) fn check(&self) -> Result<()> {
        let between = |d: Duration, (min, max): (Duration, Duration)| min <= d && d <= max;
        if self.host.is_empty() {
            return Err(Error::config("MQTT host is empty"));
        }
        check_prefix(&self.client_id_prefix)?;
        require(
            between(self.keep_alive, KEEP_ALIVE),
            TITLE,
            "keep_alive",
            "between 5s and 65535s",
        )?;
        require(
            self.session_expiry.as_secs() <= u64::from(u32::MAX),
            TITLE,
            "session_expiry",
            "at most 4294967295s",
        )?;
        require(
            (1..=MAX_PACKET as usize).contains(&self.max_payload),
            TITLE,
            "max_payload",
            "between 1 and 268435455",
        )?;
        require(
            (1..=MAX_REQUEST_CAPACITY).contains(&self.request_capacity),
            TITLE,
            "capacity",
            "between 1 and 1048576",
        )?;
        require(self.inflight >= 1, TITLE, "inflight", "at least 1")?;
        require(
            self.receive_maximum >= 1,
            TITLE,
            "receive_maximum",
            "at least 1",
        )?;
        require(
            between(self.connect_timeout, CONNECT_TIMEOUT),
            TITLE,
            "connect_timeout",
            "between 1s and 1h",
        )?;
        require(
            between(self.reconnect_max, RECONNECT_MAX),
            TITLE,
            "reconnect_max",
            "between 100ms and 1h",
        )?;
        require(
            self.dedup_capacity <= MAX_DEDUP_CAPACITY,
            TITLE,
            "dedup_capacity",
            "at most 16777216",
        )?;
        require(
            self.rejoin_grace <= MAX_REJOIN_GRACE,
            TITLE,
            "rejoin_grace",
            "at most 1h",
        )?;
        require(
            self.ca_file
                .as_ref()
                .is_none_or(|f| !f.as_os_str().is_empty()),
            TITLE,
            "ca_file",
            "a file name",
        )
    }

    /// Sets the user name and password.
    #[must_use]
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<Secret>) -> Self {
        self.username = Some(username.into());
        self.password = Some(password.into());
        self
    }

    /// Sets the user name only (for brokers that check names but not passwords).
    #[must_use]
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// Sets the client id prefix.
    #[must_use]
    pub fn client_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.client_id_prefix = prefix.into();
        self
    }

    /// Sets the keep-alive (clamped to 5 s–65535 s, the range MQTT and rumqttc accept).
    #[must_use]
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive.clamp(KEEP_ALIVE.0, KEEP_ALIVE.1);
        self
    }

    /// Sets TLS on or off (the `mqtts://` scheme).
    #[must_use]
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Trusts the certificate authorities of this PEM file for TLS (instead of the system's).
    #[must_use]
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Sets the session expiry of q1/q2 consumers.
    #[must_use]
    pub fn session_expiry(mut self, expiry: Duration) -> Self {
        self.session_expiry = expiry;
        self
    }

    /// Turns `TCP_NODELAY` on or off.
    #[must_use]
    pub fn tcp_nodelay(mut self, on: bool) -> Self {
        self.tcp_nodelay = on;
        self
    }

    /// Sets the largest payload (clamped to 1 byte–MQTT's largest packet).
    #[must_use]
    pub fn max_payload(mut self, max: usize) -> Self {
        self.max_payload = max.clamp(1, MAX_PACKET as usize);
        self
    }

    /// Sets the request queue capacity of a connection (clamped to 1–1,048,576).
    #[must_use]
    pub fn request_capacity(mut self, capacity: usize) -> Self {
        self.request_capacity = capacity.clamp(1, MAX_REQUEST_CAPACITY);
        self
    }

    /// Sets the in-flight window of outgoing QoS 1/2 publishes (at least 1).
    #[must_use]
    pub fn inflight(mut self, inflight: u16) -> Self {
        self.inflight = inflight.max(1);
        self
    }

    /// Sets the Receive Maximum of consumers (at least 1).
    #[must_use]
    pub fn receive_maximum(mut self, receive_maximum: u16) -> Self {
        self.receive_maximum = receive_maximum.max(1);
        self
    }

    /// Sets the connect timeout (clamped to 1 s–1 h).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.clamp(CONNECT_TIMEOUT.0, CONNECT_TIMEOUT.1);
        self
    }

    /// Sets the ceiling of the reconnect back-off (clamped to 100 ms–1 h).
    #[must_use]
    pub fn reconnect_max(mut self, ceiling: Duration) -> Self {
        self.reconnect_max = ceiling.clamp(RECONNECT_MAX.0, RECONNECT_MAX.1);
        self
    }

    /// Sets how many de-duplication ids a q2 consumer remembers (0 turns de-duplication off).
    #[must_use]
    pub fn dedup_capacity(mut self, capacity: usize) -> Self {
        self.dedup_capacity = capacity.min(MAX_DEDUP_CAPACITY);
        self
    }

    /// Sets how long after a reconnect unrouted q1/q2 publishes are published again
    /// ([`Duration::ZERO`] turns it off; at most 1 h).
    #[must_use]
    pub fn rejoin_grace(mut self, grace: Duration) -> Self {
        self.rejoin_grace = grace.min(MAX_REJOIN_GRACE);
        self
    }

    /// `host:port`, for messages (never with credentials).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL of the broker without credentials, for messages.
    pub fn redacted_url(&self) -> String {
        let scheme = if self.tls {
            Self::TLS_SCHEME
        } else {
            Self::SCHEME
        };
        match &self.username {
            Some(user) => format!("{scheme}://{user}:{}@{}", Secret::REDACTED, self.address()),
            None => format!("{scheme}://{}", self.address()),
        }
    }
}

fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(Error::config(format!(
            "MQTT client id prefix {prefix:?} must be 1 to 64 characters of A-Z a-z 0-9 - _ . :"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tg_backend_api::ErrorKind;

    #[test]
    fn full_url() {
        let c = MqttConfig::from_url(
            "mqtt://user:p%40ss%3Aword@10.0.0.5:1884?client_id=svc-1&keep_alive=15s&tcp_nodelay=false\
             &session_expiry=1m&max_payload=65536&capacity=10&inflight=20&receive_maximum=30\
             &connect_timeout=2s&reconnect_max=5s&dedup_capacity=7&rejoin_grace=2500ms",
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.tls), ("10.0.0.5", 1884, false));
        assert_eq!(c.username.as_deref(), Some("user"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("p@ss:word"));
        assert_eq!(c.client_id_prefix, "svc-1");
        assert_eq!(c.keep_alive, Duration::from_secs(15));
        assert!(!c.tcp_nodelay);
        assert_eq!(c.session_expiry, Duration::from_secs(60));
        assert_eq!(
            (
                c.max_payload,
                c.request_capacity,
                c.inflight,
                c.receive_maximum
            ),
            (65536, 10, 20, 30)
        );
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.reconnect_max, Duration::from_secs(5));
        assert_eq!(c.dedup_capacity, 7);
        assert_eq!(c.rejoin_grace, Duration::from_millis(2500));
        let off = MqttConfig::from_url("mqtt://h?rejoin_grace=0s&dedup_capacity=0").unwrap();
        assert_eq!((off.rejoin_grace, off.dedup_capacity), (Duration::ZERO, 0));
    }

    #[test]
    fn defaults_and_schemes() {
        let c = MqttConfig::from_url("mqtt://broker").unwrap();
        assert_eq!(c, MqttConfig::new("broker", 1883));
        let s = MqttConfig::from_url("mqtts://broker?ca_file=/etc/ca.pem").unwrap();
        assert_eq!((s.port, s.tls), (8883, true));
        assert_eq!(s.ca_file, Some("/etc/ca.pem".into()));
        let v6 = MqttConfig::from_url("mqtt://[::1]:1999/").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 1999));
        assert_eq!(v6.address(), "[::1]:1999");
        let user_only = MqttConfig::from_url("mqtt://reader@broker").unwrap();
        assert_eq!(
            (user_only.username.as_deref(), user_only.password),
            (Some("reader"), None)
        );
    }

    #[test]
    fn flag_form_matches_url_form() {
        let url = MqttConfig::from_url("mqtt://u:p@h:1?client_id=x&keep_alive=9s").unwrap();
        let flags = MqttConfig::new("h", 1)
            .credentials("u", "p")
            .client_id_prefix("x")
            .keep_alive(Duration::from_secs(9));
        assert_eq!(url, flags);
        assert_eq!(
            MqttConfig::new("h", 1)
                .keep_alive(Duration::ZERO)
                .keep_alive,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn debug_and_messages_hide_the_password() {
        let c = MqttConfig::from_url("mqtt://admin:hunter2@broker:1883").unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("***"), "{debug}");
        assert_eq!(c.redacted_url(), "mqtt://admin:***@broker:1883");
        let err = MqttConfig::from_url("mqtt://admin:hunter2@broker:99999").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = MqttConfig::from_url("mqtt://admin:hunter2@broker?inflight=0").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn bad_urls_name_the_problem() {
        for (url, needle) in [
            ("redis://x", "mqtt://"),
            ("not a url", "malformed"),
            ("mqtt://h?keep_alive=often", "keep_alive=\"often\""),
            ("mqtt://h?keep_alive=30", "a duration needs a unit"),
            (
                "mqtt://h?keep_alive=1s",
                "keep_alive must be between 5s and 65535s",
            ),
            ("mqtt://h?tcp_nodelay=maybe", "tcp_nodelay=\"maybe\""),
            (
                "mqtt://h?colour=blue",
                "\"colour\"; known: client_id, keep_alive, session_expiry",
            ),
            ("mqtt://h?dedup_window=100", "\"dedup_window\"; known:"),
            ("mqtt://h?client_id=a/b", "client id"),
            ("mqtt://h?inflight=0", "inflight must be at least 1"),
            ("mqtt://h?inflight=70000", "inflight=\"70000\""),
            (
                "mqtt://h?reconnect_max=10ms",
                "reconnect_max must be between 100ms and 1h",
            ),
            ("mqtt://h?ca_file=", "ca_file must be a file name"),
            ("mqtt://h?capacity=1&capacity=2", "given twice"),
            ("mqtt://h/path", "path"),
            ("mqtt://h:notaport", "malformed"),
            ("mqtt://?inflight=1", "no host"),
        ] {
            let err = MqttConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn a_configuration_made_in_code_is_checked_too() {
        let mut c = MqttConfig::new("h", 1);
        c.receive_maximum = 0;
        let err = c.check().unwrap_err();
        assert!(err.to_string().contains("receive_maximum"), "{err}");
        assert!(MqttConfig::new("", 1).check().is_err());
        assert!(MqttConfig::default().check().is_ok());
    }
}
