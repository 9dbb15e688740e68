//! Configuration of the Redis backend.

use std::fmt;
use std::time::Duration;

use tg_backend_api::{Error, Result};

/// Configuration of [`RedisBackend`](crate::RedisBackend).
///
/// From a URL (what `REDIS_URL` / `--redis-url` hold):
///
/// ```text
/// redis[s]://[[user]:password@]host[:port][/db][?param=value&…]
/// ```
///
/// `rediss://` connects with TLS (needs the crate feature `tls-rustls`). User name and password are
/// percent-decoded. Every parameter is optional; each is one field below: `connect_timeout_ms`,
/// `send_timeout_ms`, `max_len`, `batch`, `block_ms`, `visibility_timeout_ms`, `lease_ms`,
/// `dedup_window_s`, `max_payload`, `q0_buffer`, `prefix`.
///
/// ```
/// use std::time::Duration;
/// use tg_backend_redis::RedisConfig;
///
/// let config = RedisConfig::from_url("redis://app:s3cret@cache.internal:6380/2?max_len=5000").unwrap();
/// assert_eq!((config.host.as_str(), config.port, config.db), ("cache.internal", 6380, 2));
/// assert_eq!(config.username.as_deref(), Some("app"));
/// assert_eq!(config.max_len, 5000);
/// assert!(!format!("{config:?}").contains("s3cret"));
/// let config = config.connect_timeout(Duration::from_millis(500));
/// assert_eq!(config.connect_timeout, Duration::from_millis(500));
/// ```
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Server host name or address. Default: `127.0.0.1`.
    pub host: String,
    /// Server port. Default: 6379.
    pub port: u16,
    /// Connect with TLS (`rediss://`). Default: false.
    pub tls: bool,
    /// ACL user name. Default: none (the `default` user).
    pub username: Option<String>,
    /// Password; never printed by `Debug`, errors or logs. Default: none.
    pub password: Option<String>,
    /// Database number (the URL path). Default: 0.
    pub db: i64,
    /// How long `connect` (and every reconnection attempt) may take before failing with
    /// `Connection`. Default: 3 s.
    pub connect_timeout: Duration,
    /// How long a send may wait for Redis (including reconnecting) before its receipt fails.
    /// Default: 30 s. A producer's `ProducerOptions::send_timeout` overrides it.
    pub send_timeout: Duration,
    /// Approximate bound of every q1/q2 stream (`XADD … MAXLEN ~ max_len`). When a stream reaches
    /// it, its oldest entries are trimmed whether or not every subscription consumed them.
    /// Default: 1,000,000.
    pub max_len: u64,
    /// Most entries one `XREADGROUP` fetches per stream for one consumer; a consumer reads again
    /// once it buffers at most this many, so it buffers about twice this (three times when the
    /// retry stream and the topic stream both deliver a full batch). Default: 64.
    pub batch: usize,
    /// How long one blocking `XREADGROUP` waits before it is issued again. Default: 2 s.
    pub block: Duration,
    /// How long a message may stay unacknowledged with a consumer before other members of its
    /// group reclaim it (`XAUTOCLAIM`): the recovery time after a consumer crashed. Default: 30 s.
    pub visibility_timeout: Duration,
    /// Lifetime of the lease of an exclusive or failover consumer, renewed every third of it: a
    /// standby takes over at most this long after the active consumer died. Default: 5 s.
    pub lease: Duration,
    /// How long a q2 de-duplication id is remembered. Default: 10 minutes.
    pub dedup_window: Duration,
    /// Largest payload in bytes. Default: 5 MiB.
    pub max_payload: usize,
    /// Messages one q0 consumer buffers; while it is full, further q0 messages for that consumer
    /// are dropped (best effort) and a warning is logged. Default: 65,536.
    pub q0_buffer: usize,
    /// First segment of every key and channel this backend uses. Default: `tgps`.
    pub prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 6379,
            tls: false,
            username: None,
            password: None,
            db: 0,
            connect_timeout: Duration::from_secs(3),
            send_timeout: Duration::from_secs(30),
            max_len: 1_000_000,
            batch: 64,
            block: Duration::from_secs(2),
            visibility_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(5),
            dedup_window: Duration::from_secs(600),
            max_payload: 5 * 1024 * 1024,
            q0_buffer: 65_536,
            prefix: "tgps".to_owned(),
        }
    }
}

const PARAMS: &str = "connect_timeout_ms, send_timeout_ms, max_len, batch, block_ms, \
                      visibility_timeout_ms, lease_ms, dedup_window_s, max_payload, q0_buffer, prefix";

impl RedisConfig {
    /// The URL the local development server answers on.
    pub const DEFAULT_URL: &'static str = "redis://127.0.0.1:6379";

    /// Parses `redis://` or `rediss://` URLs (see the type's docs).
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::config(format!("malformed Redis URL {:?}: {e}", redact(url))))?;
        let tls = match parsed.scheme() {
            "redis" => false,
            "rediss" => true,
            other => {
                return Err(Error::config(format!(
                    "Redis URL must start with redis:// or rediss://, got scheme {other:?}"
                )))
            }
        };
        let host = match parsed.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
            _ => {
                return Err(Error::config(
                    "Redis URL has no host (expected redis://host:port)",
                ))
            }
        };
        let mut config = Self {
            host,
            tls,
            ..Self::default()
        };
        if let Some(port) = parsed.port() {
            config.port = port;
        }
        let decode = |s: &str, what: &str| {
            percent_decode(s).ok_or_else(|| {
                Error::config(format!(
                    "Redis URL {what} is not valid percent-encoded UTF-8"
                ))
            })
        };
        if !parsed.username().is_empty() {
            config.username = Some(decode(parsed.username(), "user name")?);
        }
        if let Some(password) = parsed.password() {
            config.password = Some(decode(password, "password")?);
        }
        let path = parsed.path().trim_matches('/');
        if !path.is_empty() {
            config.db = path.parse::<i64>().ok().filter(|d| *d >= 0).ok_or_else(|| {
                Error::config(format!(
                    "Redis URL path {path:?} is not a database number (expected e.g. redis://host/2)"
                ))
            })?;
        }
        for (key, value) in parsed.query_pairs() {
            let number = || {
                value.parse::<u64>().map_err(|e| {
                    Error::config(format!(
                        "Redis URL parameter {key}={value:?} is not a number: {e}"
                    ))
                })
            };
            let millis = || number().map(Duration::from_millis);
            match &*key {
                "connect_timeout_ms" => config.connect_timeout = millis()?,
                "send_timeout_ms" => config.send_timeout = millis()?,
                "max_len" => config.max_len = number()?,
                "batch" => config.batch = number()? as usize,
                "block_ms" => config.block = millis()?,
                "visibility_timeout_ms" => config.visibility_timeout = millis()?,
                "lease_ms" => config.lease = millis()?,
                "dedup_window_s" => config.dedup_window = Duration::from_secs(number()?),
                "max_payload" => config.max_payload = number()? as usize,
                "q0_buffer" => config.q0_buffer = number()? as usize,
                "prefix" => config.prefix = value.into_owned(),
                other => {
                    return Err(Error::config(format!(
                        "unknown Redis URL parameter {other:?}; known: {PARAMS}"
                    )))
                }
            }
        }
        config.check()
    }

    /// Checks the values that must be positive (every setter and `from_url` end here).
    fn check(self) -> Result<Self> {
        let zero = [
            ("connect_timeout", self.connect_timeout.is_zero()),
            ("send_timeout", self.send_timeout.is_zero()),
            ("max_len", self.max_len == 0),
            ("batch", self.batch == 0),
            ("block", self.block.is_zero()),
            ("visibility_timeout", self.visibility_timeout.is_zero()),
            ("lease", self.lease < Duration::from_millis(30)),
            ("dedup_window", self.dedup_window < Duration::from_secs(1)),
            ("max_payload", self.max_payload == 0),
            ("q0_buffer", self.q0_buffer == 0),
            (
                "prefix",
                self.prefix.is_empty() || self.prefix.contains(['{', '}']),
            ),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, bad)| *bad) {
            return Err(Error::config(format!(
                "Redis option {name} is out of range (durations and sizes must be positive, the \
                 lease at least 30 ms, the dedup window at least 1 s, the prefix non-empty without braces)"
            )));
        }
        Ok(self)
    }

    /// `redis://host:port/db` (or `rediss://`), without credentials: how errors and logs name the
    /// server.
    pub fn server(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}/{}", self.host, self.port, self.db)
        } else {
            format!("{scheme}://{}:{}/{}", self.host, self.port, self.db)
        }
    }

    /// Sets the host.
    #[must_use]
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Sets the port.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Turns TLS on or off.
    #[must_use]
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Sets user name and password.
    #[must_use]
    pub fn credentials(mut self, username: Option<String>, password: Option<String>) -> Self {
        self.username = username;
        self.password = password;
        self
    }

    /// Sets the database number.
    #[must_use]
    pub fn db(mut self, db: i64) -> Self {
        self.db = db;
        self
    }

    /// Sets the connect timeout (at least 1 ms).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Sets the default send timeout (at least 1 ms).
    #[must_use]
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Sets the approximate stream bound (at least 1).
    #[must_use]
    pub fn max_len(mut self, max_len: u64) -> Self {
        self.max_len = max_len.max(1);
        self
    }

    /// Sets the read batch (at least 1).
    #[must_use]
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Sets the blocking read time (at least 1 ms).
    #[must_use]
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block.max(Duration::from_millis(1));
        self
    }

    /// Sets the visibility timeout (at least 1 ms).
    #[must_use]
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Sets the lease of exclusive and failover consumers (at least 30 ms).
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// Sets the q2 de-duplication window (at least 1 s; Redis expiries are whole seconds here).
    #[must_use]
    pub fn dedup_window(mut self, window: Duration) -> Self {
        self.dedup_window = window.max(Duration::from_secs(1));
        self
    }

    /// Sets the largest payload (at least 1).
    #[must_use]
    pub fn max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload.max(1);
        self
    }

    /// Sets the q0 consumer buffer (at least 1).
    #[must_use]
    pub fn q0_buffer(mut self, messages: usize) -> Self {
        self.q0_buffer = messages.max(1);
        self
    }

    /// Sets the key prefix (empty or braces are ignored: the default stays).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        if !prefix.is_empty() && !prefix.contains(['{', '}']) {
            self.prefix = prefix;
        }
        self
    }

    /// The client crate's connection info.
    pub(crate) fn connection_info(&self) -> Result<redis::ConnectionInfo> {
        let addr = if self.tls {
            if cfg!(feature = "tls-rustls") {
                redis::ConnectionAddr::TcpTls {
                    host: self.host.clone(),
                    port: self.port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                return Err(Error::config(format!(
                    "{} asks for TLS but tg-backend-redis was built without its `tls-rustls` feature",
                    self.server()
                )));
            }
        } else {
            redis::ConnectionAddr::Tcp(self.host.clone(), self.port)
        };
        Ok(redis::ConnectionInfo {
            addr,
            redis: redis::RedisConnectionInfo {
                db: self.db,
                username: self.username.clone(),
                password: self.password.clone(),
                protocol: redis::ProtocolVersion::RESP2,
            },
        })
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("server", &self.server())
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("max_len", &self.max_len)
            .field("batch", &self.batch)
            .field("block", &self.block)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("lease", &self.lease)
            .field("dedup_window", &self.dedup_window)
            .field("max_payload", &self.max_payload)
            .field("q0_buffer", &self.q0_buffer)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// The URL with any password replaced, for error messages about a URL that did not parse.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:<redacted>{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tg_backend_api::ErrorKind;

    #[test]
    fn defaults_from_plain_url() {
        let c = RedisConfig::from_url("redis://127.0.0.1:6379").unwrap();
        assert_eq!(c, RedisConfig::default());
        let c = RedisConfig::from_url("redis://localhost").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.db, c.tls),
            ("localhost", 6379, 0, false)
        );
    }

    #[test]
    fn credentials_db_and_tls() {
        let c =
            RedisConfig::from_url("rediss://svc:p%40ss%3Aword@redis.example.com:6390/3").unwrap();
        assert!(c.tls);
        assert_eq!(c.username.as_deref(), Some("svc"));
        assert_eq!(c.password.as_deref(), Some("p@ss:word"));
        assert_eq!(
            (c.host.as_str(), c.port, c.db),
            ("redis.example.com", 6390, 3)
        );
        assert_eq!(c.server(), "rediss://redis.example.com:6390/3");
        // password only (Redis < 6 AUTH)
        let c = RedisConfig::from_url("redis://:only@h/1").unwrap();
        assert_eq!(
            (c.username, c.password.as_deref(), c.db),
            (None, Some("only"), 1)
        );
        // IPv6
        let c = RedisConfig::from_url("redis://[::1]:7000").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 7000));
        assert_eq!(c.server(), "redis://[::1]:7000/0");
    }

    #[test]
    fn parameters() {
        let c = RedisConfig::from_url(
            "redis://h/?connect_timeout_ms=250&send_timeout_ms=900&max_len=10&batch=8&block_ms=100\
             &visibility_timeout_ms=1500&lease_ms=600&dedup_window_s=60&max_payload=1024&q0_buffer=7&prefix=x",
        )
        .unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.send_timeout, Duration::from_millis(900));
        assert_eq!((c.max_len, c.batch, c.max_payload), (10, 8, 1024));
        assert_eq!(c.block, Duration::from_millis(100));
        assert_eq!(c.visibility_timeout, Duration::from_millis(1500));
        assert_eq!(c.lease, Duration::from_millis(600));
        assert_eq!(c.dedup_window, Duration::from_secs(60));
        assert_eq!((c.prefix.as_str(), c.q0_buffer), ("x", 7));
    }

    #[test]
    fn debug_hides_the_password() {
        let c = RedisConfig::from_url("redis://user:hunter2@h:1/0").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("user"),
            "{shown}"
        );
        let c = RedisConfig::default().credentials(None, Some("pa55".into()));
        assert!(!format!("{c:?}").contains("pa55"));
    }

    #[test]
    fn bad_urls_name_the_problem() {
        for (url, needle) in [
            ("http://h", "redis://"),
            ("redis://h/abc", "database number"),
            ("redis://h/-1", "database number"),
            ("redis://h/?max_len=lots", "max_len"),
            ("redis://h/?colour=blue", "colour"),
            ("redis://h/?batch=0", "batch"),
            ("redis://h/?lease_ms=1", "lease"),
            ("redis:///0", "no host"),
            ("not a url", "malformed"),
            ("redis://h:99999", "malformed"),
        ] {
            let err = RedisConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn malformed_url_errors_hide_the_password() {
        let err = RedisConfig::from_url("redis://u:topsecret@h:99999").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
    }

    #[test]
    fn setters_clamp() {
        let c = RedisConfig::default()
            .batch(0)
            .max_len(0)
            .lease(Duration::ZERO)
            .prefix("");
        assert_eq!((c.batch, c.max_len, c.prefix.as_str()), (1, 1, "tgps"));
        assert_eq!(c.lease, Duration::from_millis(30));
    }
}
