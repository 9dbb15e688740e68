//! Choosing and building a backend from flags and environment variables.

use std::fmt;
use std::sync::Arc;

use tg_backend_api::{Backend, Error, ErrorKind, Result};
use tg_backend_memory::{MemoryBackend, MemoryConfig};

/// Every backend tg-pubsub knows, with whether this build has it compiled in. A backend whose crate
/// has not landed yet is listed as never compiled in.
pub const BACKENDS: &[(&str, bool)] = &[
    ("memory", true),
    ("redis", false),
    ("postgres", false),
    ("mqtt", false),
    ("pulsar", false),
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
}

impl Default for PubSubConfig {
    fn default() -> Self {
        Self {
            backend: "memory".to_owned(),
            fallback: None,
            memory_url: None,
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
        f.debug_struct("PubSubConfig")
            .field("backend", &self.backend)
            .field("fallback", &self.fallback)
            .field("memory_url", &self.memory_url)
            .finish_non_exhaustive()
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

    /// Features of tg-pubsub that are not backends.
    const NON_BACKEND_FEATURES: &[&str] = &["default", "metrics-http"];

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
