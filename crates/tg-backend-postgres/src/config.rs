//! Configuration of the PostgreSQL backend.

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tg_backend_api::kit::config::{self, require, Secret};
use tg_backend_api::{Error, Result};

/// libpq's `sslmode`, as the URL writes it (`verify-full`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain text.
    Disable,
    /// Plain text (libpq would try TLS if the server insisted; tg-pubsub connects in plain text).
    Allow,
    /// Plain text: TLS is only used when asked for with `require` or stronger. The default.
    #[default]
    Prefer,
    /// TLS, without checking the server's certificate (as libpq without a root certificate).
    Require,
    /// TLS, the certificate chain checked against the roots; the host name is not checked.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

/// Configuration of [`PostgresBackend`](crate::PostgresBackend).
///
/// From a URL (`DATABASE_URL` / `--postgres-url`):
/// `postgres://user:password@host:port/dbname?option=value&…`. The libpq parameters
/// `sslmode`, `sslrootcert`, `application_name`, `connect_timeout`, `options`, `keepalives`,
/// `keepalives_idle`, `keepalives_interval`, `keepalives_count` and `tcp_user_timeout` mean what
/// they mean to libpq, so a URL other PostgreSQL clients read works here too; tg-pubsub's own
/// options are named like the fields below. Durations take a unit (`500ms`, `30s`, `10m`, `2h`,
/// `7d`; `connect_timeout`, `keepalives_idle` and `keepalives_interval` also take libpq's whole
/// seconds, `tcp_user_timeout` libpq's milliseconds), booleans are `true` or `false` (`keepalives`
/// also libpq's `1` or `0`), and an unknown option is refused with the list of known ones.
///
/// ```
/// use std::time::Duration;
/// use tg_backend_postgres::PostgresConfig;
/// let config = PostgresConfig::from_url(
///     "postgres://app:s3cret@db.example:5432/test?schema=pubsub&visibility_timeout=45s",
/// ).unwrap();
/// assert_eq!(config.schema, "pubsub");
/// assert_eq!(config.visibility_timeout, Duration::from_secs(45));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
///
/// TLS (rustls): `sslmode=disable`, `allow` and `prefer` (the default) connect in plain text;
/// `require` encrypts without checking the certificate, `verify-ca` checks the chain,
/// `verify-full` the chain and the host name, against `sslrootcert=/path.pem` or the system's roots.
#[non_exhaustive]
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Hosts from the URL (several separated by commas; a path is a Unix-socket directory).
    #[serde(skip)]
    host: String,
    #[serde(skip)]
    port: u16,
    #[serde(skip)]
    user: Option<String>,
    #[serde(skip)]
    password: Option<Secret>,
    #[serde(skip)]
    dbname: Option<String>,
    #[serde(rename = "sslmode")]
    ssl_mode: SslMode,
    #[serde(rename = "sslrootcert")]
    ssl_root_cert: Option<String>,
    /// Schema holding tg-pubsub's tables, created on first use. Default: `tgps`.
    /// Lowercase letters, digits and `_`, starting with a letter or `_`, not `pg_`, at most 63
    /// bytes.
    pub schema: String,
    /// The `application_name` of every connection (visible in `pg_stat_activity`).
    /// Default: `tg-pubsub`.
    pub application_name: String,
    /// How long opening a connection may take. Default: 5 s.
    #[serde(deserialize_with = "libpq_duration")]
    pub connect_timeout: Duration,
    /// libpq's `options`: command-line options sent to the server at connection start
    /// (`-c synchronous_commit=off`). Default: none.
    pub options: Option<String>,
    /// libpq's `keepalives`: TCP keep-alive on every connection. Default: true.
    #[serde(deserialize_with = "libpq_bool")]
    pub keepalives: bool,
    /// libpq's `keepalives_idle`: idle time before the first TCP keep-alive probe. Default: none
    /// (tokio-postgres's 2 hours).
    #[serde(deserialize_with = "libpq_opt_seconds")]
    pub keepalives_idle: Option<Duration>,
    /// libpq's `keepalives_interval`: time between TCP keep-alive probes. Default: none (the
    /// operating system's).
    #[serde(deserialize_with = "libpq_opt_seconds")]
    pub keepalives_interval: Option<Duration>,
    /// libpq's `keepalives_count`: unanswered TCP keep-alive probes before the connection is
    /// dropped. Default: none (the operating system's).
    pub keepalives_count: Option<u32>,
    /// libpq's `tcp_user_timeout` (Linux): how long sent data may stay unacknowledged before the
    /// connection is dropped. Default: none (the operating system's). TCP keep-alive and this
    /// notice a peer that is gone, not a path that swallows data while something still
    /// acknowledges it: `query_timeout` covers that.
    #[serde(deserialize_with = "libpq_opt_millis")]
    pub tcp_user_timeout: Option<Duration>,
    /// Most pooled connections (producers' writers, consumers' claims and acks). Exclusive and
    /// failover consumers hold one more connection each for their advisory lock, and each backend
    /// holds one `LISTEN` connection. Default: 8.
    pub pool_size: usize,
    /// How long a claimed, unacknowledged q1/q2 message stays invisible to the subscription's
    /// other consumers before it is delivered again (a consumer that crashed). Default: 30 s.
    #[serde(with = "config::duration")]
    pub visibility_timeout: Duration,
    /// How long a q1/q2 message is kept after it was published even once every subscription has
    /// acknowledged it: what `Earliest` replays and the q2 de-duplication window. Default: 1 hour.
    #[serde(with = "config::duration")]
    pub retention: Duration,
    /// Unacknowledged messages older than this are deleted with their pending deliveries.
    /// Default: `None` — kept until acknowledged or their subscription is deleted.
    #[serde(with = "config::opt_duration")]
    pub unconsumed_retention: Option<Duration>,
    /// Largest q1/q2 payload in bytes. Default: 5 MiB. (q0 payloads are limited by `NOTIFY`; see
    /// the crate docs.)
    pub max_payload: usize,
    /// Most messages one producer writes in one `INSERT`. Default: 1,000.
    pub batch_size: usize,
    /// Most messages a consumer claims in one statement and keeps buffered. Default: 64.
    pub prefetch: usize,
    /// A waiting consumer checks the table at least this often even without a notification
    /// (a safety net for a lost notification; delivery is by `NOTIFY`, and between
    /// notifications and these checks a waiting consumer sends no statement). Default: 15 s.
    #[serde(with = "config::duration")]
    pub safety_interval: Duration,
    /// How often a failover standby or a refused exclusive consumer retries the subscription's
    /// advisory lock. Default: 250 ms.
    #[serde(with = "config::duration")]
    pub lease_interval: Duration,
    /// How often retention runs (one backend at a time per database). Default: 60 s.
    #[serde(with = "config::duration")]
    pub cleanup_interval: Duration,
    /// How long a send may keep retrying a lost connection before failing. Default: 30 s.
    #[serde(with = "config::duration")]
    pub send_timeout: Duration,
    /// How long any statement may wait for the server's answer. A connection whose statement
    /// went unanswered this long is taken for dead (a silent network: no FIN, no RST, and TCP
    /// keep-alive may still see a live peer) and closed, never returned to the pool; the
    /// statement fails with `Connection`, which sends, claims and acknowledgements retry on a
    /// new connection. The `LISTEN` connection is checked with `SELECT 1` every
    /// `safety_interval`, answered within this. At least 100 ms. Default: 10 s.
    #[serde(with = "config::duration")]
    pub query_timeout: Duration,
    /// Whether claims, acknowledgements and negative acknowledgements wait for the WAL flush.
    /// `false` (the default) commits them asynchronously: a server *crash* may forget the last
    /// fraction of a second of them, which can only cause a redelivery, never a loss. Messages
    /// themselves are always committed with the server's `synchronous_commit`.
    pub consumer_synchronous_commit: bool,
    /// Whether publishing waits for the WAL flush: `None` (the default) keeps the server's
    /// `synchronous_commit`; `Some(false)` lowers latency by the disk's flush time (a few ms on
    /// many disks) at the price of losing the last fraction of a second of *confirmed sends*
    /// if the server crashes (not on a clean restart).
    pub producer_synchronous_commit: Option<bool>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 5432,
            user: Some("postgres".to_owned()),
            password: None,
            dbname: Some("test".to_owned()),
            ssl_mode: SslMode::Prefer,
            ssl_root_cert: None,
            schema: "tgps".to_owned(),
            application_name: "tg-pubsub".to_owned(),
            connect_timeout: Duration::from_secs(5),
            options: None,
            keepalives: true,
            keepalives_idle: None,
            keepalives_interval: None,
            keepalives_count: None,
            tcp_user_timeout: None,
            pool_size: 8,
            visibility_timeout: Duration::from_secs(30),
            retention: Duration::from_secs(3600),
            unconsumed_retention: None,
            max_payload: 5 * 1024 * 1024,
            batch_size: 1000,
            prefetch: 64,
            safety_interval: Duration::from_secs(15),
            lease_interval: Duration::from_millis(250),
            cleanup_interval: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            query_timeout: Duration::from_secs(10),
            consumer_synchronous_commit: false,
            producer_synchronous_commit: None,
        }
    }
}

/// `connect_timeout` as libpq writes it (whole seconds: `connect_timeout=10`), so one
/// `DATABASE_URL` serves libpq-based clients and this one, or with a unit like every other
/// duration (`10s`, `500ms`).
fn libpq_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Duration, D::Error> {
    let text = Cow::<str>::deserialize(deserializer)?;
    match text.trim().parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => config::duration::parse(&text).map_err(serde::de::Error::custom),
    }
}

/// libpq's boolean (`1`/`0`), or `true`/`false` like every other boolean.
fn libpq_bool<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<bool, D::Error> {
    let text = Cow::<str>::deserialize(deserializer)?;
    match text.trim() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        other => Err(serde::de::Error::custom(format!(
            "{other:?} is no boolean (expected 1, 0, true or false)"
        ))),
    }
}

/// An optional duration as libpq writes it in whole seconds, or with a unit.
fn libpq_opt_seconds<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<Duration>, D::Error> {
    libpq_duration(deserializer).map(Some)
}

/// An optional duration as libpq writes `tcp_user_timeout` (whole milliseconds), or with a unit.
fn libpq_opt_millis<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<Duration>, D::Error> {
    let text = Cow::<str>::deserialize(deserializer)?;
    match text.trim().parse::<u64>() {
        Ok(ms) => Ok(Some(Duration::from_millis(ms))),
        Err(_) => config::duration::parse(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

impl PostgresConfig {
    /// The backend's name in messages.
    pub const TITLE: &'static str = "PostgreSQL";

    /// The URL schemes accepted: `postgres` and `postgresql`.
    pub const SCHEMES: [&'static str; 2] = ["postgres", "postgresql"];

    /// The URL used when `DATABASE_URL` is not set.
    pub const DEFAULT_URL: &'static str = "postgres://postgres@127.0.0.1:5432/test";

    /// The environment variable holding the URL.
    pub const ENV_VAR: &'static str = "DATABASE_URL";

    /// Parses `postgres://user:password@host:port/dbname?option=value&…`. A URL without host
    /// means `127.0.0.1`, without port 5432; without user the operating system's user name and
    /// without database the user's name, as in libpq.
    pub fn from_url(url: &str) -> Result<Self> {
        let url = config::parse_url::<Self>(Self::TITLE, &Self::SCHEMES, url)?;
        let host = match url.host {
            Some(host) => percent_encoding::percent_decode_str(&host)
                .decode_utf8()
                .map_err(|_| Error::config("PostgreSQL URL host is not valid UTF-8"))?
                .into_owned(),
            None => "127.0.0.1".to_owned(),
        };
        let config = Self {
            host,
            port: url.port.unwrap_or(5432),
            user: url.username,
            password: url.password,
            dbname: (!url.path.is_empty()).then_some(url.path),
            ..url.options
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the values; [`PostgresBackend::connect`](crate::PostgresBackend::connect) calls it.
    pub fn validate(&self) -> Result<()> {
        let s = &self.schema;
        let schema_ok = !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && !s.starts_with("pg_");
        let what = Self::TITLE;
        require(
            schema_ok,
            what,
            "schema",
            "lowercase letters, digits and _, starting with a letter or _, not pg_, at most 63 \
             bytes",
        )?;
        require(self.pool_size >= 1, what, "pool_size", "at least 1")?;
        require(self.batch_size >= 1, what, "batch_size", "at least 1")?;
        require(self.prefetch >= 1, what, "prefetch", "at least 1")?;
        require(
            self.max_payload <= 1 << 29,
            what,
            "max_payload",
            "at most 512 MiB (bytea values are limited to 1 GB)",
        )?;
        require(
            self.visibility_timeout >= Duration::from_millis(100),
            what,
            "visibility_timeout",
            "at least 100ms",
        )?;
        require(
            self.query_timeout >= Duration::from_millis(100),
            what,
            "query_timeout",
            "at least 100ms",
        )
    }

    /// The `tokio-postgres` configuration (host, credentials, database, timeouts).
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut pg = tokio_postgres::Config::new();
        for host in self.host.split(',').filter(|h| !h.is_empty()) {
            pg.host(host);
        }
        pg.port(self.port);
        if let Some(user) = &self.user {
            pg.user(user);
        }
        if let Some(password) = &self.password {
            pg.password(password.expose());
        }
        if let Some(dbname) = &self.dbname {
            pg.dbname(dbname);
        }
        if let Some(options) = &self.options {
            pg.options(options);
        }
        pg.application_name(&self.application_name);
        pg.connect_timeout(self.connect_timeout);
        pg.keepalives(self.keepalives);
        if let Some(idle) = self.keepalives_idle {
            pg.keepalives_idle(idle);
        }
        if let Some(interval) = self.keepalives_interval {
            pg.keepalives_interval(interval);
        }
        if let Some(count) = self.keepalives_count {
            pg.keepalives_retries(count);
        }
        if let Some(timeout) = self.tcp_user_timeout {
            pg.tcp_user_timeout(timeout);
        }
        pg.ssl_mode(match self.ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        pg
    }

    /// The `sslmode`. Default: [`SslMode::Prefer`] (which, without a TLS connector for it,
    /// connects in plain text).
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The PEM file of root certificates trusted for `verify-ca` / `verify-full`, if set.
    pub(crate) fn ssl_root_cert_path(&self) -> Option<&str> {
        self.ssl_root_cert.as_deref()
    }

    /// Sets the `sslmode`.
    #[must_use]
    pub fn with_ssl_mode(mut self, mode: SslMode) -> Self {
        self.ssl_mode = mode;
        self
    }

    /// Sets a PEM file of root certificates trusted for `verify-ca` / `verify-full`
    /// (URL option `sslrootcert`; default: the system's roots).
    #[must_use]
    pub fn ssl_root_cert(mut self, path: impl Into<String>) -> Self {
        self.ssl_root_cert = Some(path.into());
        self
    }

    /// The server as `host:port` (for messages; never holds the password).
    pub fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The database name.
    pub fn dbname(&self) -> &str {
        self.dbname
            .as_deref()
            .or(self.user.as_deref())
            .unwrap_or("postgres")
    }

    /// Sets the schema.
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets the application name.
    #[must_use]
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// Sets the pool size.
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Sets the visibility timeout.
    #[must_use]
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout;
        self
    }

    /// Sets the retention of acknowledged messages.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets the retention of unacknowledged messages.
    #[must_use]
    pub fn unconsumed_retention(mut self, retention: Option<Duration>) -> Self {
        self.unconsumed_retention = retention;
        self
    }

    /// Sets the largest q1/q2 payload.
    #[must_use]
    pub fn max_payload(mut self, max: usize) -> Self {
        self.max_payload = max;
        self
    }

    /// Sets the producer batch size.
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size;
        self
    }

    /// Sets the consumer prefetch.
    #[must_use]
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets the safety-net interval.
    #[must_use]
    pub fn safety_interval(mut self, interval: Duration) -> Self {
        self.safety_interval = interval;
        self
    }

    /// Sets the advisory-lock retry interval.
    #[must_use]
    pub fn lease_interval(mut self, interval: Duration) -> Self {
        self.lease_interval = interval;
        self
    }

    /// Sets the cleanup interval.
    #[must_use]
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = interval;
        self
    }

    /// Sets the send timeout.
    #[must_use]
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// Sets the bound of every statement (see the field).
    #[must_use]
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// Sets whether consumer state changes wait for the WAL flush.
    #[must_use]
    pub fn consumer_synchronous_commit(mut self, on: bool) -> Self {
        self.consumer_synchronous_commit = on;
        self
    }

    /// Sets whether publishing waits for the WAL flush (`None`: the server's setting).
    #[must_use]
    pub fn producer_synchronous_commit(mut self, on: Option<bool>) -> Self {
        self.producer_synchronous_commit = on;
        self
    }

    /// Sets the password.
    #[must_use]
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(Secret::new(password));
        self
    }

    /// Sets the connect timeout.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tg_backend_api::ErrorKind;

    #[test]
    fn standard_url() {
        let c = PostgresConfig::from_url("postgres://app:pw@db.example:6543/queue").unwrap();
        assert_eq!(c.server(), "db.example:6543");
        assert_eq!(c.dbname(), "queue");
        let pg = c.pg_config();
        assert_eq!(pg.get_user(), Some("app"));
        assert_eq!(pg.get_password(), Some(&b"pw"[..]));
        assert_eq!(pg.get_application_name(), Some("tg-pubsub"));
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(pg.get_ports(), &[6543]);
        assert_eq!(c.schema, "tgps");
        let bare = PostgresConfig::from_url("postgresql:///").unwrap();
        assert_eq!(bare.server(), "127.0.0.1:5432");
        assert_eq!(bare.pg_config().get_user(), None);
        assert_eq!(bare.pg_config().get_dbname(), None);
    }

    #[test]
    fn own_and_libpq_options() {
        let c = PostgresConfig::from_url(
            "postgresql://u@h/d?sslmode=disable&application_name=svc&schema=q_1&pool_size=3\
             &visibility_timeout=1500ms&retention=2h&unconsumed_retention=7d&max_payload=100\
             &batch_size=10&prefetch=5&safety_interval=5s&lease_interval=100ms\
             &cleanup_interval=1m&send_timeout=9s&consumer_synchronous_commit=true\
             &producer_synchronous_commit=false&connect_timeout=2\
             &options=-c%20synchronous_commit%3Doff&query_timeout=1500ms",
        )
        .unwrap();
        assert_eq!(c.application_name, "svc");
        assert_eq!(c.schema, "q_1");
        assert_eq!(c.pool_size, 3);
        assert_eq!(c.visibility_timeout, Duration::from_millis(1500));
        assert_eq!(c.retention, Duration::from_secs(7200));
        assert_eq!(c.unconsumed_retention, Some(Duration::from_secs(7 * 86400)));
        assert_eq!((c.max_payload, c.batch_size, c.prefetch), (100, 10, 5));
        assert_eq!(c.safety_interval, Duration::from_secs(5));
        assert_eq!(c.lease_interval, Duration::from_millis(100));
        assert_eq!(c.cleanup_interval, Duration::from_secs(60));
        assert_eq!(c.send_timeout, Duration::from_secs(9));
        assert_eq!(c.query_timeout, Duration::from_millis(1500));
        assert!(c.consumer_synchronous_commit);
        assert_eq!(c.producer_synchronous_commit, Some(false));
        let pg = c.pg_config();
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        assert_eq!(pg.get_application_name(), Some("svc"));
        assert_eq!(pg.get_options(), Some("-c synchronous_commit=off"));
        let v = PostgresConfig::from_url(
            "postgres://u@h/d?sslmode=verify-full&sslrootcert=/x.pem&connect_timeout=750ms",
        )
        .unwrap();
        assert_eq!(v.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(v.ssl_root_cert_path(), Some("/x.pem"));
        assert_eq!(v.connect_timeout, Duration::from_millis(750));
        assert_eq!(
            v.pg_config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    /// libpq's TCP keep-alive parameters, in libpq's units or with one, reach tokio-postgres.
    #[test]
    fn keepalive_parameters() {
        let d = PostgresConfig::default().pg_config();
        assert!(d.get_keepalives());
        assert_eq!(d.get_tcp_user_timeout(), None);
        let c = PostgresConfig::from_url(
            "postgres://u@h/d?keepalives=1&keepalives_idle=30&keepalives_interval=5s\
             &keepalives_count=3&tcp_user_timeout=9000",
        )
        .unwrap();
        assert!(c.keepalives);
        assert_eq!(c.keepalives_idle, Some(Duration::from_secs(30)));
        assert_eq!(c.keepalives_interval, Some(Duration::from_secs(5)));
        assert_eq!(c.keepalives_count, Some(3));
        assert_eq!(c.tcp_user_timeout, Some(Duration::from_secs(9)));
        let pg = c.pg_config();
        assert!(pg.get_keepalives());
        assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(pg.get_keepalives_interval(), Some(Duration::from_secs(5)));
        assert_eq!(pg.get_keepalives_retries(), Some(3));
        assert_eq!(pg.get_tcp_user_timeout(), Some(&Duration::from_secs(9)));
        let off =
            PostgresConfig::from_url("postgres://u@h/d?keepalives=0&tcp_user_timeout=2s").unwrap();
        assert!(!off.keepalives && !off.pg_config().get_keepalives());
        assert_eq!(off.tcp_user_timeout, Some(Duration::from_secs(2)));
        assert!(
            !PostgresConfig::from_url("postgres://u@h/d?keepalives=false")
                .unwrap()
                .keepalives
        );
    }

    #[test]
    fn hosts_and_sockets() {
        let c = PostgresConfig::from_url("postgres://u@%2Fvar%2Frun%2Fpostgresql/d").unwrap();
        assert_eq!(c.server(), "/var/run/postgresql:5432");
        #[cfg(unix)]
        assert!(matches!(
            c.pg_config().get_hosts(),
            [tokio_postgres::config::Host::Unix(p)] if p.to_str() == Some("/var/run/postgresql")
        ));
        let c = PostgresConfig::from_url("postgres://u@a,b/d").unwrap();
        assert_eq!(c.pg_config().get_hosts().len(), 2);
    }

    #[test]
    fn percent_encoded_password_is_decoded_and_hidden() {
        let c = PostgresConfig::from_url("postgres://u:p%40ss%3Aword@h/d").unwrap();
        assert_eq!(c.pg_config().get_password(), Some(&b"p@ss:word"[..]));
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("p@ss") && !debug.contains("ss:word"),
            "{debug}"
        );
        assert!(debug.contains("***"), "{debug}");
        let c = PostgresConfig::default().password("topsecret");
        assert!(!format!("{c:?}").contains("topsecret"));
    }

    #[test]
    fn bad_urls_name_the_problem() {
        for (url, needle) in [
            ("redis://x", "postgres://"),
            ("not a url", "malformed"),
            ("postgres://u@h/d?pool_size=lots", "pool_size=\"lots\""),
            (
                "postgres://u@h/d?visibility_timeout=soon",
                "visibility_timeout=\"soon\"",
            ),
            ("postgres://u@h/d?retention=30", "a duration needs a unit"),
            ("postgres://u@h/d?schema=Bad-Name", "schema must be"),
            ("postgres://u@h/d?schema=pg_x", "schema must be"),
            (
                "postgres://u@h/d?colour=blue",
                "\"colour\"; known: sslmode, sslrootcert, schema",
            ),
            ("postgres://u@h/d?hostaddr=10.0.0.1", "\"hostaddr\"; known:"),
            ("postgres://u@h/d?keepalives=yes", "keepalives=\"yes\""),
            (
                "postgres://u@h/d?tcp_user_timeout=soon",
                "tcp_user_timeout=\"soon\"",
            ),
            (
                "postgres://u@h/d?keepalives_count=-1",
                "keepalives_count=\"-1\"",
            ),
            (
                "postgres://u@h/d?query_timeout=10ms",
                "query_timeout must be at least 100ms",
            ),
            (
                "postgres://u@h/d?sslmode=sometimes",
                "sslmode=\"sometimes\"",
            ),
            ("postgres://u@h/d?prefetch=0", "prefetch must be at least 1"),
            ("postgres://u@h/d?visibility_timeout=10ms", "at least 100ms"),
            (
                "postgres://u@h/d?consumer_synchronous_commit=on",
                "consumer_synchronous_commit=\"on\"",
            ),
            ("postgres://u@h/d?schema=a&schema=b", "given twice"),
        ] {
            let err = PostgresConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    /// An unknown URL parameter is refused by its name, also one libpq (and `tokio-postgres`)
    /// knows but tg-pubsub does not read, and also through the driver (`DATABASE_URL`), which is
    /// how the facade and the CLI read the URL.
    #[test]
    fn unknown_parameter_is_named() {
        for (url, name) in [
            ("postgres://u:pw@h/d?sslmode=disable&colour=blue", "colour"),
            (
                "postgres://u@h/d?target_session_attrs=read-write",
                "target_session_attrs",
            ),
            ("postgresql://h/d?application_name=a&Schema=x", "Schema"),
        ] {
            let err = PostgresConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{url}");
            let text = err.to_string();
            assert!(
                text.contains(&format!("unknown PostgreSQL URL option \"{name}\"")),
                "{url}: {text}"
            );
            assert!(text.contains("known: sslmode"), "{url}: {text}");
            assert!(!text.contains("invalid connection string"), "{url}: {text}");

            let lookup = |env: &str| (env == PostgresConfig::ENV_VAR).then(|| url.to_owned());
            let settings = tg_backend_api::kit::Settings::new(&crate::DRIVER, &lookup);
            let err = match (crate::DRIVER.configure)(&settings) {
                Ok(_) => panic!("{url} accepted"),
                Err(e) => e,
            };
            let text = err.to_string();
            assert!(
                text.starts_with("DATABASE_URL / --postgres-url: unknown PostgreSQL URL option")
                    && text.contains(&format!("\"{name}\"")),
                "{url}: {text}"
            );
            assert!(!text.contains("pw@"), "{text}");
        }
    }

    #[test]
    fn errors_never_show_the_password() {
        for url in [
            "postgres://u:hunter2@h/d?colour=blue",
            "postgres://u:hunter2@h:port/d",
            "postgres://u:hunter2@h/d?pool_size=0",
        ] {
            let err = PostgresConfig::from_url(url).unwrap_err();
            assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn default_is_local_test_database() {
        let c = PostgresConfig::from_url(PostgresConfig::DEFAULT_URL).unwrap();
        assert_eq!(c.server(), "127.0.0.1:5432");
        assert_eq!(c.dbname(), "test");
        let d = PostgresConfig::default();
        assert_eq!(format!("{c:?}"), format!("{d:?}"));
    }
}
