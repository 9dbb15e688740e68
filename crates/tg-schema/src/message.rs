//! The [`Message`] marker trait and its implementations for untyped payloads.

use serde::{de::DeserializeOwned, Serialize};

/// Marker for message types: serde both ways, thread-safe and `'static`.
///
/// Implemented by [`#[message]`](crate::message) for the struct it is placed on, by
/// [`impl_message!`](crate::impl_message) for types declared with plain serde derives, and here for
/// [`serde_json::Value`] (`NAME` `"json"`) and [`String`] (`NAME` `"string"`) so that untyped
/// topics work too.
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The message type's name, used in logs, metrics and errors (the Rust type name for
    /// `#[message]` types unless `#[message(name = "...")]` says otherwise).
    const NAME: &'static str;
}

impl Message for serde_json::Value {
    const NAME: &'static str = "json";
}

impl Message for String {
    const NAME: &'static str = "string";
}

/// Implements [`Message`] for types that already implement `Serialize` and `DeserializeOwned`
/// (declared with plain serde derives rather than [`#[message]`](crate::message)).
///
/// `impl_message!(Type)` uses the type's name as [`Message::NAME`];
/// `impl_message!(Type, "name")` sets it. Several types may be listed: `impl_message!(A, B)`.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tg_schema::{impl_message, Message};
///
/// #[derive(Serialize, Deserialize)]
/// struct Ping {
///     seq: u64,
/// }
/// #[derive(Serialize, Deserialize)]
/// struct Pong {
///     seq: u64,
/// }
/// impl_message!(Ping, Pong);
///
/// #[derive(Serialize, Deserialize)]
/// struct Heartbeat {}
/// impl_message!(Heartbeat, "heartbeat");
///
/// assert_eq!(Ping::NAME, "Ping");
/// assert_eq!(Heartbeat::NAME, "heartbeat");
/// ```
///
/// Unlike `#[message]`, this adds no serde attributes: `None` handling and leniency are whatever
/// the type's own serde attributes say.
#[macro_export]
macro_rules! impl_message {
    ($ty:ty, $name:literal $(,)?) => {
        impl $crate::Message for $ty {
            const NAME: &'static str = $name;
        }
    };
    ($($ty:ident),+ $(,)?) => {
        $(
            impl $crate::Message for $ty {
                const NAME: &'static str = ::core::stringify!($ty);
            }
        )+
    };
}
