//! Drivers: how the facade, the CLI, xtask and the conformance suite find a backend by name, read
//! its settings and connect it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::{Backend, Error, Result};

/// One backend as everything above the backend crates sees it. Each backend crate exports one
/// `DRIVER`; the facade lists the compiled-in ones, and nothing else keeps a list of backends.
///
/// ```
/// use tg_backend_api::kit::{Driver, Settings};
///
/// fn describe(driver: &'static Driver) -> String {
///     let url = driver.url_setting();
///     format!("{} ({}): {} / --{}", driver.name, driver.schemes.join(", "), url.env, url.flag)
/// }
/// # let _ = describe;
/// ```
#[derive(Debug)]
pub struct Driver {
    /// The name `PUBSUB_BACKEND` spells it with (`memory`, `redis`, …).
    pub name: &'static str,
    /// The broker's name in messages and docs (`Redis`, `PostgreSQL`, …).
    pub title: &'static str,
    /// The URL schemes the backend reads (`redis`, `rediss`).
    pub schemes: &'static [&'static str],
    /// The settings read from flags and environment variables; the first is the backend's URL.
    pub settings: &'static [Setting],
    /// The names of the URL query options the backend knows (from its options struct).
    pub options: fn() -> Vec<&'static str>,
    /// Query options whose values are secrets (hidden like passwords).
    pub secret_options: &'static [&'static str],
    /// Reads the settings into the backend's configuration, without connecting.
    pub configure: fn(&Settings<'_>) -> Result<Box<dyn Configured>>,
}

impl Driver {
    /// The setting holding the backend's URL.
    pub fn url_setting(&self) -> &'static Setting {
        &self.settings[0]
    }

    /// Configures the backend from `lookup` (setting environment name → value) and connects it.
    pub async fn connect(
        &'static self,
        lookup: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<Arc<dyn Backend>> {
        let configured = (self.configure)(&Settings::new(self, lookup))?;
        configured.connect().await
    }
}

/// A setting of a backend: an environment variable and the command-line flag that overrides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The environment variable (`REDIS_URL`).
    pub env: &'static str,
    /// The flag, without the leading `--` (`redis-url`).
    pub flag: &'static str,
    /// The value when neither is given.
    pub default: Option<&'static str>,
    /// Whether the value is a secret: never printed, and hidden in `--help`'s environment values.
    pub secret: bool,
    /// One line of help.
    pub help: &'static str,
}

impl Setting {
    /// A setting without default that is not secret.
    pub const fn new(env: &'static str, flag: &'static str, help: &'static str) -> Self {
        Self {
            env,
            flag,
            default: None,
            secret: false,
            help,
        }
    }

    /// With a default value.
    #[must_use]
    pub const fn default_value(mut self, value: &'static str) -> Self {
        self.default = Some(value);
        self
    }

    /// Marked as secret.
    #[must_use]
    pub const fn secret(mut self) -> Self {
        self.secret = true;
        self
    }

    /// How errors name the setting: `REDIS_URL / --redis-url`.
    pub fn label(&self) -> String {
        format!("{} / --{}", self.env, self.flag)
    }
}

/// The values of one driver's settings, as a backend's `configure` reads them.
pub struct Settings<'a> {
    driver: &'static Driver,
    lookup: &'a (dyn Fn(&str) -> Option<String> + Sync),
}

impl<'a> Settings<'a> {
    /// The settings of `driver`, looked up by environment name in `lookup` (which returns values
    /// given explicitly, by flag or environment; defaults come from the [`Setting`]s).
    pub fn new(
        driver: &'static Driver,
        lookup: &'a (dyn Fn(&str) -> Option<String> + Sync),
    ) -> Self {
        Self { driver, lookup }
    }

    /// The driver.
    pub fn driver(&self) -> &'static Driver {
        self.driver
    }

    fn setting(&self, env: &str) -> &'static Setting {
        self.driver
            .settings
            .iter()
            .find(|s| s.env == env)
            .unwrap_or_else(|| panic!("{env} is not a setting of the {} driver", self.driver.name))
    }

    /// The value given for setting `env`, if any (no default).
    pub fn given(&self, env: &str) -> Option<String> {
        let setting = self.setting(env);
        (self.lookup)(setting.env).filter(|v| !v.is_empty())
    }

    /// The value of setting `env`: the one given, else its default.
    pub fn get(&self, env: &str) -> Option<String> {
        self.given(env)
            .or_else(|| self.setting(env).default.map(str::to_owned))
    }

    /// `err` about the value of setting `env`, prefixed with the setting's name (`REDIS_URL /
    /// --redis-url: …`) and carrying it as the `variable` context.
    pub fn named(&self, env: &str, err: Error) -> Error {
        let label = self.setting(env).label();
        let message = format!("{label}: {}", err.message());
        err.with_message(message).with_context("variable", label)
    }

    /// Parses the URL setting (the driver's first) with `parse`, naming the setting in errors;
    /// `None` when it has neither a value nor a default.
    pub fn parse_url<C>(&self, parse: impl FnOnce(&str) -> Result<C>) -> Option<Result<C>> {
        let env = self.driver.url_setting().env;
        self.get(env)
            .map(|url| parse(&url).map_err(|e| self.named(env, e)))
    }
}

impl fmt::Debug for Settings<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_map();
        for s in self.driver.settings {
            if let Some(v) = self.given(s.env) {
                if s.secret {
                    d.entry(&s.env, &super::config::Secret::REDACTED);
                } else {
                    d.entry(
                        &s.env,
                        &super::config::redact_url_options(&v, self.driver.secret_options),
                    );
                }
            }
        }
        d.finish()
    }
}

/// A backend's configuration that knows how to connect: implemented by each backend's config
/// type, so a driver's `configure` returns it as a [`Configured`].
pub trait BackendConfig: fmt::Debug + Send + Sync + Sized + 'static {
    /// The backend it connects.
    type Backend: Backend + 'static;

    /// Connects the backend.
    fn connect(self) -> impl Future<Output = Result<Self::Backend>> + Send;
}

/// A configuration ready to connect, whatever the backend (see [`BackendConfig`]). `Debug` shows
/// it without secrets.
pub trait Configured: fmt::Debug + Send + Sync {
    /// Connects the backend.
    fn connect(self: Box<Self>) -> BoxFuture<'static, Result<Arc<dyn Backend>>>;
}

impl<C: BackendConfig> Configured for C {
    fn connect(self: Box<Self>) -> BoxFuture<'static, Result<Arc<dyn Backend>>> {
        Box::pin(
            async move { Ok(Arc::new(BackendConfig::connect(*self).await?) as Arc<dyn Backend>) },
        )
    }
}

/// `Box`es a configuration for a driver's `configure`.
pub fn configured<C: BackendConfig>(config: C) -> Box<dyn Configured> {
    Box::new(config)
}
