//! The implementer's kit: what every backend crate is built on, kept apart from the API that
//! applications use (as OpenDAL keeps `raw` apart from its operators).
//!
//! A backend crate has the same files as every other one: `lib.rs` (exports and one
//! [`Driver`] named `DRIVER`), `config.rs` (its options struct, read through the one URL grammar of
//! [`config`]), `core.rs` (shared state, holding a [`Lifecycle`]; it imports no producer or
//! consumer module), `backend.rs` ([`RawBackend`]), `producer.rs` ([`RawProducer`]), `consumer.rs`
//! ([`RawConsumer`]), `topic.rs` (the mapping of topic names, nothing else) and `error.rs` (the
//! client crate's errors into [`Error`](crate::Error)), plus files for named concepts of its own.
//!
//! Every type implementing [`RawBackend`] is a [`Backend`](crate::Backend): the kit checks
//! options, capabilities, payload limits and closed state once, for every backend, and closes
//! producers and consumers on drop and with their backend.

pub mod config;
mod driver;
mod lifecycle;
mod properties;
mod raw;

pub use driver::{configured, BackendConfig, Configured, Driver, Setting, Settings};
pub use lifecycle::Lifecycle;
pub use properties::{properties_from_pairs, properties_from_pairs_logged, warn_repeated};
pub use raw::{Feature, RawBackend, RawConsumer, RawProducer};
