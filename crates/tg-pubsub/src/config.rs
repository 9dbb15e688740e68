//! Choosing and building a backend from flags and environment variables.

use std::fmt;
use std::sync::Arc;

use tg_backend_api::{Backend, Error, ErrorKind, Result};
use tg_backend_memory::{MemoryBackend, MemoryConfig};

/// Every backend tg-pubsub knows, with whether this build has it compiled in. A backend whose crate
/// has not landed yet is listed as never compiled in.
///
/// Defaults of the broker settings below: the local servers the tests use.
pub const BACKENDS: &[(&str, bool)] = &[
    ("memory", true),
    ("redis", cfg!(feature = "redis")),
    ("postgres", cfg!(feature = "postgres")),
    ("mqtt", cfg!(feature = "mqtt")),
    ("pulsar", cfg!(feature = "pulsar")),
];

fn compiled_in() -> String {
    BACKENDS
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which backend to build and how to reach it: `--pubsub-backend` / `PUBSUB_BACKEND` and each
/// backend's own flags and environment variables (spec 000 "Configuration and Initialization").
///
/// Use it as `#[command(flatten)]` in a service's clap arguments, or [`PubSubConfig::from_env`].
/// `Debug` never shows passwords.
#[derive(Clone, clap::Args)]
#[non_exhaustive]
pub struct PubSubConfig {
    /// Backend to use: memory, redis, postgres, mqtt, pulsar (what is compiled in).
    #[arg(
        long = "pubsub-backend",
        env = "PUBSUB_BACKEND",
        default_value = "memory"
    )]
    pub backend: String,

    /// Backend to use instead when the chosen one cannot be reached at start-up (never silently:
    /// a warning names the reason). Default: none, start-up fails.
    #[arg(long = "pubsub-fallback", env = "PUBSUB_FALLBACK")]
    pub fallback: Option<String>,

    /// In-memory backend settings, e.g. `memory://?capacity=100000&overflow=block`.
    #[arg(long = "memory-url", env = "MEMORY_URL")]
    pub memory_url: Option<String>,

    /// Redis URL: `redis://[user[:password]@]host[:port][/db]`, `rediss://` for TLS.
    #[cfg(feature = "redis")]
    #[arg(long = "redis-url", env = "REDIS_URL", default_value = DEFAULT_REDIS_URL)]
    pub redis_url: String,

    /// PostgreSQL URL: `postgres://[user[:password]@]host[:port]/database[?sslmode=…]`.
    #[cfg(feature = "postgres")]
    #[arg(long = "postgres-url", env = "DATABASE_URL", default_value = DEFAULT_POSTGRES_URL)]
    pub postgres_url: String,

    /// MQTT URL: `mqtt://[user:password@]host[:port][?client_id=…&keepalive=…]`, `mqtts://` for
    /// TLS. When set, it wins over the host/port/username/password settings.
    #[cfg(feature = "mqtt")]
    #[arg(long = "mqtt-url", env = "MQTT_URL")]
    pub mqtt_url: Option<String>,

    /// MQTT broker host.
    #[cfg(feature = "mqtt")]
    #[arg(long = "mqtt-host", env = "MQTT_HOST", default_value = "localhost")]
    pub mqtt_host: String,

    /// MQTT broker port.
    #[cfg(feature = "mqtt")]
    #[arg(long = "mqtt-port", env = "MQTT_PORT", default_value = "1883")]
    pub mqtt_port: String,

    /// MQTT username.
    #[cfg(feature = "mqtt")]
    #[arg(long = "mqtt-username", env = "MQTT_USERNAME")]
    pub mqtt_username: Option<String>,

    /// MQTT password (never printed).
    #[cfg(feature = "mqtt")]
    #[arg(long = "mqtt-password", env = "MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,

    /// Pulsar broker URL: `pulsar://host[:port]`, `pulsar+ssl://` for TLS (query parameters in
    /// docs/pulsar.md). When set, it wins over `--pulsar-host`.
    #[cfg(feature = "pulsar")]
    #[arg(long = "pulsar-url", env = "PULSAR_URL")]
    pub pulsar_url: Option<String>,

    /// Pulsar broker, as the Python framework names it: `pulsar://host:port`.
    #[cfg(feature = "pulsar")]
    #[arg(long = "pulsar-host", env = "PULSAR_HOST", default_value = DEFAULT_PULSAR_HOST)]
    pub pulsar_host: String,

    /// Pulsar authentication token (never printed).
    #[cfg(feature = "pulsar")]
    #[arg(
        long = "pulsar-api-key",
        env = "PULSAR_API_KEY",
        hide_env_values = true
    )]
    pub pulsar_api_key: Option<String>,

    /// Pulsar advertised listener name.
    #[cfg(feature = "pulsar")]
    #[arg(long = "pulsar-listener", env = "PULSAR_LISTENER")]
    pub pulsar_listener: Option<String>,
}

/// Default of `REDIS_URL`.
#[cfg(feature = "redis")]
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Default of `PULSAR_HOST`.
#[cfg(feature = "pulsar")]
const DEFAULT_PULSAR_HOST: &str = "pulsar://localhost:6650";
/// Default of `DATABASE_URL`.
#[cfg(feature = "postgres")]
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

impl Default for PubSubConfig {
    fn default() -> Self {
        Self {
            backend: "memory".to_owned(),
            fallback: None,
            memory_url: None,
            #[cfg(feature = "redis")]
            redis_url: DEFAULT_REDIS_URL.to_owned(),
            #[cfg(feature = "postgres")]
            postgres_url: DEFAULT_POSTGRES_URL.to_owned(),
            #[cfg(feature = "mqtt")]
            mqtt_url: None,
            #[cfg(feature = "mqtt")]
            mqtt_host: "localhost".to_owned(),
            #[cfg(feature = "mqtt")]
            mqtt_port: "1883".to_owned(),
            #[cfg(feature = "mqtt")]
            mqtt_username: None,
            #[cfg(feature = "mqtt")]
            mqtt_password: None,
            #[cfg(feature = "pulsar")]
            pulsar_url: None,
            #[cfg(feature = "pulsar")]
            pulsar_host: DEFAULT_PULSAR_HOST.to_owned(),
            #[cfg(feature = "pulsar")]
            pulsar_api_key: None,
            #[cfg(feature = "pulsar")]
            pulsar_listener: None,
        }
    }
}

#[derive(clap::Parser)]
struct EnvOnly {
    #[command(flatten)]
    config: PubSubConfig,
}

impl PubSubConfig {
    /// The configuration from environment variables and defaults alone.
    pub fn from_env() -> Result<Self> {
        use clap::Parser;
        EnvOnly::try_parse_from(["tg-pubsub"])
            .map(|e| e.config)
            .map_err(|e| Error::config(format!("invalid pub/sub environment: {e}")))
    }

    /// The MQTT configuration: `MQTT_URL` if set, else host, port and credentials.
    #[cfg(feature = "mqtt")]
    fn mqtt(&self) -> Result<tg_backend_mqtt::MqttConfig> {
        if let Some(url) = &self.mqtt_url {
            return tg_backend_mqtt::MqttConfig::from_url(url)
                .map_err(|e| named("MQTT_URL / --mqtt-url", e));
        }
        let port: u16 = self.mqtt_port.trim().parse().map_err(|_| {
            Error::config(format!(
                "MQTT_PORT / --mqtt-port: {:?} is not a port number (1-65535)",
                self.mqtt_port
            ))
            .with_context("variable", "MQTT_PORT / --mqtt-port")
        })?;
        let mut mqtt = tg_backend_mqtt::MqttConfig::new(self.mqtt_host.clone(), port);
        match (&self.mqtt_username, &self.mqtt_password) {
            (Some(user), Some(password)) => mqtt = mqtt.credentials(user.clone(), password.clone()),
            (Some(user), None) => mqtt = mqtt.username(user.clone()),
            (None, Some(_)) => return Err(Error::config(
                "MQTT_PASSWORD / --mqtt-password is set without MQTT_USERNAME / --mqtt-username",
            )),
            (None, None) => {}
        }
        Ok(mqtt)
    }

    /// The Pulsar configuration: `PULSAR_URL` if set, else `PULSAR_HOST`, with the token and
    /// listener.
    #[cfg(feature = "pulsar")]
    fn pulsar(&self) -> Result<tg_backend_pulsar::PulsarConfig> {
        use tg_backend_pulsar::PulsarConfig;
        PulsarConfig::from_lookup(|name| match name {
            PulsarConfig::ENV_URL => self.pulsar_url.clone(),
            PulsarConfig::ENV_HOST => Some(self.pulsar_host.clone()),
            PulsarConfig::ENV_TOKEN => self.pulsar_api_key.clone(),
            PulsarConfig::ENV_LISTENER => self.pulsar_listener.clone(),
            _ => None,
        })
    }

    /// The memory backend configuration (from `MEMORY_URL` if set).
    fn memory(&self) -> Result<MemoryConfig> {
        match &self.memory_url {
            None => Ok(MemoryConfig::default()),
            Some(url) => {
                MemoryConfig::from_url(url).map_err(|e| named("MEMORY_URL / --memory-url", e))
            }
        }
    }
}

impl fmt::Debug for PubSubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("PubSubConfig");
        d.field("backend", &self.backend)
            .field("fallback", &self.fallback)
            .field("memory_url", &self.memory_url);
        #[cfg(feature = "redis")]
        d.field("redis_url", &redact_url(&self.redis_url));
        #[cfg(feature = "postgres")]
        d.field("postgres_url", &redact_url(&self.postgres_url));
        #[cfg(feature = "mqtt")]
        d.field("mqtt_url", &self.mqtt_url.as_deref().map(redact_url))
            .field("mqtt_host", &self.mqtt_host)
            .field("mqtt_port", &self.mqtt_port)
            .field("mqtt_username", &self.mqtt_username)
            .field("mqtt_password", &self.mqtt_password.as_ref().map(|_| "***"));
        #[cfg(feature = "pulsar")]
        d.field("pulsar_url", &self.pulsar_url.as_deref().map(redact_url))
            .field("pulsar_host", &redact_url(&self.pulsar_host))
            .field(
                "pulsar_api_key",
                &self.pulsar_api_key.as_ref().map(|_| "***"),
            )
            .field("pulsar_listener", &self.pulsar_listener);
        d.finish_non_exhaustive()
    }
}

/// The URL with its password replaced by `***` (or a placeholder when it does not parse).
#[allow(dead_code)] // used by the broker features
fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

/// Prefixes an error with the variable it came from.
fn named(variable: &str, err: Error) -> Error {
    Error::new(err.kind(), format!("{variable}: {}", err.message()))
        .set_temporary(err.is_temporary())
        .with_context("variable", variable)
        .with_source(err)
}

/// Builds the backend `name` from `config`.
pub async fn connect_backend(name: &str, config: &PubSubConfig) -> Result<Arc<dyn Backend>> {
    match name {
        "memory" => Ok(Arc::new(MemoryBackend::with_config(config.memory()?))),
        #[cfg(feature = "redis")]
        "redis" => {
            let redis = tg_backend_redis::RedisConfig::from_url(&config.redis_url)
                .map_err(|e| named("REDIS_URL / --redis-url", e))?;
            Ok(Arc::new(
                tg_backend_redis::RedisBackend::connect(redis).await?,
            ))
        }
        #[cfg(feature = "postgres")]
        "postgres" => {
            let postgres = tg_backend_postgres::PostgresConfig::from_url(&config.postgres_url)
                .map_err(|e| named("DATABASE_URL / --postgres-url", e))?;
            Ok(Arc::new(
                tg_backend_postgres::PostgresBackend::connect(postgres).await?,
            ))
        }
        #[cfg(feature = "mqtt")]
        "mqtt" => Ok(Arc::new(
            tg_backend_mqtt::MqttBackend::connect(config.mqtt()?).await?,
        )),
        #[cfg(feature = "pulsar")]
        "pulsar" => Ok(Arc::new(
            tg_backend_pulsar::PulsarBackend::connect(config.pulsar()?).await?,
        )),
        other => match BACKENDS.iter().find(|(n, _)| *n == other) {
            Some((_, false)) => Err(Error::config(format!(
                "backend {other:?} is not compiled in: enable the `{other}` feature of tg-pubsub \
                 (compiled in: {})",
                compiled_in()
            ))),
            _ => Err(Error::config(format!(
                "unknown backend {other:?} (PUBSUB_BACKEND / --pubsub-backend); compiled in: {}",
                compiled_in()
            ))),
        },
    }
}

/// Builds the configured backend; if it cannot be reached and a fallback is configured, builds the
/// fallback and logs a warning that names the reason.
pub async fn connect(config: &PubSubConfig) -> Result<Arc<dyn Backend>> {
    let name = config.backend.trim().to_ascii_lowercase();
    match connect_backend(&name, config).await {
        Ok(backend) => Ok(backend),
        Err(err) if err.kind() == ErrorKind::Connection || err.kind() == ErrorKind::Timeout => {
            let Some(fallback) = &config.fallback else {
                return Err(err);
            };
            let fallback = fallback.trim().to_ascii_lowercase();
            tracing::warn!(
                backend = %name,
                fallback = %fallback,
                reason = %err,
                "pub/sub backend unreachable at start-up; using the configured fallback"
            );
            connect_backend(&fallback, config).await.map_err(|e| {
                Error::new(
                    e.kind(),
                    format!(
                        "{name} unreachable ({err}) and fallback {fallback} failed too: {}",
                        e.message()
                    ),
                )
            })
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn default_is_memory() {
        let backend = connect(&PubSubConfig::default()).await.unwrap();
        assert_eq!(backend.name(), "memory");
    }

    #[tokio::test]
    async fn unknown_backend_lists_compiled_in() {
        let config = PubSubConfig {
            backend: "kafka".into(),
            ..PubSubConfig::default()
        };
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(err.message().contains("unknown backend \"kafka\""), "{err}");
        assert!(err.message().contains("compiled in: memory"), "{err}");
    }

    #[tokio::test]
    async fn known_but_missing_backend_names_the_feature() {
        if let Some((name, _)) = BACKENDS.iter().find(|(_, on)| !on) {
            let config = PubSubConfig {
                backend: (*name).into(),
                ..PubSubConfig::default()
            };
            let err = connect(&config).await.unwrap_err();
            assert!(
                err.message()
                    .contains(&format!("enable the `{name}` feature")),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn malformed_memory_url_names_the_variable() {
        let config = PubSubConfig {
            memory_url: Some("memory://?capacity=x".into()),
            ..PubSubConfig::default()
        };
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(
            err.message().starts_with("MEMORY_URL / --memory-url:"),
            "{err}"
        );
    }

    #[cfg(feature = "mqtt")]
    #[tokio::test]
    async fn mqtt_settings_name_their_variables_and_hide_the_password() {
        let config = PubSubConfig {
            backend: "mqtt".into(),
            mqtt_port: "eighteen".into(),
            ..PubSubConfig::default()
        };
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(
            err.message().starts_with("MQTT_PORT / --mqtt-port:"),
            "{err}"
        );
        let config = PubSubConfig {
            mqtt_url: Some("mqtt://user:s3cret@127.0.0.1:1883".into()),
            mqtt_password: Some("hunter2".into()),
            ..PubSubConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn redis_url_errors_name_the_variable_and_debug_hides_the_password() {
        let config = PubSubConfig {
            backend: "redis".into(),
            redis_url: "http://nope".into(),
            ..PubSubConfig::default()
        };
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(
            err.message().starts_with("REDIS_URL / --redis-url:"),
            "{err}"
        );
        let config = PubSubConfig {
            redis_url: "redis://:s3cret@127.0.0.1:6379/0".into(),
            ..PubSubConfig::default()
        };
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn unreachable_backend_falls_back_only_when_configured() {
        // nothing listens on port 1: connecting fails at once with a Connection error
        let mut config = PubSubConfig {
            backend: "redis".into(),
            redis_url: "redis://127.0.0.1:1".into(),
            ..PubSubConfig::default()
        };
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
        config.fallback = Some("memory".into());
        let backend = connect(&config).await.unwrap();
        assert_eq!(backend.name(), "memory");
    }

    #[cfg(feature = "pulsar")]
    #[tokio::test]
    async fn pulsar_errors_name_the_variable_and_debug_hides_the_token() {
        let config = PubSubConfig {
            backend: "pulsar".into(),
            pulsar_url: Some("http://nope".into()),
            ..PubSubConfig::default()
        };
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
        assert!(err.message().contains("PULSAR_URL"), "{err}");
        let config = PubSubConfig {
            pulsar_api_key: Some("t0ken-s3cret".into()),
            ..PubSubConfig::default()
        };
        let shown = format!("{config:?} {:?}", config.pulsar().unwrap());
        assert!(!shown.contains("t0ken-s3cret"), "{shown}");
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_url_errors_name_the_variable_and_debug_hides_the_password() {
        let config = PubSubConfig {
            backend: "postgres".into(),
            postgres_url: "mysql://x".into(),
            ..PubSubConfig::default()
        };
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(
            err.message().starts_with("DATABASE_URL / --postgres-url:"),
            "{err}"
        );
        let config = PubSubConfig {
            postgres_url: "postgres://u:s3cret@h/db".into(),
            ..PubSubConfig::default()
        };
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    /// Features of tg-pubsub that are not backends.
    const NON_BACKEND_FEATURES: &[&str] = &["default", "metrics-http", "redis-tls"];

    #[test]
    fn cargo_features_match_backends() {
        let manifest = include_str!("../Cargo.toml");
        let features = manifest
            .split("[features]")
            .nth(1)
            .and_then(|s| s.split("\n[").next())
            .unwrap_or("");
        let declared: Vec<&str> = features
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            .filter(|k| !k.starts_with('#') && !NON_BACKEND_FEATURES.contains(k))
            .collect();
        let expected: Vec<&str> = BACKENDS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| *n != "memory")
            .collect();
        for feature in &declared {
            assert!(
                expected.contains(feature),
                "feature {feature} has no entry in BACKENDS"
            );
        }
        for (name, on) in BACKENDS.iter().filter(|(n, _)| *n != "memory") {
            if *on {
                assert!(
                    declared.contains(name),
                    "{name} is compiled in but not a declared feature"
                );
            }
        }
    }
}
