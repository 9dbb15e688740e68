#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod consumer;
mod core;
mod dedup;
mod delivery;
mod error;
mod member;
mod offsets;
mod producer;
mod topic;

pub use backend::KafkaBackend;
pub use config::{KafkaConfig, KafkaOptions, Sasl, SecurityProtocol};
pub use consumer::KafkaConsumer;
pub use producer::KafkaProducer;

use tg_backend_api::kit::{self, Driver, Setting};

/// The Kafka backend's driver: `PUBSUB_BACKEND=kafka`, configured by `KAFKA_URL` /
/// `--kafka-url`, or as the Python framework configures Kafka, by `KAFKA_BOOTSTRAP_SERVERS`,
/// `KAFKA_SECURITY_PROTOCOL` and `KAFKA_SASL_MECHANISM` / `_USERNAME` / `_PASSWORD`.
pub static DRIVER: Driver = Driver {
    name: KafkaBackend::NAME,
    title: config::TITLE,
    schemes: config::SCHEMES,
    settings: &[
        Setting::new(
            KafkaConfig::ENV_URL,
            "kafka-url",
            "Kafka brokers: kafka://host:port[,host:port…][?option=value…], kafka+ssl:// for TLS, \
             kafka://user:password@host for SASL; wins over --kafka-bootstrap-servers",
        ),
        Setting::new(
            KafkaConfig::ENV_BOOTSTRAP,
            "kafka-bootstrap-servers",
            "Kafka brokers as the Python framework names them: host:port,host:port",
        )
        .default_value(KafkaConfig::DEFAULT_BOOTSTRAP),
        Setting::new(
            KafkaConfig::ENV_SECURITY_PROTOCOL,
            "kafka-security-protocol",
            "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (default: from the URL)",
        ),
        Setting::new(
            KafkaConfig::ENV_SASL_MECHANISM,
            "kafka-sasl-mechanism",
            "PLAIN (default), SCRAM-SHA-256 or SCRAM-SHA-512",
        ),
        Setting::new(
            KafkaConfig::ENV_SASL_USERNAME,
            "kafka-sasl-username",
            "Kafka SASL user name",
        ),
        Setting::new(
            KafkaConfig::ENV_SASL_PASSWORD,
            "kafka-sasl-password",
            "Kafka SASL password",
        )
        .secret(),
    ],
    options: kit::config::option_names::<KafkaOptions>,
    secret_options: &[],
    configure: |settings| Ok(kit::configured(KafkaConfig::from_settings(settings)?)),
};
