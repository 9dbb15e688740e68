#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acks;
mod backend;
mod completion;
mod config;
mod consumer;
mod core;
mod entry;
mod error;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod inbox;
mod lease;
mod producer;
mod q0;
mod record;
mod scripts;
mod shared;
mod topic;

pub use backend::RedisBackend;
pub use config::RedisConfig;
pub use consumer::RedisConsumer;
pub use producer::RedisProducer;

use tg_backend_api::kit::{self, Driver, Setting};

/// The Redis backend's driver: `PUBSUB_BACKEND=redis`, configured by `REDIS_URL` /
/// `--redis-url` (default `redis://127.0.0.1:6379`).
pub static DRIVER: Driver = Driver {
    name: RedisBackend::NAME,
    title: config::TITLE,
    schemes: config::SCHEMES,
    settings: &[Setting::new(
        "REDIS_URL",
        "redis-url",
        "Redis URL: redis://[user[:password]@]host[:port][/db][?option=value&…], rediss:// for TLS",
    )
    .default_value(RedisConfig::DEFAULT_URL)],
    options: kit::config::option_names::<RedisConfig>,
    secret_options: &[],
    configure: |settings| {
        let config = settings
            .parse_url(RedisConfig::from_url)
            .unwrap_or_else(|| Ok(RedisConfig::default()))?;
        Ok(kit::configured(config))
    },
};
