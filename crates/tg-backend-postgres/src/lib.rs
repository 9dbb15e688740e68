#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod consumer;
mod error;
mod listener;
mod producer;
mod q0;
mod sql;
mod tls;
mod topic;

pub use backend::PostgresBackend;
pub use config::{PostgresConfig, SslMode};
pub use topic::channel_name;

use tg_backend_api::kit::{self, BackendConfig, Driver, Setting};

/// The PostgreSQL backend's driver: `PUBSUB_BACKEND=postgres`, configured by `DATABASE_URL` /
/// `--postgres-url`.
pub static DRIVER: Driver = Driver {
    name: "postgres",
    title: "PostgreSQL",
    schemes: &["postgres", "postgresql"],
    settings: &[Setting::new(
        "DATABASE_URL",
        "postgres-url",
        "PostgreSQL URL: postgres://[user[:password]@]host[:port]/database[?sslmode=…]",
    )
    .default_value(PostgresConfig::DEFAULT_URL)],
    options: Vec::new,
    secret_options: &[],
    configure: |settings| {
        let config = settings
            .parse_url(PostgresConfig::from_url)
            .unwrap_or_else(|| PostgresConfig::from_url(PostgresConfig::DEFAULT_URL))?;
        Ok(kit::configured(config))
    },
};

impl BackendConfig for PostgresConfig {
    type Backend = PostgresBackend;

    async fn connect(self) -> tg_backend_api::Result<PostgresBackend> {
        PostgresBackend::connect(self).await
    }
}
