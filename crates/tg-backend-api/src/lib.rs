#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod backoff;
mod capabilities;
mod error;
pub mod kit;
mod message;
mod options;
mod registry;
mod stream;
mod typed;

pub use backend::{check_batch_max, receive_timeout, Backend, Consumer, Producer, SendReceipt};
pub use backoff::Backoff;
pub use bytes::Bytes;
pub use capabilities::Capabilities;
pub use error::{Error, ErrorKind, Result};
pub use message::{
    next_consumer_id, AckHandle, Message, MessageId, OutboundMessage, Properties,
    CORRELATION_ID_PROPERTY, DEDUP_ID_PROPERTY,
};
pub use options::{ConsumerOptions, ConsumerType, InitialPosition, ProducerOptions};
pub use registry::HandleRegistry;
pub use stream::ConsumerStreams;
pub use tg_topic::{topic, Qos, QueueClass, QueueId, QueueIdError, Topic, TopicError};
pub use typed::{BackendExt, TypedConsumer, TypedMessage, TypedProducer};
