#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod consumer;
mod error;
mod producer;
mod topic;

pub use backend::PulsarBackend;
pub use config::PulsarConfig;
