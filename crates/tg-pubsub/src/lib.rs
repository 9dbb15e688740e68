#![doc = include_str!("../README.md")]
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
