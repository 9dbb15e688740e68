//! Byte fields as base64 strings: `#[serde(with = "tg_schema::base64_bytes")]`.
//!
//! JSON has no byte type; TrustGraph carries bytes (documents, images) as base64 strings. This
//! serde-with module writes a `Vec<u8>`, `bytes::Bytes`, `Box<[u8]>` (anything `AsRef<[u8]>`) as
//! a standard-alphabet, padded base64 string, and reads it back into anything `From<Vec<u8>>`.
//! For `Option<...>` fields use [`option`] (`None` is omitted by `#[message]`).
//!
//! Reading is lenient:
//!
//! * `null` reads as empty bytes (as [`option`]: `None`), so the field needs no
//!   other null handling under `#[message]`;
//! * base64 with or without padding is accepted;
//! * a format's native bytes (MessagePack `bin`, for example) are taken as they are, and so is a
//!   sequence of integers (what plain serde writes for a `Vec<u8>`).
//!
//! ```
//! use tg_schema::{message, Codec, JsonCodec};
//!
//! #[message]
//! #[derive(Debug, Clone, PartialEq, Default)]
//! struct Blob {
//!     #[serde(with = "tg_schema::base64_bytes")]
//!     data: Vec<u8>,
//!     #[serde(with = "tg_schema::base64_bytes::option")]
//!     thumbnail: Option<Vec<u8>>,
//! }
//!
//! let blob = Blob { data: b"hello".to_vec(), thumbnail: None };
//! let json = JsonCodec.encode(&blob).unwrap();
//! assert_eq!(json, br#"{"data":"aGVsbG8="}"#);
//! assert_eq!(JsonCodec.decode::<Blob>(&json).unwrap(), blob);
//! assert_eq!(JsonCodec.decode::<Blob>(br#"{"data":null}"#).unwrap(), Blob::default());
//! ```

use std::fmt;

use base64::display::Base64Display;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Serializer;

/// Standard alphabet; decoding accepts input with or without padding.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Writes `bytes` as a padded standard-alphabet base64 string.
///
/// # Errors
///
/// Whatever the serializer reports for a string.
pub fn serialize<T, S>(bytes: &T, serializer: S) -> Result<S::Ok, S::Error>
where
    T: AsRef<[u8]> + ?Sized,
    S: Serializer,
{
    serializer.collect_str(&Base64Display::new(bytes.as_ref(), &STANDARD))
}

/// Reads a base64 string (or `null`, read as empty) into `T`.
///
/// # Errors
///
/// When the value is neither `null`, a string, bytes nor a sequence of bytes, or the string is
/// not valid base64.
pub fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
where
    T: From<Vec<u8>>,
    D: Deserializer<'de>,
{
    deserializer
        .deserialize_option(OptionVisitor)
        .map(|bytes| T::from(bytes.unwrap_or_default()))
}

/// The same for `Option` fields: `#[serde(with = "tg_schema::base64_bytes::option")]`.
///
/// `None` is written as `null` by [`serialize`] if it is written at all;
/// `#[message]` adds `skip_serializing_if = "Option::is_none"` to `Option` fields, so it is not.
/// `null` (or an absent key, under `#[message]`) reads as `None`.
pub mod option {
    use super::*;

    /// Writes `Some(bytes)` as a base64 string and `None` as the format's "none".
    ///
    /// # Errors
    ///
    /// Whatever the serializer reports.
    pub fn serialize<T, S>(bytes: &Option<T>, serializer: S) -> Result<S::Ok, S::Error>
    where
        T: AsRef<[u8]>,
        S: Serializer,
    {
        match bytes {
            Some(bytes) => serializer.serialize_some(&AsBase64(bytes.as_ref())),
            None => serializer.serialize_none(),
        }
    }

    /// Reads `null` as `None` and a base64 string as `Some`.
    ///
    /// # Errors
    ///
    /// As [`super::deserialize`].
    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        T: From<Vec<u8>>,
        D: Deserializer<'de>,
    {
        deserializer
            .deserialize_option(OptionVisitor)
            .map(|bytes| bytes.map(T::from))
    }

    struct AsBase64<'a>(&'a [u8]);

    impl serde::Serialize for AsBase64<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            super::serialize(self.0, serializer)
        }
    }
}

struct OptionVisitor;

impl<'de> Visitor<'de> for OptionVisitor {
    type Value = Option<Vec<u8>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a base64 string or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(BytesVisitor).map(Some)
    }
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a base64 string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        LENIENT
            .decode(v)
            .map_err(|err| E::custom(format_args!("invalid base64: {err}")))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
        while let Some(byte) = seq.next_element::<u8>()? {
            out.push(byte);
        }
        Ok(out)
    }
}
