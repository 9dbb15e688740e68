//! Codecs: how messages become bytes and back.

use std::fmt;

use serde::{de::DeserializeOwned, Serialize};

/// How messages become bytes. JSON ([`JsonCodec`]) first; the trait leaves room for others (for
/// example MessagePack).
///
/// A codec is a small, cheap-to-clone value (usually a unit struct) shared by producers and
/// consumers. Errors are [`CodecError`]s naming the type and, where the format allows, the field.
pub trait Codec: Clone + Send + Sync + fmt::Debug + 'static {
    /// The MIME type of the encoded bytes, e.g. `"application/json"`.
    fn content_type(&self) -> &'static str;

    /// Encodes `value`.
    ///
    /// # Errors
    ///
    /// A [`CodecError`] with [`Direction::Encode`] when the value cannot be represented (for JSON:
    /// a map with non-string keys, or a `Serialize` impl that fails).
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError>;

    /// Decodes a `T` from `bytes`.
    ///
    /// # Errors
    ///
    /// A [`CodecError`] with [`Direction::Decode`] when `bytes` is not in the codec's format or does
    /// not hold a `T`; [`CodecError::path`] names the field that failed.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

/// Compact JSON, as TrustGraph writes and reads it.
///
/// Encoding is `serde_json::to_vec` (no whitespace, fields in declaration order). Decoding runs
/// `serde_json::from_slice` and, only when that fails, decodes again with path tracking
/// (`serde_path_to_error`) to name the failing field, so successful decodes pay nothing for it.
///
/// ```
/// use tg_schema::{Codec, JsonCodec};
/// use tg_schema::trustgraph::TextCompletionRequest;
///
/// let bytes = br#"{"system":"s","prompt":"p","streaming":"yes"}"#;
/// let err = JsonCodec.decode::<TextCompletionRequest>(bytes).unwrap_err();
/// assert_eq!(err.path(), Some("streaming"));
/// assert_eq!(
///     err.to_string(),
///     r#"cannot decode TextCompletionRequest: field "streaming": invalid type: string "yes", expected a boolean at line 1 column 44"#
/// );
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JsonCodec;

impl JsonCodec {
    /// The content type [`Codec::content_type`] returns: `application/json`.
    pub const CONTENT_TYPE: &'static str = "application/json";
}

impl Codec for JsonCodec {
    fn content_type(&self) -> &'static str {
        Self::CONTENT_TYPE
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        match serde_json::to_vec(value) {
            Ok(bytes) => Ok(bytes),
            Err(fast_err) => {
                // Slow path, errors only: encode again tracking the path to name the field.
                let mut ser = serde_json::Serializer::new(Vec::new());
                match serde_path_to_error::serialize(value, &mut ser) {
                    Err(err) => {
                        let path = path_of(err.path());
                        Err(CodecError::new::<T>(
                            Direction::Encode,
                            path,
                            err.into_inner(),
                        ))
                    }
                    Ok(()) => Err(CodecError::new::<T>(Direction::Encode, None, fast_err)),
                }
            }
        }
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        match serde_json::from_slice(bytes) {
            Ok(value) => Ok(value),
            Err(fast_err) => Err(json_decode_error::<T>(bytes, fast_err)),
        }
    }
}

/// Slow path, errors only: decodes again with path tracking to name the failing field.
#[cold]
#[inline(never)]
fn json_decode_error<T: DeserializeOwned>(bytes: &[u8], fast_err: serde_json::Error) -> CodecError {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let tracked: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    match tracked {
        Err(err) => {
            let path = path_of(err.path());
            CodecError::new::<T>(Direction::Decode, path, err.into_inner())
        }
        // The value itself decodes; the failure was after it (trailing characters).
        Ok(_) => match de.end() {
            Err(err) => CodecError::new::<T>(Direction::Decode, None, err),
            Ok(()) => CodecError::new::<T>(Direction::Decode, None, fast_err),
        },
    }
}

fn path_of(path: &serde_path_to_error::Path) -> Option<String> {
    if path.iter().next().is_none() {
        None
    } else {
        Some(path.to_string())
    }
}

/// Whether a [`CodecError`] happened while encoding or decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Turning a value into bytes.
    Encode,
    /// Turning bytes into a value.
    Decode,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Encode => "encode",
            Direction::Decode => "decode",
        })
    }
}

/// A message could not be encoded or decoded. Names the type and the field that failed.
///
/// Displays as, for example,
/// `cannot decode TextCompletionRequest: field "streaming": invalid type: string "yes", expected a boolean at line 1 column 44`
/// or, when the input is not JSON at all,
/// `cannot decode TextCompletionRequest: expected value at line 1 column 1`.
/// The underlying format error is available through [`std::error::Error::source`].
#[derive(Debug)]
pub struct CodecError {
    direction: Direction,
    type_name: &'static str,
    path: Option<String>,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl CodecError {
    /// Builds an error about type `T` (for codec implementations).
    ///
    /// `path` is the field path in `serde_path_to_error` form (`triples[0].s.is_uri`), `None` when
    /// the error is not about a field.
    pub fn new<T: ?Sized>(
        direction: Direction,
        path: Option<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        CodecError {
            direction,
            type_name: short_type_name(std::any::type_name::<T>()),
            path,
            source: source.into(),
        }
    }

    /// Whether encoding or decoding failed.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The type being encoded or decoded, without its module path (e.g.
    /// `TextCompletionRequest`; generic types keep the paths of their arguments, e.g.
    /// `Vec<tg_schema::trustgraph::core::Triple>`).
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// The path of the field that failed, like `triples[0].s.is_uri`; `None` when the failure
    /// is at the top level (not the format at all, wrong top-level type, trailing characters).
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot {} {}: ", self.direction, self.type_name)?;
        if let Some(path) = &self.path {
            write!(f, "field \"{path}\": ")?;
        }
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Drops the module path of a type name: `a::b::C` → `C`, `alloc::vec::Vec<a::T>` → `Vec<a::T>`.
/// Names that do not start with a path (`&str`, tuples, slices) are returned unchanged.
fn short_type_name(full: &'static str) -> &'static str {
    let head_end = full
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(full.len());
    match full[..head_end].rfind("::") {
        Some(pos) => &full[pos + 2..],
        None => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_type_names() {
        assert_eq!(short_type_name("a::b::C"), "C");
        assert_eq!(short_type_name("C"), "C");
        assert_eq!(
            short_type_name("alloc::vec::Vec<a::Triple>"),
            "Vec<a::Triple>"
        );
        assert_eq!(short_type_name("&str"), "&str");
        assert_eq!(short_type_name("(a::B, c::D)"), "(a::B, c::D)");
        assert_eq!(short_type_name("[u8]"), "[u8]");
        assert_eq!(short_type_name("bool"), "bool");
        assert_eq!(short_type_name("serde_json::value::Value"), "Value");
    }

    #[test]
    fn codec_error_is_send_sync_static() {
        fn assert_traits<T: Send + Sync + 'static + std::error::Error>() {}
        assert_traits::<CodecError>();
    }

    #[test]
    fn content_type() {
        assert_eq!(JsonCodec.content_type(), "application/json");
    }
}
