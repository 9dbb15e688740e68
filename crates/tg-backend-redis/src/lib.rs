#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod consumer;
mod error;
mod producer;
mod pubsub;
mod scripts;
mod sync;
mod topic;

pub use backend::RedisBackend;
pub use config::RedisConfig;

use tg_backend_api::kit::{self, BackendConfig, Driver, Setting};

/// The Redis backend's driver: `PUBSUB_BACKEND=redis`, configured by `REDIS_URL` / `--redis-url`.
pub static DRIVER: Driver = Driver {
    name: "redis",
    title: "Redis",
    schemes: &["redis", "rediss"],
    settings: &[Setting::new(
        "REDIS_URL",
        "redis-url",
        "Redis URL: redis://[user[:password]@]host[:port][/db], rediss:// for TLS",
    )
    .default_value(RedisConfig::DEFAULT_URL)],
    options: Vec::new,
    secret_options: &[],
    configure: |settings| {
        let config = settings
            .parse_url(RedisConfig::from_url)
            .unwrap_or_else(|| RedisConfig::from_url(RedisConfig::DEFAULT_URL))?;
        Ok(kit::configured(config))
    },
};

impl BackendConfig for RedisConfig {
    type Backend = RedisBackend;

    async fn connect(self) -> tg_backend_api::Result<RedisBackend> {
        RedisBackend::connect(self).await
    }
}
