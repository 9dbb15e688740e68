//! Configuration of the Pulsar backend: a struct, a URL form, the settings and setters.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tg_backend_api::kit::config::{self, require, Secret};
use tg_backend_api::kit::Settings;
use tg_backend_api::{Error, Result};

/// Configuration of [`PulsarBackend`](crate::PulsarBackend).
///
/// From a URL (`PULSAR_URL`, or `PULSAR_HOST` / `--pulsar-host` as the Python framework spells it):
/// `pulsar://host:6650?max_payload=5177344&batch_size=1000` — `pulsar+ssl://` for TLS (default
/// port 6651). Every query option is optional; see each field for its name and default, and
/// `docs/pulsar.md` for the table. The token (`PULSAR_API_KEY`) and the listener name
/// (`PULSAR_LISTENER`) are set with [`PulsarConfig::token`] and [`PulsarConfig::listener`], or
/// all read by [`PulsarConfig::from_env`].
///
/// ```
/// use std::time::Duration;
/// use tg_backend_pulsar::PulsarConfig;
///
/// let c = PulsarConfig::from_url("pulsar://broker:6650?batch_size=500&batch_delay=2ms").unwrap()
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PulsarConfig {
    /// Broker (or proxy) host name or address, from the URL. Default: `localhost`.
    #[serde(skip)]
    pub host: String,
    /// Broker port, from the URL. Default: 6650 (`pulsar://`), 6651 (`pulsar+ssl://`).
    #[serde(skip)]
    pub port: u16,
    /// TLS (`pulsar+ssl://`). Default: false.
    #[serde(skip)]
    pub tls: bool,
    /// Token for Pulsar's token authentication (`PULSAR_API_KEY`); printed as `***`. Default:
    /// none (no authentication).
    #[serde(skip)]
    pub token: Option<Secret>,
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
    /// How long a batch waits for more messages after its first (`batch_delay`). Default: 1 ms.
    #[serde(with = "config::duration")]
    pub batch_delay: Duration,
    /// Messages a consumer asks the broker for ahead of `receive` (flow permits) and buffers
    /// (`receiver_queue`). Default: 1,000.
    pub receiver_queue: u32,
    /// Time allowed for the first connection (`connect_timeout`). Default: 5 s.
    #[serde(with = "config::duration")]
    pub connect_timeout: Duration,
    /// Time allowed for one broker operation: creating a producer or consumer, a send receipt
    /// (`operation_timeout`). Default: 30 s.
    #[serde(with = "config::duration")]
    pub operation_timeout: Duration,
    /// Upper bound of the reconnect delay after the connection broke (`reconnect_max`). Delays
    /// grow exponentially from 100 ms; reconnection never gives up. Default: 5 s.
    #[serde(with = "config::duration")]
    pub reconnect_max: Duration,
    /// De-duplication ids (`tg-dedup-id`) one q2 consumer remembers, the oldest forgotten first
    /// (`dedup_capacity`); 0 turns de-duplication off. Default: 10,000.
    pub dedup_capacity: usize,
    /// Advertised listener name (`PULSAR_LISTENER`, `listener`). The `pulsar` crate 6.9 cannot
    /// send it in topic lookups: when set, the backend logs a warning once and the lookups return
    /// the broker's default listener (see `docs/pulsar.md`). Default: none.
    pub listener: Option<String>,
    /// PEM file of the certificate authorities trusted for TLS (`ca_file`); the webpki roots when
    /// unset. Default: none.
    pub ca_file: Option<PathBuf>,
}

impl Default for PulsarConfig {
    fn default() -> Self {
        Self {
            host: "localhost".to_owned(),
            port: Self::DEFAULT_PORT,
            tls: false,
            token: None,
            max_payload: Self::DEFAULT_MAX_PAYLOAD,
            batching: true,
            batch_size: 1000,
            batch_bytes: 128 * 1024,
            batch_delay: Duration::from_millis(1),
            receiver_queue: 1000,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
            reconnect_max: Duration::from_secs(5),
            dedup_capacity: 10_000,
            listener: None,
            ca_file: None,
        }
    }
}

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

    /// Parses `pulsar://host[:port][?option=value&…]` or `pulsar+ssl://…`. A bare `host[:port]`
    /// is read as `pulsar://host[:port]`.
    pub fn from_url(url: &str) -> Result<Self> {
        let url = url.trim();
        let full = if url.contains("://") {
            url.to_owned()
        } else {
            format!("{}://{url}", Self::SCHEME)
        };
        let (what, schemes) = (crate::DRIVER.title, crate::DRIVER.schemes);
        let parsed = config::parse_url::<Self>(what, schemes, &full)?;
        if parsed.username.is_some() || parsed.password.is_some() {
            return Err(Error::config(
                "Pulsar URL must not carry credentials; set the token with PULSAR_API_KEY",
            ));
        }
        if !parsed.path.is_empty() {
            return Err(Error::config(format!(
                "Pulsar URL must not have a path, got {:?}",
                parsed.path
            )));
        }
        let host = parsed.require_host(what, "pulsar://host:port")?;
        let tls = parsed.scheme == Self::TLS_SCHEME;
        let default_port = if tls {
            Self::DEFAULT_TLS_PORT
        } else {
            Self::DEFAULT_PORT
        };
        Self {
            host,
            port: parsed.port.unwrap_or(default_port),
            tls,
            ..parsed.options
        }
        .checked()
    }

    /// The options within their ranges.
    fn checked(self) -> Result<Self> {
        let what = crate::DRIVER.title;
        for (value, min, max, option) in [
            (self.max_payload as u64, 1, 1 << 30, "max_payload"),
            (u64::from(self.batch_size), 1, 1 << 20, "batch_size"),
            (self.batch_bytes as u64, 1, 1 << 30, "batch_bytes"),
            (u64::from(self.receiver_queue), 1, 1 << 20, "receiver_queue"),
            (self.dedup_capacity as u64, 0, 1 << 24, "dedup_capacity"),
        ] {
            let rule = format!("between {min} and {max}");
            require((min..=max).contains(&value), what, option, &rule)?;
        }
        let (ms, minute, hour) = (
            Duration::from_millis(1),
            Duration::from_secs(60),
            Duration::from_secs(3600),
        );
        let batch_delay = (ms..=minute).contains(&self.batch_delay);
        require(batch_delay, what, "batch_delay", "between 1ms and 1m")?;
        for (value, option) in [
            (self.connect_timeout, "connect_timeout"),
            (self.operation_timeout, "operation_timeout"),
            (self.reconnect_max, "reconnect_max"),
        ] {
            let ok = (100 * ms..=hour).contains(&value);
            require(ok, what, option, "between 100ms and 1h")?;
        }
        let listener = self.listener.as_ref().is_none_or(|l| !l.trim().is_empty());
        require(listener, what, "listener", "a name")?;
        let ca_file = self
            .ca_file
            .as_ref()
            .is_none_or(|p| !p.as_os_str().is_empty());
        require(ca_file, what, "ca_file", "a file name")?;
        Ok(self)
    }

    /// The configuration from the environment: `PULSAR_URL`, else `PULSAR_HOST`, else
    /// [`Self::DEFAULT_URL`]; `PULSAR_API_KEY` and `PULSAR_LISTENER` when set and not empty.
    /// Errors name the variable.
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
                Self::ENV_HOST,
                settings
                    .get(Self::ENV_HOST)
                    .unwrap_or_else(|| Self::DEFAULT_URL.to_owned()),
            ),
        };
        let mut config = Self::from_url(&url).map_err(|e| settings.named(env, e))?;
        if let Some(token) = given(Self::ENV_TOKEN) {
            config.token = Some(Secret::new(token));
        }
        if let Some(listener) = given(Self::ENV_LISTENER) {
            config.listener = Some(listener);
        }
        Ok(config)
    }

    /// Sets the authentication token.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret::new(token));
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
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
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
    pub fn reconnect_max(mut self, delay: Duration) -> Self {
        self.reconnect_max = delay.max(Duration::from_millis(100));
        self
    }

    /// Sets how many de-duplication ids a q2 consumer remembers (0 turns de-duplication off).
    #[must_use]
    pub fn dedup_capacity(mut self, capacity: usize) -> Self {
        self.dedup_capacity = capacity;
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

    /// The service URL the client connects to, without options or secrets.
    pub fn service_url(&self) -> String {
        let scheme = if self.tls {
            Self::TLS_SCHEME
        } else {
            Self::SCHEME
        };
        format!("{scheme}://{}", self.address())
    }

    /// What the builder methods cannot rule out.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.host.is_empty() {
            return Err(Error::config("Pulsar host is empty"));
        }
        if self
            .token
            .as_ref()
            .is_some_and(|t| t.expose().trim().is_empty())
        {
            return Err(Error::config("PULSAR_API_KEY is set but empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tg_backend_api::ErrorKind;

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
    fn url_options() {
        let c = PulsarConfig::from_url(
            "pulsar://10.0.0.7:7000?max_payload=1024&batching=false&batch_size=10&batch_bytes=2048\
             &batch_delay=5ms&receiver_queue=50&connect_timeout=2s&operation_timeout=9s\
             &reconnect_max=1500ms&dedup_capacity=7&listener=internal&ca_file=/etc/ca.pem",
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
        assert_eq!(c.reconnect_max, Duration::from_millis(1500));
        assert_eq!(c.dedup_capacity, 7);
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
    fn bad_urls_name_the_problem() {
        for (url, needle) in [
            ("http://broker:6650", "pulsar:// or pulsar+ssl://"),
            ("pulsar://", "no host"),
            ("pulsar://broker:6650/path", "must not have a path"),
            (
                "pulsar://broker?batch_size=0",
                "batch_size must be between 1 and",
            ),
            ("pulsar://broker?batching=maybe", "batching=\"maybe\""),
            (
                "pulsar://broker?frobnicate=1",
                "\"frobnicate\"; known: max_payload, batching",
            ),
            (
                "pulsar://broker?connect_timeout=5",
                "a duration needs a unit",
            ),
            (
                "pulsar://broker?reconnect_max=10ms",
                "reconnect_max must be between",
            ),
            // the count is `dedup_capacity` now, and there is no time window
            (
                "pulsar://broker?dedup_window=7",
                "unknown Pulsar URL option",
            ),
            ("pulsar://broker?listener=", "listener must be a name"),
            ("pulsar://user:pw@broker", "must not carry credentials"),
        ] {
            let err = PulsarConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
    }

    #[test]
    fn settings_and_secrets() {
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
        assert_eq!(c.token.as_ref().map(Secret::expose), Some("tok-s3cret"));
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
        // a malformed value names its variable and flag
        let err = PulsarConfig::from_lookup(env(&[("PULSAR_HOST", "amqp://x")])).unwrap_err();
        assert!(
            err.to_string().starts_with("PULSAR_HOST / --pulsar-host: "),
            "{err}"
        );
        assert_eq!(
            err.context_value("variable"),
            Some("PULSAR_HOST / --pulsar-host")
        );
    }
}
