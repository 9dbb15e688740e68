//! Configuration of the Pulsar backend: a struct, a URL form, the environment and setters.

use std::fmt;
use std::time::Duration;

use tg_backend_api::{Error, Result};

/// Configuration of [`PulsarBackend`](crate::PulsarBackend).
///
/// From a URL (`PULSAR_URL`, or `PULSAR_HOST` / `--pulsar-host` as the Python framework spells it):
/// `pulsar://host:6650?max_payload=5177344&batch_size=1000` — `pulsar+ssl://` for TLS (default
/// port 6651). Every query parameter is optional; see each field for its name and default. The
/// token (`PULSAR_API_KEY`) and the listener name (`PULSAR_LISTENER`) are set with
/// [`PulsarConfig::token`] and [`PulsarConfig::listener`], or all three read by
/// [`PulsarConfig::from_env`].
///
/// ```
/// use std::time::Duration;
/// use tg_backend_pulsar::PulsarConfig;
///
/// let c = PulsarConfig::from_url("pulsar://broker:6650?batch_size=500&batch_delay_ms=2").unwrap()
///     .token("eyJh.secret.sig");
/// assert_eq!((c.host.as_str(), c.port, c.batch_size), ("broker", 6650, 500));
/// assert_eq!(c.batch_delay, Duration::from_millis(2));
/// assert!(!format!("{c:?}").contains("secret"));
/// assert_eq!(c.service_url(), "pulsar://broker:6650");
///
/// let tls = PulsarConfig::from_url("pulsar+ssl://pulsar.example.com").unwrap();
/// assert_eq!((tls.port, tls.tls), (6651, true));
/// ```
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq)]
pub struct PulsarConfig {
    /// Broker (or proxy) host name or address. Default: `localhost`.
    pub host: String,
    /// Broker port. Default: 6650 (`pulsar://`), 6651 (`pulsar+ssl://`).
    pub port: u16,
    /// TLS (`pulsar+ssl://`). Default: false.
    pub tls: bool,
    /// PEM file of the certificate authorities trusted for TLS (`ca_file`); the webpki roots when
    /// unset. Default: none.
    pub ca_file: Option<std::path::PathBuf>,
    /// Token for Pulsar's token authentication (`PULSAR_API_KEY`); never printed by `Debug`,
    /// errors or logs. Default: none (no authentication).
    pub token: Option<String>,
    /// Advertised listener name (`PULSAR_LISTENER`, `listener`). The `pulsar` crate 6.9 cannot
    /// send it in topic lookups: when set, the backend logs a warning once and the lookups return
    /// the broker's default listener (see `docs/pulsar.md`). Default: none.
    pub listener: Option<String>,
    /// Largest payload in bytes (`max_payload`); larger sends fail with `PayloadTooLarge` before
    /// anything is sent (the `pulsar` crate has no chunking). Default: 5 MiB − 64 KiB =
    /// 5,177,344, which keeps a message with its metadata under the 5 MiB `maxMessageSize` of
    /// Pulsar and pulsar-lite.
    pub max_payload: usize,
    /// Whether producers batch messages unless their options say otherwise (`batching`).
    /// Default: true.
    pub batching: bool,
    /// Messages per batch at most (`batch_size`). Default: 1,000.
    pub batch_size: u32,
    /// Bytes of payload per batch at most (`batch_bytes`). Default: 128 KiB.
    pub batch_bytes: usize,
    /// How long a batch waits for more messages after its first (`batch_delay_ms`).
    /// Default: 1 ms.
    pub batch_delay: Duration,
    /// Messages a consumer asks the broker for ahead of `receive` (flow permits) and buffers
    /// (`receiver_queue`). Default: 1,000.
    pub receiver_queue: u32,
    /// Time allowed for the first connection (`connect_timeout`, seconds). Default: 5 s.
    pub connect_timeout: Duration,
    /// Time allowed for one broker operation: creating a producer or consumer, a send receipt
    /// (`operation_timeout`, seconds). Default: 30 s.
    pub operation_timeout: Duration,
    /// Upper bound of the reconnect delay after the connection broke (`reconnect_max`,
    /// milliseconds). Delays grow exponentially from 100 ms; reconnection never gives up.
    /// Default: 5 s.
    pub reconnect_max_delay: Duration,
    /// De-duplication ids (`tg-dedup-id`) one q2 consumer remembers (`dedup_window`).
    /// Default: 10,000.
    pub dedup_window: usize,
}

impl Default for PulsarConfig {
    fn default() -> Self {
        Self {
            host: "localhost".to_owned(),
            port: Self::DEFAULT_PORT,
            tls: false,
            ca_file: None,
            token: None,
            listener: None,
            max_payload: Self::DEFAULT_MAX_PAYLOAD,
            batching: true,
            batch_size: 1000,
            batch_bytes: 128 * 1024,
            batch_delay: Duration::from_millis(1),
            receiver_queue: 1000,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
            reconnect_max_delay: Duration::from_secs(5),
            dedup_window: 10_000,
        }
    }
}

const KNOWN_PARAMETERS: &str = "max_payload, batching, batch_size, batch_bytes, batch_delay_ms, \
     receiver_queue, connect_timeout, operation_timeout, reconnect_max, dedup_window, listener, ca_file";

impl PulsarConfig {
    /// The plain URL scheme, `pulsar`.
    pub const SCHEME: &'static str = "pulsar";
    /// The TLS URL scheme, `pulsar+ssl`.
    pub const TLS_SCHEME: &'static str = "pulsar+ssl";
    /// The default port of `pulsar://`.
    pub const DEFAULT_PORT: u16 = 6650;
    /// The default port of `pulsar+ssl://`.
    pub const DEFAULT_TLS_PORT: u16 = 6651;
    /// The default URL: a standalone broker on this machine (the Python framework's command-line
    /// tools use the same; its services default to `pulsar://pulsar:6650`).
    pub const DEFAULT_URL: &'static str = "pulsar://localhost:6650";
    /// The default `max_payload`: 5 MiB − 64 KiB.
    pub const DEFAULT_MAX_PAYLOAD: usize = 5 * 1024 * 1024 - 64 * 1024;
    /// The environment variable with the broker URL (wins over [`Self::ENV_HOST`]).
    pub const ENV_URL: &'static str = "PULSAR_URL";
    /// The environment variable with the broker URL as the Python framework names it.
    pub const ENV_HOST: &'static str = "PULSAR_HOST";
    /// The environment variable with the authentication token.
    pub const ENV_TOKEN: &'static str = "PULSAR_API_KEY";
    /// The environment variable with the advertised listener name.
    pub const ENV_LISTENER: &'static str = "PULSAR_LISTENER";

    /// A configuration for `host:port` with every other value at its default.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            ..Self::default()
        }
    }

    /// Parses `pulsar://host[:port][?key=value&…]` or `pulsar+ssl://…`. A bare `host[:port]` is
    /// read as `pulsar://host[:port]`.
    pub fn from_url(url: &str) -> Result<Self> {
        let url = url.trim();
        let full = if url.contains("://") {
            url.to_owned()
        } else {
            format!("pulsar://{url}")
        };
        let parsed = url::Url::parse(&full)
            .map_err(|e| Error::config(format!("malformed Pulsar URL {:?}: {e}", redact(url))))?;
        let tls = match parsed.scheme() {
            Self::SCHEME => false,
            Self::TLS_SCHEME => true,
            other => {
                return Err(Error::config(format!(
                    "Pulsar URL must start with pulsar:// or pulsar+ssl://, got scheme {other:?}"
                )))
            }
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| Error::config("Pulsar URL has no host (expected pulsar://host:port)"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = parsed.port().unwrap_or(if tls {
            Self::DEFAULT_TLS_PORT
        } else {
            Self::DEFAULT_PORT
        });
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(Error::config(
                "Pulsar URL must not carry credentials; set the token with PULSAR_API_KEY",
            ));
        }
        if parsed.path() != "" && parsed.path() != "/" {
            return Err(Error::config(format!(
                "Pulsar URL must not have a path, got {:?}",
                parsed.path()
            )));
        }
        let mut config = Self {
            host,
            port,
            tls,
            ..Self::default()
        };
        for (key, value) in parsed.query_pairs() {
            let int = |min: u64, max: u64| -> Result<u64> {
                match value.parse::<u64>() {
                    Ok(n) if (min..=max).contains(&n) => Ok(n),
                    Ok(n) => Err(Error::config(format!(
                        "Pulsar URL parameter {key}={n} is out of range {min}..={max}"
                    ))),
                    Err(e) => Err(Error::config(format!(
                        "Pulsar URL parameter {key}={value:?} is not a number: {e}"
                    ))),
                }
            };
            match &*key {
                "max_payload" => config.max_payload = int(1, 1 << 30)? as usize,
                "batching" => {
                    config.batching = match &*value {
                        "true" | "1" | "yes" | "on" => true,
                        "false" | "0" | "no" | "off" => false,
                        other => {
                            return Err(Error::config(format!(
                            "Pulsar URL parameter batching={other:?} is not a boolean (true/false)"
                        )))
                        }
                    }
                }
                "batch_size" => config.batch_size = int(1, 1 << 20)? as u32,
                "batch_bytes" => config.batch_bytes = int(1, 1 << 30)? as usize,
                "batch_delay_ms" => config.batch_delay = Duration::from_millis(int(1, 60_000)?),
                "receiver_queue" => config.receiver_queue = int(1, 1 << 20)? as u32,
                "connect_timeout" => config.connect_timeout = Duration::from_secs(int(1, 3600)?),
                "operation_timeout" => {
                    config.operation_timeout = Duration::from_secs(int(1, 3600)?)
                }
                "reconnect_max" => {
                    config.reconnect_max_delay = Duration::from_millis(int(100, 3_600_000)?)
                }
                "dedup_window" => config.dedup_window = int(0, 1 << 24)? as usize,
                "listener" => {
                    if value.is_empty() {
                        return Err(Error::config("Pulsar URL parameter listener is empty"));
                    }
                    config.listener = Some(value.into_owned());
                }
                "ca_file" => {
                    if value.is_empty() {
                        return Err(Error::config("Pulsar URL parameter ca_file is empty"));
                    }
                    config.ca_file = Some(value.into_owned().into());
                }
                other => {
                    return Err(Error::config(format!(
                        "unknown Pulsar URL parameter {other:?}; known: {KNOWN_PARAMETERS}"
                    )))
                }
            }
        }
        Ok(config)
    }

    /// The configuration from the environment: `PULSAR_URL`, else `PULSAR_HOST`, else
    /// [`Self::DEFAULT_URL`]; `PULSAR_API_KEY` and `PULSAR_LISTENER` when set and not empty.
    /// Errors name the variable.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] with another source of variables (for tests and the facade).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let non_empty = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let (variable, url) = match (non_empty(Self::ENV_URL), non_empty(Self::ENV_HOST)) {
            (Some(url), _) => (Self::ENV_URL, url),
            (None, Some(host)) => (Self::ENV_HOST, host),
            (None, None) => (Self::ENV_URL, Self::DEFAULT_URL.to_owned()),
        };
        let mut config = Self::from_url(&url).map_err(|e| {
            Error::config(format!("{variable}: {}", e.message())).with_context("variable", variable)
        })?;
        if let Some(token) = non_empty(Self::ENV_TOKEN) {
            config.token = Some(token.trim().to_owned());
        }
        if let Some(listener) = non_empty(Self::ENV_LISTENER) {
            config.listener = Some(listener.trim().to_owned());
        }
        Ok(config)
    }

    /// Sets the authentication token.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the advertised listener name (see [`Self::listener`](field@Self::listener)).
    #[must_use]
    pub fn listener(mut self, listener: impl Into<String>) -> Self {
        self.listener = Some(listener.into());
        self
    }

    /// Turns TLS on or off (the `pulsar+ssl://` scheme).
    #[must_use]
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Trusts the certificate authorities of this PEM file for TLS.
    #[must_use]
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Sets the largest payload (at least 1 byte).
    #[must_use]
    pub fn max_payload(mut self, max: usize) -> Self {
        self.max_payload = max.max(1);
        self
    }

    /// Turns producer batching on or off by default.
    #[must_use]
    pub fn batching(mut self, on: bool) -> Self {
        self.batching = on;
        self
    }

    /// Sets the most messages per batch (at least 1).
    #[must_use]
    pub fn batch_size(mut self, size: u32) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Sets the most payload bytes per batch (at least 1).
    #[must_use]
    pub fn batch_bytes(mut self, bytes: usize) -> Self {
        self.batch_bytes = bytes.max(1);
        self
    }

    /// Sets how long a batch waits for more messages (at least 1 ms).
    #[must_use]
    pub fn batch_delay(mut self, delay: Duration) -> Self {
        self.batch_delay = delay.max(Duration::from_millis(1));
        self
    }

    /// Sets the receiver queue of consumers (at least 1).
    #[must_use]
    pub fn receiver_queue(mut self, size: u32) -> Self {
        self.receiver_queue = size.max(1);
        self
    }

    /// Sets the connect timeout (at least 100 ms).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// Sets the operation timeout (at least 100 ms).
    #[must_use]
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// Sets the upper bound of the reconnect delay (at least 100 ms).
    #[must_use]
    pub fn reconnect_max_delay(mut self, delay: Duration) -> Self {
        self.reconnect_max_delay = delay.max(Duration::from_millis(100));
        self
    }

    /// Sets the de-duplication window of q2 consumers (0 turns de-duplication off).
    #[must_use]
    pub fn dedup_window(mut self, window: usize) -> Self {
        self.dedup_window = window;
        self
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The service URL the client connects to, without parameters or secrets.
    pub fn service_url(&self) -> String {
        let scheme = if self.tls {
            Self::TLS_SCHEME
        } else {
            Self::SCHEME
        };
        format!("{scheme}://{}", self.address())
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.host.is_empty() {
            return Err(Error::config("Pulsar host is empty"));
        }
        if self.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(Error::config("PULSAR_API_KEY is set but empty"));
        }
        Ok(())
    }
}

impl fmt::Debug for PulsarConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PulsarConfig")
            .field("url", &self.service_url())
            .field("ca_file", &self.ca_file)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("listener", &self.listener)
            .field("max_payload", &self.max_payload)
            .field("batching", &self.batching)
            .field("batch_size", &self.batch_size)
            .field("batch_bytes", &self.batch_bytes)
            .field("batch_delay", &self.batch_delay)
            .field("receiver_queue", &self.receiver_queue)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("dedup_window", &self.dedup_window)
            .finish()
    }
}

/// The URL with any user info replaced by `***`, for error messages about malformed URLs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(start), Some(at)) if at > start => format!("{}***{}", &url[..start + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = PulsarConfig::default();
        assert_eq!(c.service_url(), "pulsar://localhost:6650");
        assert!(c.batching);
        assert_eq!(c.max_payload, 5 * 1024 * 1024 - 64 * 1024);
        assert_eq!(
            PulsarConfig::from_url(PulsarConfig::DEFAULT_URL).unwrap(),
            c
        );
    }

    #[test]
    fn url_parameters() {
        let c = PulsarConfig::from_url(
            "pulsar://10.0.0.7:7000?max_payload=1024&batching=false&batch_size=10&batch_bytes=2048\
             &batch_delay_ms=5&receiver_queue=50&connect_timeout=2&operation_timeout=9\
             &reconnect_max=1500&dedup_window=7&listener=internal&ca_file=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.tls), ("10.0.0.7", 7000, false));
        assert_eq!(c.max_payload, 1024);
        assert!(!c.batching);
        assert_eq!((c.batch_size, c.batch_bytes), (10, 2048));
        assert_eq!(c.batch_delay, Duration::from_millis(5));
        assert_eq!(c.receiver_queue, 50);
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.operation_timeout, Duration::from_secs(9));
        assert_eq!(c.reconnect_max_delay, Duration::from_millis(1500));
        assert_eq!(c.dedup_window, 7);
        assert_eq!(c.listener.as_deref(), Some("internal"));
        assert_eq!(
            c.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        let bare = PulsarConfig::from_url("broker:6650").unwrap();
        assert_eq!(bare.service_url(), "pulsar://broker:6650");
        let v6 = PulsarConfig::from_url("pulsar://[::1]:6650").unwrap();
        assert_eq!(v6.service_url(), "pulsar://[::1]:6650");
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for bad in [
            "http://broker:6650",
            "pulsar://",
            "pulsar://broker:6650/path",
            "pulsar://broker?batch_size=0",
            "pulsar://broker?batching=maybe",
            "pulsar://broker?frobnicate=1",
            "pulsar://user:pw@broker",
        ] {
            let err = PulsarConfig::from_url(bad).unwrap_err();
            assert_eq!(
                err.kind(),
                tg_backend_api::ErrorKind::ConfigInvalid,
                "{bad}"
            );
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
    }

    #[test]
    fn environment_and_secrets() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let c = PulsarConfig::from_lookup(env(&[
            ("PULSAR_HOST", "pulsar://pulsar:6650"),
            ("PULSAR_API_KEY", "tok-s3cret"),
            ("PULSAR_LISTENER", "external"),
        ]))
        .unwrap();
        assert_eq!(c.service_url(), "pulsar://pulsar:6650");
        assert_eq!(c.token.as_deref(), Some("tok-s3cret"));
        assert_eq!(c.listener.as_deref(), Some("external"));
        assert!(!format!("{c:?}").contains("s3cret"));
        // PULSAR_URL wins over PULSAR_HOST
        let c = PulsarConfig::from_lookup(env(&[
            ("PULSAR_HOST", "pulsar://a:1"),
            ("PULSAR_URL", "pulsar://b:2"),
        ]))
        .unwrap();
        assert_eq!(c.service_url(), "pulsar://b:2");
        // nothing set: the default
        let c = PulsarConfig::from_lookup(|_| None).unwrap();
        assert_eq!(c.service_url(), PulsarConfig::DEFAULT_URL);
        // a malformed value names its variable
        let err = PulsarConfig::from_lookup(env(&[("PULSAR_HOST", "amqp://x")])).unwrap_err();
        assert!(err.to_string().contains("PULSAR_HOST"), "{err}");
        assert_eq!(err.context_value("variable"), Some("PULSAR_HOST"));
    }
}
