#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod consumer;
mod error;
mod producer;
mod pubsub;
mod scripts;
mod sync;
mod topic;

pub use backend::RedisBackend;
pub use config::RedisConfig;
