#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod broker;
mod config;
mod consumer;
mod core;
mod producer;

pub use backend::MemoryBackend;
pub use config::{MemoryConfig, Overflow};
pub use consumer::MemoryConsumer;
pub use producer::MemoryProducer;

use tg_backend_api::kit::{self, Driver, Setting};

/// The in-memory backend's driver: `PUBSUB_BACKEND=memory`, configured by `MEMORY_URL` /
/// `--memory-url` (default `memory://`).
pub static DRIVER: Driver = Driver {
    name: "memory",
    title: "memory",
    schemes: &["memory"],
    settings: &[Setting::new(
        "MEMORY_URL",
        "memory-url",
        "In-memory broker settings, e.g. memory://?capacity=100000&overflow=block",
    )
    .default_value("memory://")],
    options: kit::config::option_names::<MemoryConfig>,
    secret_options: &[],
    configure: |settings| {
        let config = settings
            .parse_url(MemoryConfig::from_url)
            .unwrap_or_else(|| Ok(MemoryConfig::default()))?;
        Ok(kit::configured(config))
    },
};
