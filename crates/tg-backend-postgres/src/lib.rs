#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod consumer;
mod core;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod listener;
mod producer;
mod properties;
mod q0;
mod sql;
#[doc(hidden)]
pub mod statements;
mod tls;
mod topic;

pub use backend::PostgresBackend;
pub use config::{PostgresConfig, SslMode};
pub use consumer::PostgresConsumer;
pub use producer::PostgresProducer;
pub use topic::channel_name;

use tg_backend_api::kit::{self, Driver, Setting};

/// The PostgreSQL backend's driver: `PUBSUB_BACKEND=postgres`, configured by `DATABASE_URL` /
/// `--postgres-url` (default `postgres://postgres@127.0.0.1:5432/test`).
pub static DRIVER: Driver = Driver {
    name: PostgresBackend::NAME,
    title: PostgresConfig::TITLE,
    schemes: &PostgresConfig::SCHEMES,
    settings: &[Setting::new(
        PostgresConfig::ENV_VAR,
        "postgres-url",
        "PostgreSQL URL: postgres://[user[:password]@]host[:port]/database[?sslmode=…&schema=…]",
    )
    .default_value(PostgresConfig::DEFAULT_URL)],
    options: kit::config::option_names::<PostgresConfig>,
    secret_options: &[],
    configure: |settings| {
        let config = settings
            .parse_url(PostgresConfig::from_url)
            .unwrap_or_else(|| PostgresConfig::from_url(PostgresConfig::DEFAULT_URL))?;
        Ok(kit::configured(config))
    },
};
