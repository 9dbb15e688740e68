#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod batch;
mod config;
mod consumer;
mod core;
mod dedup;
mod error;
mod message_id;
mod producer;
mod topic;

pub use backend::PulsarBackend;
pub use config::PulsarConfig;
pub use consumer::PulsarConsumer;
pub use producer::PulsarProducer;

use tg_backend_api::kit::{self, Driver, Setting};

/// The Pulsar backend's driver: `PUBSUB_BACKEND=pulsar`, configured by `PULSAR_URL`, or the
/// Python framework's `PULSAR_HOST`, with `PULSAR_API_KEY` and `PULSAR_LISTENER`.
pub static DRIVER: Driver = Driver {
    name: "pulsar",
    title: "Pulsar",
    schemes: &[PulsarConfig::SCHEME, PulsarConfig::TLS_SCHEME],
    settings: &[
        Setting::new(
            PulsarConfig::ENV_URL,
            "pulsar-url",
            "Pulsar broker URL: pulsar://host[:port], pulsar+ssl:// for TLS; wins over --pulsar-host",
        ),
        Setting::new(
            PulsarConfig::ENV_HOST,
            "pulsar-host",
            "Pulsar broker, as the Python framework names it: pulsar://host:port",
        )
        .default_value(PulsarConfig::DEFAULT_URL),
        Setting::new(
            PulsarConfig::ENV_TOKEN,
            "pulsar-api-key",
            "Pulsar authentication token",
        )
        .secret(),
        Setting::new(
            PulsarConfig::ENV_LISTENER,
            "pulsar-listener",
            "Pulsar advertised listener name",
        ),
    ],
    options: kit::config::option_names::<PulsarConfig>,
    secret_options: &[],
    configure: |settings| Ok(kit::configured(PulsarConfig::from_settings(settings)?)),
};
