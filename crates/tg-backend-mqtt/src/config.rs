//! Configuration of the MQTT backend: a struct, a URL form and setters.

use std::fmt;
use std::time::Duration;

use tg_backend_api::{Error, Result};

/// Configuration of [`MqttBackend`](crate::MqttBackend).
///
/// From a URL (spec 003's `MQTT_URL`):
/// `mqtt://user:pass@host:1883?client_id=tg&keep_alive=30&tcp_nodelay=true` — `mqtts://` for TLS
/// (default port 8883). Every query parameter is optional; see each field for its name and default.
/// From flags (`--mqtt-host`, `--mqtt-port`, `--mqtt-username`, `--mqtt-password`):
/// [`MqttConfig::new`] and the setters.
///
/// ```
/// use std::time::Duration;
/// use tg_backend_mqtt::MqttConfig;
///
/// let c = MqttConfig::from_url("mqtt://svc:s3cret@broker:1884?client_id=loader&keep_alive=15").unwrap();
/// assert_eq!((c.host.as_str(), c.port, c.keep_alive), ("broker", 1884, Duration::from_secs(15)));
/// assert_eq!(c.client_id_prefix, "loader");
/// assert!(!format!("{c:?}").contains("s3cret"));
///
/// let same = MqttConfig::new("broker", 1884).credentials("svc", "s3cret").client_id_prefix("loader");
/// assert_eq!(same.username.as_deref(), Some("svc"));
/// ```
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// Broker host name or address. Default: `localhost`.
    pub host: String,
    /// Broker port. Default: 1883 (`mqtt://`), 8883 (`mqtts://`).
    pub port: u16,
    /// TLS (`mqtts://`). Default: false.
    pub tls: bool,
    /// PEM file of the certificate authorities trusted for TLS (`ca_file`); the system's root
    /// certificates when unset. Default: none.
    pub ca_file: Option<std::path::PathBuf>,
    /// User name. Default: none (anonymous).
    pub username: Option<String>,
    /// Password; never printed by `Debug`, errors or logs. Default: none.
    pub password: Option<String>,
    /// Prefix of every MQTT client id this backend makes (`client_id` in the URL): the producer
    /// connection is `{prefix}-p-{random}`, a consumer `{prefix}-{subscription}-{consumer name or
    /// random}`. Default: `tg`.
    pub client_id_prefix: String,
    /// MQTT keep-alive (`keep_alive`, seconds, 5–65535). Default: 30 s.
    pub keep_alive: Duration,
    /// How long the broker keeps a q1/q2 consumer's session (its subscription and unacknowledged
    /// messages) after the connection drops (`session_expiry`, seconds). Default: 300 s.
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
    /// Requests (publishes, acks) queued towards one connection before `send` waits
    /// (`capacity`); acknowledgements never wait (beyond it they queue in the consumer, bounded
    /// by the messages it holds). Default: 1,000.
    pub request_capacity: usize,
    /// Unacknowledged QoS 1/2 publishes one connection keeps in flight (`inflight`, 1–65535);
    /// the broker's Receive Maximum lowers it. Default: 100.
    pub inflight: u16,
    /// Unacknowledged QoS 1/2 messages the broker may send one consumer before it waits for
    /// acknowledgements (`receive_maximum`, 1–65535, MQTT 5 Receive Maximum). A q1/q2
    /// consumer's buffer holds twenty times this (room for brokers that send more, as Mosquitto
    /// 2.0.11 does), a q0 consumer's twice. Default: 100.
    pub receive_maximum: u16,
    /// Time allowed for TCP + MQTT connect (`connect_timeout`, seconds). Default: 5 s.
    pub connect_timeout: Duration,
    /// Upper bound of the reconnect delay (`reconnect_max`, milliseconds). Delays grow
    /// exponentially from 100 ms with full jitter, so a client tries again at most this long
    /// after the broker is back. Default: 2 s.
    pub reconnect_max_delay: Duration,
    /// De-duplication ids (`tg-dedup-id`) one q2 consumer remembers (`dedup_window`).
    /// Default: 10,000.
    pub dedup_window: usize,
    /// For this long after a connection is re-established (`rejoin_grace`, milliseconds; 0 =
    /// off), a q1/q2 publish the broker answers with "no matching subscribers" is published
    /// again (after 100 ms, doubling to 1 s) instead of being confirmed as routed to nobody:
    /// after a broker restart its consumers need time to reconnect and resubscribe, and
    /// Mosquitto does not route to a shared subscription it restored until then. Keep it above
    /// the consumers' `reconnect_max`. At most `request_capacity` publishes wait like this; the
    /// ones beyond resolve at once. Default: 15 s.
    pub rejoin_grace: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "localhost".to_owned(),
            port: Self::DEFAULT_PORT,
            tls: false,
            ca_file: None,
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
            reconnect_max_delay: Duration::from_secs(2),
            dedup_window: 10_000,
            rejoin_grace: Duration::from_secs(15),
        }
    }
}

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

    /// Parses `mqtt://[user[:password]@]host[:port][?key=value&…]` or `mqtts://…`.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::config(format!("malformed MQTT URL {:?}: {e}", redact(url))))?;
        let tls = match parsed.scheme() {
            Self::SCHEME => false,
            Self::TLS_SCHEME => true,
            other => {
                return Err(Error::config(format!(
                    "MQTT URL must start with mqtt:// or mqtts://, got scheme {other:?}"
                )))
            }
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| Error::config("MQTT URL has no host (expected mqtt://host:port)"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = parsed.port().unwrap_or(if tls {
            Self::DEFAULT_TLS_PORT
        } else {
            Self::DEFAULT_PORT
        });
        let mut config = Self {
            host,
            port,
            tls,
            ..Self::default()
        };
        if !parsed.username().is_empty() {
            config.username = Some(decode(parsed.username(), "user name")?);
        }
        if let Some(password) = parsed.password() {
            config.password = Some(decode(password, "password")?);
        }
        if parsed.path() != "" && parsed.path() != "/" {
            return Err(Error::config(format!(
                "MQTT URL must not have a path, got {:?}",
                parsed.path()
            )));
        }
        for (key, value) in parsed.query_pairs() {
            let int = |min: u64, max: u64| -> Result<u64> {
                match value.parse::<u64>() {
                    Ok(n) if (min..=max).contains(&n) => Ok(n),
                    Ok(n) => Err(Error::config(format!(
                        "MQTT URL parameter {key}={n} is out of range {min}..={max}"
                    ))),
                    Err(e) => Err(Error::config(format!(
                        "MQTT URL parameter {key}={value:?} is not a number: {e}"
                    ))),
                }
            };
            match &*key {
                "client_id" => {
                    check_prefix(&value)?;
                    config.client_id_prefix = value.into_owned();
                }
                "keep_alive" => config.keep_alive = Duration::from_secs(int(5, 65_535)?),
                "session_expiry" => {
                    config.session_expiry = Duration::from_secs(int(0, u64::from(u32::MAX))?)
                }
                "tcp_nodelay" => {
                    config.tcp_nodelay = match &*value {
                        "true" | "1" | "yes" | "on" => true,
                        "false" | "0" | "no" | "off" => false,
                        other => {
                            return Err(Error::config(format!(
                        "MQTT URL parameter tcp_nodelay={other:?} is not a boolean (true/false)"
                    )))
                        }
                    }
                }
                "max_payload" => {
                    config.max_payload = int(1, u64::from(MAX_PACKET))? as usize;
                }
                "capacity" => config.request_capacity = int(1, 1 << 20)? as usize,
                "inflight" => config.inflight = int(1, 65_535)? as u16,
                "receive_maximum" => config.receive_maximum = int(1, 65_535)? as u16,
                "connect_timeout" => config.connect_timeout = Duration::from_secs(int(1, 3600)?),
                "reconnect_max" => {
                    config.reconnect_max_delay = Duration::from_millis(int(100, 3_600_000)?)
                }
                "dedup_window" => config.dedup_window = int(0, 1 << 24)? as usize,
                "rejoin_grace" => {
                    config.rejoin_grace = Duration::from_millis(int(0, 3_600_000)?)
                }
                "ca_file" => {
                    if value.is_empty() {
                        return Err(Error::config("MQTT URL parameter ca_file is empty"));
                    }
                    config.ca_file = Some(value.into_owned().into());
                }
                other => {
                    return Err(Error::config(format!(
                        "unknown MQTT URL parameter {other:?}; known: client_id, keep_alive, \
                         session_expiry, tcp_nodelay, max_payload, capacity, inflight, \
                         receive_maximum, connect_timeout, reconnect_max, dedup_window, rejoin_grace, \
                         ca_file"
                    )))
                }
            }
        }
        Ok(config)
    }

    /// Sets the user name and password.
    #[must_use]
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
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
        self.keep_alive = keep_alive.clamp(Duration::from_secs(5), Duration::from_secs(65_535));
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
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
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

    /// Sets the largest payload.
    #[must_use]
    pub fn max_payload(mut self, max: usize) -> Self {
        self.max_payload = max.clamp(1, MAX_PACKET as usize);
        self
    }

    /// Sets the request queue capacity of a connection (at least 1).
    #[must_use]
    pub fn request_capacity(mut self, capacity: usize) -> Self {
        self.request_capacity = capacity.max(1);
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

    /// Sets the connect timeout (at least 1 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Sets the upper bound of the reconnect delay (at least 100 ms).
    #[must_use]
    pub fn reconnect_max_delay(mut self, delay: Duration) -> Self {
        self.reconnect_max_delay = delay.max(Duration::from_millis(100));
        self
    }

    /// Sets the de-duplication window of q2 consumers.
    #[must_use]
    pub fn dedup_window(mut self, window: usize) -> Self {
        self.dedup_window = window;
        self
    }

    /// Sets how long after a reconnect unrouted q1/q2 publishes are published again
    /// ([`Duration::ZERO`] turns it off).
    #[must_use]
    pub fn rejoin_grace(mut self, grace: Duration) -> Self {
        self.rejoin_grace = grace;
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
            Some(user) => format!("{scheme}://{user}:***@{}", self.address()),
            None => format!("{scheme}://{}", self.address()),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.host.is_empty() {
            return Err(Error::config("MQTT host is empty"));
        }
        check_prefix(&self.client_id_prefix)
    }
}

/// MQTT's largest packet: 268,435,455 bytes (a remaining length of 4 bytes).
pub(crate) const MAX_PACKET: u32 = 268_435_455;

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

fn decode(s: &str, what: &str) -> Result<String> {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| Error::config(format!("MQTT URL {what} is not valid percent-encoding")))
}

/// The URL with any password replaced by `***`, for error messages about malformed URLs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            let userinfo = &url[start + 3..at];
            match userinfo.find(':') {
                Some(colon) => {
                    format!(
                        "{}{}:***{}",
                        &url[..start + 3],
                        &userinfo[..colon],
                        &url[at..]
                    )
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("client_id_prefix", &self.client_id_prefix)
            .field("keep_alive", &self.keep_alive)
            .field("session_expiry", &self.session_expiry)
            .field("tcp_nodelay", &self.tcp_nodelay)
            .field("max_payload", &self.max_payload)
            .field("request_capacity", &self.request_capacity)
            .field("inflight", &self.inflight)
            .field("receive_maximum", &self.receive_maximum)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("dedup_window", &self.dedup_window)
            .field("rejoin_grace", &self.rejoin_grace)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tg_backend_api::ErrorKind;

    #[test]
    fn full_url() {
        let c = MqttConfig::from_url(
            "mqtt://user:p%40ss%3Aword@10.0.0.5:1884?client_id=svc-1&keep_alive=15&tcp_nodelay=false\
             &session_expiry=60&max_payload=65536&capacity=10&inflight=20&receive_maximum=30\
             &connect_timeout=2&reconnect_max=5000&dedup_window=7&rejoin_grace=2500",
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.tls), ("10.0.0.5", 1884, false));
        assert_eq!(c.username.as_deref(), Some("user"));
        assert_eq!(c.password.as_deref(), Some("p@ss:word"));
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
        assert_eq!(c.reconnect_max_delay, Duration::from_secs(5));
        assert_eq!(c.dedup_window, 7);
        assert_eq!(c.rejoin_grace, Duration::from_millis(2500));
    }

    #[test]
    fn defaults_and_schemes() {
        let c = MqttConfig::from_url("mqtt://broker").unwrap();
        assert_eq!(c, MqttConfig::new("broker", 1883));
        let s = MqttConfig::from_url("mqtts://broker?ca_file=/etc/ca.pem").unwrap();
        assert_eq!((s.port, s.tls), (8883, true));
        assert_eq!(s.ca_file, Some("/etc/ca.pem".into()));
        let v6 = MqttConfig::from_url("mqtt://[::1]:1999").unwrap();
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
        let url = MqttConfig::from_url("mqtt://u:p@h:1?client_id=x&keep_alive=9").unwrap();
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
    }

    #[test]
    fn bad_urls_name_the_problem() {
        for (url, needle) in [
            ("redis://x", "mqtt://"),
            ("not a url", "malformed"),
            ("mqtt://h?keep_alive=often", "keep_alive"),
            ("mqtt://h?keep_alive=1", "out of range"),
            ("mqtt://h?tcp_nodelay=maybe", "tcp_nodelay"),
            ("mqtt://h?colour=blue", "colour"),
            ("mqtt://h?client_id=a/b", "client id"),
            ("mqtt://h?inflight=0", "inflight"),
            ("mqtt://h/path", "path"),
            ("mqtt://h:notaport", "malformed"),
        ] {
            let err = MqttConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }
}
