#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod dedup;
mod envelope;
#[cfg(feature = "http-exporter")]
mod exporter;
mod handler;
mod health;
pub mod metrics;
mod producer;
mod publisher;
mod request;
mod runner;
mod signal;
mod subscriber;

pub use dedup::Deduplicator;
pub use envelope::{rfc3339, Envelope};
#[cfg(feature = "http-exporter")]
pub use exporter::{serve_metrics, OPENMETRICS_CONTENT_TYPE};
pub use handler::{batch_handler, BatchHandler, Batched, Handler, HandlerError, HandlerErrorKind};
pub use health::{HealthStatus, Heartbeat};
pub use metrics::RuntimeMetrics;
pub use producer::{ProducerConfig, RetryingProducer};
pub use publisher::{Publisher, PublisherConfig};
pub use request::{reply_properties, RequestResponse, ResponseStream};
pub use runner::{
    ConsumerRunner, DeadLetter, KeyOrdering, RunReport, RunStats, RunnerConfig, RunnerHandle,
    DEAD_LETTER_SUFFIX, DLQ_ATTEMPTS_PROPERTY, DLQ_ERROR_PROPERTY, DLQ_MESSAGE_ID_PROPERTY,
    DLQ_REASON_PROPERTY, DLQ_SUBSCRIPTION_PROPERTY, DLQ_TOPIC_PROPERTY,
};
pub use signal::{cancel_on_signal, shutdown_signal};
pub use subscriber::{Recipient, Subscriber, SubscriberConfig, WhenFull};
pub use tg_backend_api::Backoff;
pub use tokio_util::sync::CancellationToken;
