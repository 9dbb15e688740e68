//! tg-pubsub: one typed publish/subscribe API over several brokers.
//!
//! Services are written once against [`Backend`] and moved between brokers by one setting,
//! `PUBSUB_BACKEND` (or `--pubsub-backend`). The in-memory backend is always compiled in and is the
//! default; each broker backend is a Cargo feature (`redis`, `postgres`, `mqtt`, …), and
//! [`drivers`] lists the compiled-in ones. The `cli` feature makes [`PubSubConfig`] a
//! `clap::Args` with every compiled-in backend's flags.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_pubsub::Result<()> {
//! use std::time::Duration;
//! use tg_pubsub::{trustgraph::TextCompletionRequest, BackendExt, ConsumerOptions, PubSubConfig};
//!
//! // From the environment and defaults (no flags): PUBSUB_BACKEND unset → memory.
//! let backend = tg_pubsub::connect(&PubSubConfig::default()).await?;
//! let topic = tg_pubsub::topic("text-completion-request")?;
//! let consumer = backend
//!     .typed_consumer::<TextCompletionRequest>(&topic, ConsumerOptions::new("llm"))
//!     .await?;
//! let producer = backend.typed_producer::<TextCompletionRequest>(&topic).await?;
//! producer
//!     .send(&TextCompletionRequest { prompt: "hello".into(), ..Default::default() })
//!     .await?;
//! let request = consumer.receive(Duration::from_secs(1)).await?;
//! assert_eq!(request.value().prompt, "hello");
//! consumer.acknowledge(&request).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;

pub use config::{connect, connect_backend, driver, drivers, PubSubConfig};

pub use tg_backend_api::{
    self as api, AckHandle, Backend, BackendExt, Bytes, Capabilities, Consumer, ConsumerOptions,
    ConsumerType, Error, ErrorKind, InitialPosition, Message as ReceivedMessage, MessageId,
    OutboundMessage, Producer, ProducerOptions, Properties, Result, SendReceipt, TypedConsumer,
    TypedMessage, TypedProducer, CORRELATION_ID_PROPERTY, DEDUP_ID_PROPERTY,
};
#[cfg(feature = "kafka")]
pub use tg_backend_kafka::{self as kafka, KafkaBackend, KafkaConfig};
pub use tg_backend_memory::{self as memory, MemoryBackend, MemoryConfig};
#[cfg(feature = "mqtt")]
pub use tg_backend_mqtt::{self as mqtt, MqttBackend, MqttConfig};
#[cfg(feature = "postgres")]
pub use tg_backend_postgres::{self as postgres, PostgresBackend, PostgresConfig};
#[cfg(feature = "pulsar")]
pub use tg_backend_pulsar::{self as pulsar, PulsarBackend, PulsarConfig};
#[cfg(feature = "rabbitmq")]
pub use tg_backend_rabbitmq::{self as rabbitmq, RabbitBackend, RabbitConfig};
#[cfg(feature = "redis")]
pub use tg_backend_redis::{self as redis, RedisBackend, RedisConfig};
pub use tg_runtime::{
    self as runtime, ConsumerRunner, HandlerError, Publisher, RequestResponse, RunnerConfig,
    Subscriber,
};
pub use tg_schema::{self as schema, message, trustgraph, Codec, JsonCodec, Message};
pub use tg_topic::{self as topics, topic, Qos, QueueClass, QueueId, Topic, TopicError};
