//! Configuration of the Redis backend.

use std::time::Duration;

use serde::Deserialize;
use tg_backend_api::kit::config::{self, require, Secret};
use tg_backend_api::{Error, Result};

/// The broker's name in messages.
pub(crate) const TITLE: &str = "Redis";
/// The URL schemes: `rediss` connects with TLS.
pub(crate) const SCHEMES: &[&str] = &["redis", "rediss"];

/// Configuration of [`RedisBackend`](crate::RedisBackend).
///
/// From a URL (what `REDIS_URL` / `--redis-url` hold), every option optional:
///
/// ```text
/// redis[s]://[[user]:password@]host[:port][/db][?option=value&…]
/// ```
///
/// `rediss://` connects with TLS (needs the crate feature `tls-rustls`). The options are the
/// fields below from `connect_timeout` on, read by the backend kit's URL grammar: durations with a
/// unit (`250ms`, `30s`, `10m`), sizes in bytes; an unknown option is refused with the list of the
/// known ones.
///
/// ```
/// use std::time::Duration;
/// use tg_backend_redis::RedisConfig;
///
/// let config = RedisConfig::from_url("redis://app:s3cret@cache.internal:6380/2?max_len=5000&lease=3s").unwrap();
/// assert_eq!((config.host.as_str(), config.port, config.db), ("cache.internal", 6380, 2));
/// assert_eq!(config.username.as_deref(), Some("app"));
/// assert_eq!((config.max_len, config.lease), (5000, Duration::from_secs(3)));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// let config = config.connect_timeout(Duration::from_millis(500));
/// assert_eq!(config.connect_timeout, Duration::from_millis(500));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Server host name or address. Default: `127.0.0.1`.
    #[serde(skip)]
    pub host: String,
    /// Server port. Default: 6379.
    #[serde(skip)]
    pub port: u16,
    /// Connect with TLS (`rediss://`). Default: false.
    #[serde(skip)]
    pub tls: bool,
    /// ACL user name. Default: none (the `default` user).
    #[serde(skip)]
    pub username: Option<String>,
    /// Password; printed as `***` by `Debug`, never in errors or logs. Default: none.
    #[serde(skip)]
    pub password: Option<Secret>,
    /// Database number (the URL path). Default: 0.
    #[serde(skip)]
    pub db: i64,
    /// How long `connect` (and every reconnection attempt) may take before failing with
    /// `Connection`. Default: 3 s.
    #[serde(with = "config::duration")]
    pub connect_timeout: Duration,
    /// How long a send may wait for Redis (including reconnecting) before its receipt fails.
    /// Default: 30 s. A producer's `ProducerOptions::send_timeout` overrides it.
    #[serde(with = "config::duration")]
    pub send_timeout: Duration,
    /// Redis has no keep-alive of its own, so this is the backend's: how long a command on the
    /// shared connection (sends, acknowledgements, scripts, leases) may wait for its answer, and
    /// how often that connection is checked with a `PING`. A connection that leaves a command or
    /// a `PING` unanswered this long is taken for dead (a silent network: no FIN, no RST, and TCP
    /// keep-alive may still see a live peer), closed and replaced; the commands on it fail with
    /// `Connection`, which sends and acknowledgements retry within `send_timeout`. A silent
    /// network is noticed within twice this. At least 100 ms. Default: 10 s.
    #[serde(with = "config::duration")]
    pub keep_alive: Duration,
    /// Approximate bound of every q1/q2 stream (`XADD … MAXLEN ~ max_len`). When a stream reaches
    /// it, its oldest entries are trimmed whether or not every subscription consumed them.
    /// Default: 1,000,000.
    pub max_len: u64,
    /// Most entries one `XREADGROUP` fetches per stream for one consumer; a consumer reads again
    /// once it buffers at most this many, so it buffers about twice this (three times when the
    /// retry stream and the topic stream both deliver a full batch). Default: 64.
    pub batch: usize,
    /// How long one blocking `XREADGROUP` waits before it is issued again. Default: 2 s.
    #[serde(with = "config::duration")]
    pub block: Duration,
    /// How long a message may stay unacknowledged with a consumer before other members of its
    /// group reclaim it (`XAUTOCLAIM`): the recovery time after a consumer crashed. Default: 30 s.
    #[serde(with = "config::duration")]
    pub visibility_timeout: Duration,
    /// Lifetime of the lease of an exclusive or failover consumer, renewed every third of it: a
    /// standby takes over at most this long after the active consumer died. Default: 5 s.
    #[serde(with = "config::duration")]
    pub lease: Duration,
    /// How long a q2 de-duplication id is remembered (whole seconds: it is a key expiry).
    /// Default: 10 minutes.
    #[serde(with = "config::duration")]
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
            keep_alive: Duration::from_secs(10),
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

/// The shortest lease: renewing every third of it must stay well above a round trip.
const MIN_LEASE: Duration = Duration::from_millis(30);
/// The shortest keep-alive: a `PING` that often costs more than it tells.
const MIN_KEEP_ALIVE: Duration = Duration::from_millis(100);
/// The shortest de-duplication window: it is a key expiry in whole seconds.
const MIN_DEDUP_WINDOW: Duration = Duration::from_secs(1);

impl RedisConfig {
    /// The URL the local development server answers on.
    pub const DEFAULT_URL: &'static str = "redis://127.0.0.1:6379";

    /// Parses `redis://` or `rediss://` URLs (see the type's docs).
    pub fn from_url(url: &str) -> Result<Self> {
        let url = config::parse_url::<Self>(TITLE, SCHEMES, url)?;
        let host = url.require_host(TITLE, "redis://host:port")?;
        let path = url.path.trim_end_matches('/');
        let db = if path.is_empty() {
            0
        } else {
            path.parse::<i64>().ok().filter(|d| *d >= 0).ok_or_else(|| {
                Error::config(format!(
                    "Redis URL path {path:?} is not a database number (expected e.g. redis://host/2)"
                ))
            })?
        };
        Self {
            host,
            port: url.port.unwrap_or(6379),
            tls: url.scheme == "rediss",
            username: url.username,
            password: url.password,
            db,
            ..url.options
        }
        .checked()
    }

    /// Checks the option values (the setters clamp instead).
    fn checked(self) -> Result<Self> {
        require(
            !self.connect_timeout.is_zero(),
            TITLE,
            "connect_timeout",
            "positive",
        )?;
        require(
            !self.send_timeout.is_zero(),
            TITLE,
            "send_timeout",
            "positive",
        )?;
        require(
            self.keep_alive >= MIN_KEEP_ALIVE,
            TITLE,
            "keep_alive",
            "at least 100ms",
        )?;
        require(self.max_len >= 1, TITLE, "max_len", "at least 1")?;
        require(self.batch >= 1, TITLE, "batch", "at least 1")?;
        require(!self.block.is_zero(), TITLE, "block", "positive")?;
        require(
            !self.visibility_timeout.is_zero(),
            TITLE,
            "visibility_timeout",
            "positive",
        )?;
        require(self.lease >= MIN_LEASE, TITLE, "lease", "at least 30ms")?;
        require(
            self.dedup_window >= MIN_DEDUP_WINDOW,
            TITLE,
            "dedup_window",
            "at least 1s (it is a key expiry in whole seconds)",
        )?;
        require(self.max_payload >= 1, TITLE, "max_payload", "at least 1")?;
        require(self.q0_buffer >= 1, TITLE, "q0_buffer", "at least 1")?;
        require(
            valid_prefix(&self.prefix),
            TITLE,
            "prefix",
            "non-empty and without { or }",
        )?;
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
    pub fn credentials(mut self, username: Option<String>, password: Option<Secret>) -> Self {
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

    /// Sets the keep-alive of the shared connection (at least 100 ms).
    #[must_use]
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive.max(MIN_KEEP_ALIVE);
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
        self.lease = lease.max(MIN_LEASE);
        self
    }

    /// Sets the q2 de-duplication window (at least 1 s; Redis expiries are whole seconds here).
    #[must_use]
    pub fn dedup_window(mut self, window: Duration) -> Self {
        self.dedup_window = window.max(MIN_DEDUP_WINDOW);
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
        if valid_prefix(&prefix) {
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
                password: self.password.as_ref().map(|p| p.expose().to_owned()),
                protocol: redis::ProtocolVersion::RESP2,
            },
        })
    }
}

/// Keys and channels are `<prefix>/{<topic>}`: a brace in the prefix would move the hash tag.
fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty() && !prefix.contains(['{', '}'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tg_backend_api::ErrorKind;

    #[test]
    fn defaults_from_plain_url() {
        let c = RedisConfig::from_url(RedisConfig::DEFAULT_URL).unwrap();
        assert_eq!(c, RedisConfig::default());
        let c = RedisConfig::from_url("redis://localhost").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.db, c.tls),
            ("localhost", 6379, 0, false)
        );
        assert_eq!(RedisConfig::from_url("redis://h/2/").unwrap().db, 2);
    }

    #[test]
    fn credentials_db_and_tls() {
        let c =
            RedisConfig::from_url("rediss://svc:p%40ss%3Aword@redis.example.com:6390/3").unwrap();
        assert!(c.tls);
        assert_eq!(c.username.as_deref(), Some("svc"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("p@ss:word"));
        assert_eq!(
            (c.host.as_str(), c.port, c.db),
            ("redis.example.com", 6390, 3)
        );
        assert_eq!(c.server(), "rediss://redis.example.com:6390/3");
        // password only (Redis < 6 AUTH)
        let c = RedisConfig::from_url("redis://:only@h/1").unwrap();
        assert_eq!(
            (c.username, c.password.as_ref().map(Secret::expose), c.db),
            (None, Some("only"), 1)
        );
        // IPv6
        let c = RedisConfig::from_url("redis://[::1]:7000").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 7000));
        assert_eq!(c.server(), "redis://[::1]:7000/0");
    }

    #[test]
    fn options() {
        let c = RedisConfig::from_url(
            "redis://h/?connect_timeout=250ms&send_timeout=900ms&keep_alive=1500ms&max_len=10&batch=8&block=100ms\
             &visibility_timeout=1500ms&lease=600ms&dedup_window=1m&max_payload=1024&q0_buffer=7&prefix=x",
        )
        .unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.send_timeout, Duration::from_millis(900));
        assert_eq!(c.keep_alive, Duration::from_millis(1500));
        assert_eq!((c.max_len, c.batch, c.max_payload), (10, 8, 1024));
        assert_eq!(c.block, Duration::from_millis(100));
        assert_eq!(c.visibility_timeout, Duration::from_millis(1500));
        assert_eq!(c.lease, Duration::from_millis(600));
        assert_eq!(c.dedup_window, Duration::from_secs(60));
        assert_eq!((c.prefix.as_str(), c.q0_buffer), ("x", 7));
        assert_eq!(
            config::option_names::<RedisConfig>(),
            [
                "connect_timeout",
                "send_timeout",
                "keep_alive",
                "max_len",
                "batch",
                "block",
                "visibility_timeout",
                "lease",
                "dedup_window",
                "max_payload",
                "q0_buffer",
                "prefix"
            ]
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let c = RedisConfig::from_url("redis://user:hunter2@h:1/0").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("password: Some(***)") && shown.contains("user"),
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
            ("redis://h/?max_len=lots", "max_len=\"lots\""),
            (
                "redis://h/?colour=blue",
                "unknown Redis URL option \"colour\"; known: connect_timeout, send_timeout",
            ),
            ("redis://h/?batch=0", "batch must be at least 1"),
            ("redis://h/?lease=1ms", "lease must be at least 30ms"),
            (
                "redis://h/?keep_alive=50ms",
                "keep_alive must be at least 100ms",
            ),
            (
                "redis://h/?keep_alive=0s",
                "keep_alive must be at least 100ms",
            ),
            (
                "redis://h/?dedup_window=500ms",
                "dedup_window must be at least 1s",
            ),
            ("redis://h/?block=2000", "a duration needs a unit"),
            ("redis://h/?prefix=a%7Bb", "prefix must be non-empty"),
            ("redis://h/?batch=1&batch=2", "given twice"),
            (
                "redis://h/?lease_ms=3000",
                "unknown Redis URL option \"lease_ms\"",
            ),
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
    fn errors_hide_the_password() {
        for url in [
            "redis://u:topsecret@h:99999",
            "redis://u:topsecret@h/x",
            "redis://u:topsecret@h/?batch=none",
            "http://u:topsecret@h",
        ] {
            let err = RedisConfig::from_url(url).unwrap_err();
            assert!(!format!("{err} {err:?}").contains("topsecret"), "{err}");
        }
    }

    #[test]
    fn setters_clamp() {
        let c = RedisConfig::default()
            .batch(0)
            .max_len(0)
            .lease(Duration::ZERO)
            .keep_alive(Duration::ZERO)
            .dedup_window(Duration::ZERO)
            .prefix("");
        assert_eq!((c.batch, c.max_len, c.prefix.as_str()), (1, 1, "tgps"));
        assert_eq!(c.lease, MIN_LEASE);
        assert_eq!(c.keep_alive, MIN_KEEP_ALIVE);
        assert_eq!(c.dedup_window, MIN_DEDUP_WINDOW);
    }
}
