#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// Lets the `#[message]` expansion (which names `::tg_schema`) work inside this crate too.
extern crate self as tg_schema;

pub mod base64_bytes;
mod codec;
mod message;
pub mod trustgraph;

pub use codec::{Codec, CodecError, Direction, JsonCodec};
pub use message::Message;
pub use tg_schema_derive::message;

/// Implementation details used by the code `#[message]` and [`impl_message!`] generate.
/// Not part of the public API; may change without notice.
#[doc(hidden)]
pub mod __private {
    pub use serde;

    use serde::{Deserialize, Deserializer};

    /// `deserialize_with` helper: JSON `null` (and anything else the format reports as "none")
    /// reads as `T::default()`; any other value is read as a `T`.
    #[inline]
    pub fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Default,
    {
        Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
    }
}
