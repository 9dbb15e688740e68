#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod consumer;
mod producer;
mod topic;

pub use backend::MemoryBackend;
pub use config::{MemoryConfig, Overflow};
