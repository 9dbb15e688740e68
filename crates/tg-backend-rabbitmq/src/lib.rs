#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acks;
mod backend;
mod config;
mod connection;
mod consumer;
mod core;
mod declare;
mod dedup;
mod error;
mod producer;
mod topic;

pub use backend::RabbitBackend;
pub use config::{QueueType, RabbitConfig, RabbitOptions};
pub use consumer::RabbitConsumer;
pub use producer::RabbitProducer;

use tg_backend_api::kit::{self, Driver, Setting};

/// The RabbitMQ backend's driver: `PUBSUB_BACKEND=rabbitmq`, configured by `RABBITMQ_URL`, or by
/// the Python framework's `RABBITMQ_HOST`, `RABBITMQ_PORT`, `RABBITMQ_USERNAME`,
/// `RABBITMQ_PASSWORD` and `RABBITMQ_VHOST` (and their `--rabbitmq-…` flags).
pub static DRIVER: Driver = Driver {
    name: "rabbitmq",
    title: "RabbitMQ",
    schemes: &["amqp", "amqps"],
    settings: &[
        Setting::new(
            "RABBITMQ_URL",
            "rabbitmq-url",
            "RabbitMQ URL: amqp://[user:password@]host[:port][/vhost][?option=…], amqps:// for TLS; wins over host, port, credentials and vhost",
        ),
        Setting::new("RABBITMQ_HOST", "rabbitmq-host", "RabbitMQ host").default_value("localhost"),
        Setting::new("RABBITMQ_PORT", "rabbitmq-port", "RabbitMQ port").default_value("5672"),
        Setting::new("RABBITMQ_USERNAME", "rabbitmq-username", "RabbitMQ user name")
            .default_value("guest"),
        Setting::new("RABBITMQ_PASSWORD", "rabbitmq-password", "RabbitMQ password")
            .default_value("guest")
            .secret(),
        Setting::new("RABBITMQ_VHOST", "rabbitmq-vhost", "RabbitMQ virtual host")
            .default_value("/"),
    ],
    options: kit::config::option_names::<RabbitOptions>,
    secret_options: &[],
    configure: |settings| Ok(kit::configured(RabbitConfig::from_settings(settings)?)),
};
