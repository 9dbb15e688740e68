#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod consumer;
mod error;
mod producer;
mod topic;

pub use backend::PulsarBackend;
pub use config::PulsarConfig;

use tg_backend_api::kit::{self, BackendConfig, Driver, Setting};

/// The Pulsar backend's driver: `PUBSUB_BACKEND=pulsar`, configured by `PULSAR_URL`, or the
/// Python framework's `PULSAR_HOST`, with `PULSAR_API_KEY` and `PULSAR_LISTENER`.
pub static DRIVER: Driver = Driver {
    name: "pulsar",
    title: "Pulsar",
    schemes: &["pulsar", "pulsar+ssl"],
    settings: &[
        Setting::new(
            "PULSAR_URL",
            "pulsar-url",
            "Pulsar broker URL: pulsar://host[:port], pulsar+ssl:// for TLS; wins over --pulsar-host",
        ),
        Setting::new(
            "PULSAR_HOST",
            "pulsar-host",
            "Pulsar broker, as the Python framework names it: pulsar://host:port",
        )
        .default_value(PulsarConfig::DEFAULT_URL),
        Setting::new("PULSAR_API_KEY", "pulsar-api-key", "Pulsar authentication token").secret(),
        Setting::new("PULSAR_LISTENER", "pulsar-listener", "Pulsar advertised listener name"),
    ],
    options: Vec::new,
    secret_options: &[],
    configure: |settings| {
        let config = PulsarConfig::from_lookup(|name| settings.get(name))?;
        Ok(kit::configured(config))
    },
};

impl BackendConfig for PulsarConfig {
    type Backend = PulsarBackend;

    async fn connect(self) -> tg_backend_api::Result<PulsarBackend> {
        PulsarBackend::connect(self).await
    }
}
