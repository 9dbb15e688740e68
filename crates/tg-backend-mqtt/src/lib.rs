#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod connection;
mod consumer;
mod producer;
mod topic;

pub use backend::MqttBackend;
pub use config::MqttConfig;

/// User property holding how often a message was delivered before (set by `negative_acknowledge`
/// and by `close` when they hand a message back to its subscription).
pub const REDELIVERY_PROPERTY: &str = consumer::REDELIVERY_PROPERTY;

/// User property carrying the message key ([`tg_backend_api::OutboundMessage::key`]).
pub const KEY_PROPERTY: &str = consumer::KEY_PROPERTY;

/// Suffix of the [`MessageId`](tg_backend_api::MessageId) a send receipt resolves to when the
/// broker answered the QoS 1/2 publish with "no matching subscribers" (reason code 0x10): it
/// accepted the message but no subscription took it. Otherwise receipts resolve to a number.
pub const NO_SUBSCRIBERS_SUFFIX: &str = "-nosub";
