#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod consumer;
mod error;
mod listener;
mod producer;
mod q0;
mod sql;
mod tls;
mod topic;

pub use backend::PostgresBackend;
pub use config::{PostgresConfig, SslMode};
pub use topic::channel_name;
