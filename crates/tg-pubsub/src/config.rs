//! Choosing and building a backend from flags and environment variables.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use tg_backend_api::kit::config::{redact_url_options, Secret};
use tg_backend_api::kit::{Driver, Setting};
use tg_backend_api::{Backend, Error, ErrorKind, Result};

/// The backends compiled into this build, memory first. Each broker backend is a Cargo feature of
/// this crate, named like the backend.
pub fn drivers() -> &'static [&'static Driver] {
    DRIVERS
}

static DRIVERS: &[&Driver] = &[
    &tg_backend_memory::DRIVER,
    #[cfg(feature = "redis")]
    &tg_backend_redis::DRIVER,
    #[cfg(feature = "postgres")]
    &tg_backend_postgres::DRIVER,
    #[cfg(feature = "mqtt")]
    &tg_backend_mqtt::DRIVER,
    #[cfg(feature = "pulsar")]
    &tg_backend_pulsar::DRIVER,
    #[cfg(feature = "rabbitmq")]
    &tg_backend_rabbitmq::DRIVER,
    #[cfg(feature = "kafka")]
    &tg_backend_kafka::DRIVER,
];

/// The compiled-in driver called `name` (as `PUBSUB_BACKEND` spells it, any case), or an error
/// that lists the compiled-in ones.
pub fn driver(name: &str) -> Result<&'static Driver> {
    let wanted = name.trim().to_ascii_lowercase();
    drivers()
        .iter()
        .copied()
        .find(|d| d.name == wanted)
        .ok_or_else(|| {
            Error::config(format!(
                "unknown backend {name:?} (PUBSUB_BACKEND / --pubsub-backend); compiled in: {}. \
                 The other broker backends are Cargo features of tg-pubsub, named like the backend",
                drivers()
                    .iter()
                    .map(|d| d.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// The setting choosing the backend.
const BACKEND: Setting = Setting::new(
    "PUBSUB_BACKEND",
    "pubsub-backend",
    "Backend to use (memory and the compiled-in brokers)",
)
.default_value("memory");

/// The setting naming a fallback backend.
const FALLBACK: Setting = Setting::new(
    "PUBSUB_FALLBACK",
    "pubsub-fallback",
    "Backend to use instead when the chosen one cannot be reached at start-up (a warning names the reason)",
);

/// Which backend to build and how to reach it: `PUBSUB_BACKEND` / `--pubsub-backend`, and each
/// compiled-in backend's own settings (`REDIS_URL` / `--redis-url`, …; see each driver's
/// [`Driver::settings`]). A flag wins over its environment variable, which wins over the
/// setting's default.
///
/// With the `cli` feature it is a [`clap::Args`]: `#[command(flatten)]` it into a service's
/// arguments. `Debug` never shows passwords or tokens.
///
/// ```
/// use tg_pubsub::PubSubConfig;
/// let config = PubSubConfig::new().backend("memory").set("MEMORY_URL", "memory://?capacity=10");
/// assert_eq!(config.get("MEMORY_URL"), Some("memory://?capacity=10"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct PubSubConfig {
    backend: String,
    fallback: Option<String>,
    /// Values given for the drivers' settings, by environment name.
    values: BTreeMap<&'static str, String>,
}

impl Default for PubSubConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PubSubConfig {
    /// The in-memory backend with default settings.
    pub fn new() -> Self {
        Self {
            backend: BACKEND.default.unwrap_or("memory").to_owned(),
            fallback: None,
            values: BTreeMap::new(),
        }
    }

    /// The configuration the environment variables give.
    pub fn from_env() -> Result<Self> {
        Ok(Self::from_lookup(|name| std::env::var(name).ok()))
    }

    /// The configuration `lookup` gives (environment variable name → value).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let mut config = Self::new();
        let given = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(backend) = given(BACKEND.env) {
            config.backend = backend;
        }
        config.fallback = given(FALLBACK.env);
        for setting in all_settings() {
            if let Some(value) = given(setting.env) {
                config.values.insert(setting.env, value);
            }
        }
        config
    }

    /// Chooses the backend.
    #[must_use]
    pub fn backend(mut self, name: impl Into<String>) -> Self {
        self.backend = name.into();
        self
    }

    /// Chooses the fallback backend.
    #[must_use]
    pub fn fallback(mut self, name: impl Into<String>) -> Self {
        self.fallback = Some(name.into());
        self
    }

    /// Sets a backend setting by its environment name (`REDIS_URL`). Names no compiled-in
    /// backend knows are kept but never read.
    #[must_use]
    pub fn set(mut self, env: &str, value: impl Into<String>) -> Self {
        match all_settings().find(|s| s.env == env) {
            Some(setting) => {
                self.values.insert(setting.env, value.into());
            }
            None => tracing::warn!(setting = env, "no compiled-in backend reads this setting"),
        }
        self
    }

    /// The chosen backend's name.
    pub fn backend_name(&self) -> &str {
        &self.backend
    }

    /// The fallback backend's name, if one is set.
    pub fn fallback_name(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// The value given for a setting (without its default).
    pub fn get(&self, env: &str) -> Option<&str> {
        self.values.get(env).map(String::as_str)
    }

    fn lookup(&self) -> impl Fn(&str) -> Option<String> + Sync + '_ {
        move |name: &str| self.values.get(name).cloned()
    }

    /// Checks what can be checked without connecting: the backend and fallback names, and that
    /// their settings read.
    pub fn check(&self) -> Result<()> {
        for name in std::iter::once(self.backend.as_str()).chain(self.fallback.as_deref()) {
            let driver = driver(name)?;
            (driver.configure)(&tg_backend_api::kit::Settings::new(driver, &self.lookup()))?;
        }
        Ok(())
    }
}

fn all_settings() -> impl Iterator<Item = &'static Setting> {
    drivers().iter().flat_map(|d| d.settings.iter())
}

impl fmt::Debug for PubSubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("PubSubConfig");
        d.field("backend", &self.backend)
            .field("fallback", &self.fallback);
        let shown: BTreeMap<&str, String> = drivers()
            .iter()
            .flat_map(|driver| driver.settings.iter().map(move |s| (driver, s)))
            .filter_map(|(driver, s)| {
                let value = self.values.get(s.env)?;
                let shown = if s.secret {
                    Secret::REDACTED.to_owned()
                } else if value.contains("://") {
                    redact_url_options(value, driver.secret_options)
                } else {
                    value.clone()
                };
                Some((s.env, shown))
            })
            .collect();
        d.field("settings", &shown).finish()
    }
}

/// Builds backend `name` from `config`.
pub async fn connect_backend(name: &str, config: &PubSubConfig) -> Result<Arc<dyn Backend>> {
    driver(name)?.connect(&config.lookup()).await
}

/// Builds the configured backend; if it cannot be reached and a fallback is configured, builds the
/// fallback and logs a warning that names the reason. Both names are checked first, so a fallback
/// that does not exist fails at once rather than when it is needed.
pub async fn connect(config: &PubSubConfig) -> Result<Arc<dyn Backend>> {
    let name = config.backend.trim();
    driver(name)?;
    if let Some(fallback) = &config.fallback {
        driver(fallback).map_err(|e| {
            let message = format!("fallback: {}", e.message()).replace(
                "(PUBSUB_BACKEND / --pubsub-backend)",
                "(PUBSUB_FALLBACK / --pubsub-fallback)",
            );
            e.with_message(message)
        })?;
    }
    match connect_backend(name, config).await {
        Ok(backend) => Ok(backend),
        Err(err) if err.kind() == ErrorKind::Connection || err.kind() == ErrorKind::Timeout => {
            let Some(fallback) = &config.fallback else {
                return Err(err);
            };
            tracing::warn!(
                backend = %name,
                fallback = %fallback,
                reason = %err,
                "pub/sub backend unreachable at start-up; using the configured fallback"
            );
            connect_backend(fallback, config).await.map_err(|e| {
                let message = format!(
                    "{name} unreachable ({}) and fallback {fallback} failed too: {}",
                    err.message(),
                    e.message()
                );
                e.with_message(message)
            })
        }
        Err(err) => Err(err),
    }
}

#[cfg(feature = "cli")]
mod cli {
    use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};

    use super::*;

    fn arg(setting: &'static Setting) -> Arg {
        let help = match setting.default {
            Some(default) if !setting.secret => format!("{} [default: {default}]", setting.help),
            _ => setting.help.to_owned(),
        };
        Arg::new(setting.env)
            .long(setting.flag)
            .env(setting.env)
            .value_name(if setting.flag.ends_with("url") {
                "URL"
            } else {
                "VALUE"
            })
            .hide_env_values(setting.secret)
            .help(help)
    }

    impl Args for PubSubConfig {
        fn augment_args(cmd: Command) -> Command {
            let mut cmd = cmd
                .arg(arg(&BACKEND).help(format!(
                    "Backend to use: {} [default: memory]",
                    drivers().iter().map(|d| d.name).collect::<Vec<_>>().join(", ")
                )))
                .arg(arg(&FALLBACK));
            for setting in all_settings() {
                cmd = cmd.arg(arg(setting));
            }
            cmd
        }

        fn augment_args_for_update(cmd: Command) -> Command {
            Self::augment_args(cmd)
        }
    }

    impl FromArgMatches for PubSubConfig {
        fn from_arg_matches(matches: &ArgMatches) -> std::result::Result<Self, clap::Error> {
            Ok(Self::from_lookup(|name| {
                matches.get_one::<String>(name).cloned()
            }))
        }

        fn update_from_arg_matches(
            &mut self,
            matches: &ArgMatches,
        ) -> std::result::Result<(), clap::Error> {
            *self = Self::from_arg_matches(matches)?;
            Ok(())
        }
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
        let config = PubSubConfig::new().backend("nosuch");
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(
            err.message().contains("unknown backend \"nosuch\""),
            "{err}"
        );
        assert!(err.message().contains("compiled in: memory"), "{err}");
        assert!(err.message().contains("Cargo features"), "{err}");
    }

    #[tokio::test]
    async fn unknown_fallback_fails_even_when_unused() {
        let config = PubSubConfig::new().fallback("nosuch");
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(
            err.message()
                .starts_with("fallback: unknown backend \"nosuch\" (PUBSUB_FALLBACK"),
            "{err}"
        );
        assert!(config.check().is_err());
    }

    #[tokio::test]
    async fn malformed_memory_url_names_the_variable_once() {
        let config = PubSubConfig::new().set("MEMORY_URL", "memory://?capacity=x");
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(
            err.message()
                .starts_with("MEMORY_URL / --memory-url: memory URL option capacity=\"x\""),
            "{err}"
        );
        assert_eq!(
            err.context_value("variable"),
            Some("MEMORY_URL / --memory-url")
        );
        let shown = err.to_string();
        assert_eq!(shown.matches("capacity").count(), 1, "said once: {shown}");
        assert!(config.check().is_err());
    }

    #[test]
    fn lookup_reads_the_settings_of_compiled_in_drivers() {
        let config = PubSubConfig::from_lookup(|name| match name {
            "PUBSUB_BACKEND" => Some("memory".into()),
            "MEMORY_URL" => Some("memory://?capacity=3".into()),
            "NOT_A_SETTING" => Some("x".into()),
            _ => None,
        });
        assert_eq!(config.backend_name(), "memory");
        assert_eq!(config.get("MEMORY_URL"), Some("memory://?capacity=3"));
        assert_eq!(config.get("NOT_A_SETTING"), None);
    }

    #[test]
    fn every_driver_has_its_settings_and_a_unique_name() {
        let mut names = std::collections::HashSet::new();
        let mut envs = std::collections::HashSet::new();
        for driver in drivers() {
            assert!(names.insert(driver.name), "{} twice", driver.name);
            assert!(
                !driver.settings.is_empty(),
                "{} has no URL setting",
                driver.name
            );
            assert!(!driver.schemes.is_empty(), "{} has no scheme", driver.name);
            for s in driver.settings {
                assert!(envs.insert(s.env), "{} declared twice", s.env);
            }
        }
        assert_eq!(drivers()[0].name, "memory");
    }

    #[cfg(feature = "mqtt")]
    #[tokio::test]
    async fn mqtt_settings_name_their_variables_and_hide_the_password() {
        let config = PubSubConfig::new()
            .backend("mqtt")
            .set("MQTT_PORT", "eighteen");
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(
            err.message().starts_with("MQTT_PORT / --mqtt-port:"),
            "{err}"
        );
        let config = PubSubConfig::new()
            .set("MQTT_URL", "mqtt://user:s3cret@127.0.0.1:1883")
            .set("MQTT_PASSWORD", "hunter2");
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn redis_url_errors_name_the_variable_and_debug_hides_the_password() {
        let config = PubSubConfig::new()
            .backend("redis")
            .set("REDIS_URL", "http://nope");
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(
            err.message().starts_with("REDIS_URL / --redis-url:"),
            "{err}"
        );
        let config = PubSubConfig::new().set("REDIS_URL", "redis://:s3cret@127.0.0.1:6379/0");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn unreachable_backend_falls_back_only_when_configured() {
        // nothing listens on port 1: connecting fails at once with a Connection error
        let config = PubSubConfig::new()
            .backend("redis")
            .set("REDIS_URL", "redis://127.0.0.1:1");
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
        let backend = connect(&config.fallback("memory")).await.unwrap();
        assert_eq!(backend.name(), "memory");
    }

    #[cfg(feature = "pulsar")]
    #[tokio::test]
    async fn pulsar_errors_name_the_variable_and_debug_hides_the_token() {
        let config = PubSubConfig::new()
            .backend("pulsar")
            .set("PULSAR_URL", "http://nope");
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
        assert!(err.message().contains("PULSAR_URL"), "{err}");
        let config = PubSubConfig::new().set("PULSAR_API_KEY", "t0ken-s3cret");
        let shown = format!("{config:?}");
        assert!(!shown.contains("t0ken-s3cret"), "{shown}");
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_url_errors_name_the_variable_and_debug_hides_the_password() {
        let config = PubSubConfig::new()
            .backend("postgres")
            .set("DATABASE_URL", "mysql://x");
        let err = connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(
            err.message().starts_with("DATABASE_URL / --postgres-url:"),
            "{err}"
        );
        let config = PubSubConfig::new().set("DATABASE_URL", "postgres://u:s3cret@h/db");
        assert!(!format!("{config:?}").contains("s3cret"));
    }
}
