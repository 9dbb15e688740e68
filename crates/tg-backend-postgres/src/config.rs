//! Configuration of the PostgreSQL backend.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tg_backend_api::{Error, Result};

/// Parameters of the URL that tg-pubsub reads itself; everything else goes to `tokio-postgres`.
const OWN_PARAMS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "schema",
    "pool_size",
    "visibility_timeout",
    "retention",
    "unconsumed_retention",
    "max_payload",
    "batch_size",
    "prefetch",
    "safety_interval",
    "lease_interval",
    "cleanup_interval",
    "send_timeout",
    "consumer_synchronous_commit",
    "producer_synchronous_commit",
];

/// Configuration of [`PostgresBackend`](crate::PostgresBackend).
///
/// From a URL (`DATABASE_URL` / `--postgres-url`): the standard
/// `postgres://user:password@host:port/dbname?sslmode=disable&application_name=…&connect_timeout=5`
/// plus tg-pubsub's own optional parameters, each named like the field below
/// (`schema`, `pool_size`, `visibility_timeout`, `retention`, `unconsumed_retention`,
/// `max_payload`, `batch_size`, `prefetch`, `safety_interval`, `lease_interval`,
/// `cleanup_interval`, `send_timeout`, `consumer_synchronous_commit`,
/// `producer_synchronous_commit`). Durations take a unit:
/// `500ms`, `30s`, `10m`, `2h`, `7d`.
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
#[derive(Clone)]
pub struct PostgresConfig {
    pg: tokio_postgres::Config,
    ssl_mode: SslMode,
    ssl_root_cert: Option<String>,
    /// Schema holding tg-pubsub's tables, created on first use. Default: `tgps`.
    /// Letters, digits and `_`, starting with a letter or `_`, at most 63 bytes.
    pub schema: String,
    /// The `application_name` of every connection (visible in `pg_stat_activity`).
    /// Default: `tg-pubsub`, unless the URL sets `application_name`.
    pub application_name: String,
    /// Most pooled connections (producers' writers, consumers' claims and acks). Exclusive and
    /// failover consumers hold one more connection each for their advisory lock, and each backend
    /// holds one `LISTEN` connection. Default: 8.
    pub pool_size: usize,
    /// How long a claimed, unacknowledged q1/q2 message stays invisible to the subscription's
    /// other consumers before it is delivered again (a consumer that crashed). Default: 30 s.
    pub visibility_timeout: Duration,
    /// How long a q1/q2 message is kept after it was published even once every subscription has
    /// acknowledged it: what `Earliest` replays and the q2 de-duplication window. Default: 1 hour.
    pub retention: Duration,
    /// Unacknowledged messages older than this are deleted with their pending deliveries.
    /// Default: `None` — kept until acknowledged or their subscription is deleted.
    pub unconsumed_retention: Option<Duration>,
    /// Largest q1/q2 payload in bytes. Default: 5 MiB. (q0 payloads are limited by `NOTIFY`; see
    /// the crate docs.)
    pub max_payload: usize,
    /// Most messages one producer writes in one `INSERT`. Default: 1,000.
    pub batch_size: usize,
    /// Most messages a consumer claims in one statement and keeps buffered. Default: 64.
    pub prefetch: usize,
    /// A waiting consumer checks the table at least this often even without a notification
    /// (a safety net; delivery is by `NOTIFY`). Default: 15 s.
    pub safety_interval: Duration,
    /// How often a failover standby or a refused exclusive consumer retries the subscription's
    /// advisory lock. Default: 250 ms.
    pub lease_interval: Duration,
    /// How often retention runs (one backend at a time per database). Default: 60 s.
    pub cleanup_interval: Duration,
    /// How long a send may keep retrying a lost connection before failing. Default: 30 s.
    pub send_timeout: Duration,
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
        let mut pg = tokio_postgres::Config::new();
        pg.host("127.0.0.1")
            .port(5432)
            .user("postgres")
            .dbname("test");
        pg.connect_timeout(Duration::from_secs(5));
        Self::with_pg(pg)
    }
}

impl PostgresConfig {
    /// The URL schemes accepted: `postgres` and `postgresql`.
    pub const SCHEMES: [&'static str; 2] = ["postgres", "postgresql"];

    /// The URL used when `DATABASE_URL` is not set.
    pub const DEFAULT_URL: &'static str = "postgres://postgres@127.0.0.1:5432/test";

    /// The environment variable holding the URL.
    pub const ENV_VAR: &'static str = "DATABASE_URL";

    fn with_pg(pg: tokio_postgres::Config) -> Self {
        Self {
            pg,
            ssl_mode: SslMode::Prefer,
            ssl_root_cert: None,
            schema: "tgps".to_owned(),
            application_name: "tg-pubsub".to_owned(),
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
            consumer_synchronous_commit: false,
            producer_synchronous_commit: None,
        }
    }

    /// Parses `postgres://user:password@host:port/dbname?param=value&…`.
    pub fn from_url(url: &str) -> Result<Self> {
        let mut parsed = url::Url::parse(url).map_err(|e| {
            Error::config(format!("malformed PostgreSQL URL: {e}"))
                .with_context("url", redact_url_text(url))
        })?;
        if !Self::SCHEMES.contains(&parsed.scheme()) {
            return Err(Error::config(format!(
                "PostgreSQL URL must start with postgres:// or postgresql://, got scheme {:?}",
                parsed.scheme()
            )));
        }
        let mut own = Vec::new();
        // Keep libpq's parameters exactly as written (tokio-postgres decodes them itself).
        let mut rest: Vec<String> = Vec::new();
        for segment in parsed
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|s| !s.is_empty())
        {
            let Some((k, v)) = url::form_urlencoded::parse(segment.as_bytes()).next() else {
                continue;
            };
            if OWN_PARAMS.contains(&k.as_ref()) {
                own.push((k.into_owned(), v.into_owned()));
            } else {
                rest.push(segment.to_owned());
            }
        }
        if rest.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.set_query(Some(&rest.join("&")));
        }
        let mut pg = tokio_postgres::Config::from_str(parsed.as_str()).map_err(|e| {
            Error::config(format!("invalid PostgreSQL URL: {e}"))
                .with_context("url", redact_url(&parsed))
        })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        if pg.get_hosts().is_empty() {
            pg.host("127.0.0.1");
        }
        let app = pg.get_application_name().map(str::to_owned);
        let mut config = Self::with_pg(pg);
        if let Some(app) = app {
            config.application_name = app;
        }
        for (key, value) in own {
            let duration = || parse_duration(&key, &value);
            let number = || {
                value.parse::<usize>().map_err(|e| {
                    Error::config(format!(
                        "PostgreSQL URL parameter {key}={value:?} is not a number: {e}"
                    ))
                })
            };
            match key.as_str() {
                "sslmode" => config.ssl_mode = value.parse()?,
                "sslrootcert" => config.ssl_root_cert = Some(value.clone()),
                "schema" => config.schema = value.clone(),
                "pool_size" => config.pool_size = number()?,
                "visibility_timeout" => config.visibility_timeout = duration()?,
                "retention" => config.retention = duration()?,
                "unconsumed_retention" => config.unconsumed_retention = Some(duration()?),
                "max_payload" => config.max_payload = number()?,
                "batch_size" => config.batch_size = number()?,
                "prefetch" => config.prefetch = number()?,
                "safety_interval" => config.safety_interval = duration()?,
                "lease_interval" => config.lease_interval = duration()?,
                "cleanup_interval" => config.cleanup_interval = duration()?,
                "send_timeout" => config.send_timeout = duration()?,
                "consumer_synchronous_commit" => {
                    config.consumer_synchronous_commit = parse_bool(&key, &value)?
                }
                "producer_synchronous_commit" => {
                    config.producer_synchronous_commit = Some(parse_bool(&key, &value)?)
                }
                _ => {}
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the values; [`PostgresBackend::connect`](crate::PostgresBackend::connect) calls it.
    pub fn validate(&self) -> Result<()> {
        let s = &self.schema;
        let valid = !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && !s.starts_with("pg_");
        if !valid {
            return Err(Error::config(format!(
                "invalid PostgreSQL schema name {s:?}: use lowercase letters, digits and _, \
                 starting with a letter or _, not pg_, at most 63 bytes"
            )));
        }
        for (name, value) in [
            ("pool_size", self.pool_size),
            ("batch_size", self.batch_size),
            ("prefetch", self.prefetch),
        ] {
            if value == 0 {
                return Err(Error::config(format!(
                    "PostgreSQL {name} must be at least 1"
                )));
            }
        }
        if self.max_payload > 1 << 29 {
            return Err(Error::config(
                "PostgreSQL max_payload must be at most 512 MiB (bytea values are limited to 1 GB)",
            ));
        }
        if self.visibility_timeout < Duration::from_millis(100) {
            return Err(Error::config(
                "PostgreSQL visibility_timeout must be at least 100ms",
            ));
        }
        Ok(())
    }

    /// The `tokio-postgres` configuration (host, credentials, database, timeouts).
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut pg = self.pg.clone();
        pg.application_name(self.application_name.clone());
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

    /// Sets the `sslmode`.
    #[must_use]
    pub fn with_ssl_mode(mut self, mode: SslMode) -> Self {
        self.ssl_mode = mode;
        self
    }

    /// Sets a PEM file of root certificates trusted for `verify-ca` / `verify-full`
    /// (URL parameter `sslrootcert`; default: the system's roots).
    #[must_use]
    pub fn ssl_root_cert(mut self, path: impl Into<String>) -> Self {
        self.ssl_root_cert = Some(path.into());
        self
    }

    pub(crate) fn tls(&self) -> Result<crate::tls::Tls> {
        use crate::tls::Verify;
        let verify = match self.ssl_mode {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => None,
            SslMode::Require => Some(Verify::None),
            SslMode::VerifyCa => Some(Verify::Chain),
            SslMode::VerifyFull => Some(Verify::Full),
        };
        crate::tls::Tls::new(verify, self.ssl_root_cert.as_deref())
    }

    /// The server as `host:port` (for messages; never holds the password).
    pub fn server(&self) -> String {
        let host = match self.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}")
    }

    /// The database name.
    pub fn dbname(&self) -> &str {
        self.pg.get_dbname().unwrap_or("postgres")
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
    pub fn password(mut self, password: impl AsRef<[u8]>) -> Self {
        self.pg.password(password.as_ref());
        self
    }

    /// Sets the connect timeout.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.pg.connect_timeout(timeout);
        self
    }
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text.
    Disable,
    /// Plain text (libpq would try TLS if the server insisted; tg-pubsub connects in plain text).
    Allow,
    /// Plain text: TLS is only used when asked for with `require` or stronger.
    Prefer,
    /// TLS, without checking the server's certificate (as libpq without a root certificate).
    Require,
    /// TLS, the certificate chain checked against the roots; the host name is not checked.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(Error::config(format!(
                    "unknown sslmode {other:?}; expected disable, allow, prefer, require, \
                     verify-ca or verify-full"
                )))
            }
        })
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(Error::config(format!(
            "PostgreSQL URL parameter {key}={value:?} must be on or off"
        ))),
    }
}

fn parse_duration(key: &str, value: &str) -> Result<Duration> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (num, unit) = value.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        Error::config(format!(
            "PostgreSQL URL parameter {key}={value:?} is not a duration such as 500ms, 30s, 10m, 2h, 7d"
        ))
    })?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        _ => {
            return Err(Error::config(format!(
                "PostgreSQL URL parameter {key}={value:?} has unknown unit {unit:?}; use ms, s, m, h or d"
            )))
        }
    };
    Ok(d)
}

fn redact_url(url: &url::Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

/// Redacts what looks like a password in a URL that did not parse.
fn redact_url_text(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("server", &self.server())
            .field("user", &self.pg.get_user())
            .field("password", &self.pg.get_password().map(|_| "***"))
            .field("dbname", &self.pg.get_dbname())
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("schema", &self.schema)
            .field("application_name", &self.application_name)
            .field("pool_size", &self.pool_size)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("retention", &self.retention)
            .field("unconsumed_retention", &self.unconsumed_retention)
            .field("max_payload", &self.max_payload)
            .field("batch_size", &self.batch_size)
            .field("prefetch", &self.prefetch)
            .field("safety_interval", &self.safety_interval)
            .field("lease_interval", &self.lease_interval)
            .field("cleanup_interval", &self.cleanup_interval)
            .field("send_timeout", &self.send_timeout)
            .field(
                "consumer_synchronous_commit",
                &self.consumer_synchronous_commit,
            )
            .field(
                "producer_synchronous_commit",
                &self.producer_synchronous_commit,
            )
            .finish()
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
        assert_eq!(c.pg_config().get_user(), Some("app"));
        assert_eq!(c.pg_config().get_password(), Some(&b"pw"[..]));
        assert_eq!(c.pg_config().get_application_name(), Some("tg-pubsub"));
        assert_eq!(c.schema, "tgps");
        assert_eq!(
            c.pg_config().get_connect_timeout(),
            Some(&Duration::from_secs(5))
        );
    }

    #[test]
    fn own_and_libpq_parameters() {
        let c = PostgresConfig::from_url(
            "postgresql://u@h/d?sslmode=disable&application_name=svc&schema=q_1&pool_size=3\
             &visibility_timeout=1500ms&retention=2h&unconsumed_retention=7d&max_payload=100\
             &batch_size=10&prefetch=5&safety_interval=5s&lease_interval=100ms\
             &cleanup_interval=1m&send_timeout=9s&consumer_synchronous_commit=on&producer_synchronous_commit=off&connect_timeout=2\
             &options=-c%20synchronous_commit%3Doff",
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
        assert!(c.consumer_synchronous_commit);
        assert_eq!(c.producer_synchronous_commit, Some(false));
        assert_eq!(
            c.pg_config().get_connect_timeout(),
            Some(&Duration::from_secs(2))
        );
        assert_eq!(
            c.pg_config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        let v = PostgresConfig::from_url("postgres://u@h/d?sslmode=verify-full&sslrootcert=/x.pem")
            .unwrap();
        assert_eq!(v.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(
            v.pg_config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let err = v.tls().unwrap_err();
        assert!(err.to_string().contains("/x.pem"), "{err}");
        assert_eq!(
            c.pg_config().get_options(),
            Some("-c synchronous_commit=off")
        );
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
    }

    #[test]
    fn debug_hides_password() {
        let c = PostgresConfig::from_url("postgres://user:hunter2@localhost/test").unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("localhost:5432"), "{debug}");
        let c = PostgresConfig::default().password("topsecret");
        assert!(!format!("{c:?}").contains("topsecret"));
    }

    #[test]
    fn bad_urls_name_the_problem() {
        for (url, needle) in [
            ("redis://x", "postgres://"),
            ("not a url", "malformed"),
            ("postgres://u@h/d?pool_size=lots", "pool_size"),
            ("postgres://u@h/d?visibility_timeout=5y", "unit"),
            ("postgres://u@h/d?schema=Bad-Name", "schema"),
            ("postgres://u@h/d?schema=pg_x", "schema"),
            ("postgres://u@h/d?colour=blue", "colour"),
            ("postgres://u@h/d?sslmode=sometimes", "sslmode"),
            ("postgres://u@h/d?prefetch=0", "prefetch"),
            (
                "postgres://u@h/d?consumer_synchronous_commit=maybe",
                "on or off",
            ),
        ] {
            let err = PostgresConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn errors_never_show_the_password() {
        for url in [
            "postgres://u:hunter2@h/d?colour=blue",
            "postgres://u:hunter2@h:port/d",
        ] {
            let err = PostgresConfig::from_url(url).unwrap_err();
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn default_is_local_test_database() {
        let c = PostgresConfig::from_url(PostgresConfig::DEFAULT_URL).unwrap();
        assert_eq!(c.server(), "127.0.0.1:5432");
        assert_eq!(c.dbname(), "test");
        assert_eq!(PostgresConfig::default().server(), "127.0.0.1:5432");
    }
}
