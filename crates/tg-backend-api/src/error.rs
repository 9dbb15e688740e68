//! One error type for every backend, with a kind that callers and retry logic can match on.

use std::borrow::Cow;
use std::fmt;

use crate::Message;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on. New kinds may be added.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Nothing happened within the time asked for (e.g. `receive` got no message).
    Timeout,
    /// The backend, producer or consumer was closed.
    Closed,
    /// A configuration value is missing or malformed (URL, environment variable, option).
    ConfigInvalid,
    /// A topic name failed validation.
    InvalidTopic,
    /// An argument is not acceptable here (e.g. acknowledging a message of another consumer).
    InvalidInput,
    /// The backend cannot do this (see its [`Capabilities`](crate::Capabilities)).
    Unsupported,
    /// A message could not be encoded.
    Encode,
    /// A payload could not be decoded into the expected type; the error carries the raw message.
    Decode,
    /// The payload exceeds what the backend can carry; nothing was sent.
    PayloadTooLarge,
    /// The broker could not be reached or the connection broke.
    Connection,
    /// The broker refused the credentials.
    Auth,
    /// An exclusive subscription already has a consumer.
    ConsumerBusy,
    /// A bounded buffer is full and the configured policy is to fail rather than wait.
    QueueFull,
    /// The callee asks to be called again later; not a failure of the message.
    RateLimited,
    /// A topic, subscription or message does not exist.
    NotFound,
    /// Anything else the backend reported.
    Unexpected,
}

impl ErrorKind {
    /// Whether errors of this kind are worth retrying by default.
    pub const fn is_temporary_by_default(self) -> bool {
        matches!(
            self,
            Self::Timeout | Self::Connection | Self::QueueFull | Self::RateLimited
        )
    }

    /// The kind's name, as printed.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "Timeout",
            Self::Closed => "Closed",
            Self::ConfigInvalid => "ConfigInvalid",
            Self::InvalidTopic => "InvalidTopic",
            Self::InvalidInput => "InvalidInput",
            Self::Unsupported => "Unsupported",
            Self::Encode => "Encode",
            Self::Decode => "Decode",
            Self::PayloadTooLarge => "PayloadTooLarge",
            Self::Connection => "Connection",
            Self::Auth => "Auth",
            Self::ConsumerBusy => "ConsumerBusy",
            Self::QueueFull => "QueueFull",
            Self::RateLimited => "RateLimited",
            Self::NotFound => "NotFound",
            Self::Unexpected => "Unexpected",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error of every tg-pubsub operation: a [`ErrorKind`], a message, whether retrying may help,
/// context pairs (topic, subscription, variable…), the underlying error, and — for
/// [`ErrorKind::Decode`] — the undecodable message itself so it can be acknowledged or dead-lettered.
///
/// ```
/// use tg_backend_api::{Error, ErrorKind};
///
/// let err = Error::new(ErrorKind::PayloadTooLarge, "payload of 10 bytes exceeds the limit of 8 bytes")
///     .with_context("topic", "q1/tg/flow/x");
/// assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
/// assert!(!err.is_temporary());
/// assert_eq!(
///     err.to_string(),
///     "payload of 10 bytes exceeds the limit of 8 bytes [PayloadTooLarge, topic: q1/tg/flow/x]"
/// );
/// ```
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    temporary: bool,
    context: Vec<(&'static str, String)>,
    source: Option<Source>,
    raw: Option<Box<Message>>,
}

impl Error {
    /// A new error; temporary if the kind is temporary by default.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            temporary: kind.is_temporary_by_default(),
            context: Vec::new(),
            source: None,
            raw: None,
        }
    }

    /// Shorthand for `Error::new(ErrorKind::Closed, "<what> is closed")`.
    pub fn closed(what: &'static str) -> Self {
        Self::new(ErrorKind::Closed, format!("{what} is closed"))
    }

    /// Shorthand for `Error::new(ErrorKind::Unsupported, why)`.
    pub fn unsupported(why: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Unsupported, why)
    }

    /// Shorthand for `Error::new(ErrorKind::ConfigInvalid, why)`.
    pub fn config(why: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::ConfigInvalid, why)
    }

    /// Shorthand for `Error::new(ErrorKind::Connection, why)`.
    pub fn connection(why: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Connection, why)
    }

    /// The error for a payload over `max` bytes.
    pub fn payload_too_large(len: usize, max: usize) -> Self {
        Self::new(
            ErrorKind::PayloadTooLarge,
            format!("payload of {len} bytes exceeds the backend's limit of {max} bytes"),
        )
    }

    /// Replaces the message, keeping kind, flag, context, source and raw message.
    #[must_use]
    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = message.into();
        self
    }

    /// Marks the error as temporary (retrying may help) or permanent.
    #[must_use]
    pub fn set_temporary(mut self, temporary: bool) -> Self {
        self.temporary = temporary;
        self
    }

    /// Adds a context pair such as `("topic", "q1/tg/flow/x")`.
    #[must_use]
    pub fn with_context(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    /// Sets the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Attaches the received message this error is about (used by [`ErrorKind::Decode`]).
    #[must_use]
    pub fn with_raw_message(mut self, message: Message) -> Self {
        self.raw = Some(Box::new(message));
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }

    /// The message, without context or source.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The context pairs.
    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }

    /// The value of one context pair.
    pub fn context_value(&self, key: &str) -> Option<&str> {
        self.context
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The message this error is about, for [`ErrorKind::Decode`] errors of typed consumers.
    pub fn raw_message(&self) -> Option<&Message> {
        self.raw.as_deref()
    }

    /// Takes the message this error is about.
    pub fn take_raw_message(&mut self) -> Option<Message> {
        self.raw.take().map(|m| *m)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}", self.message, self.kind)?;
        if self.temporary {
            f.write_str(", temporary")?;
        }
        for (k, v) in &self.context {
            write!(f, ", {k}: {v}")?;
        }
        f.write_str("]")?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("message", &self.message)
            .field("temporary", &self.temporary);
        if !self.context.is_empty() {
            d.field("context", &self.context);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        if let Some(raw) = &self.raw {
            d.field("raw", raw);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

impl From<tg_topic::TopicError> for Error {
    fn from(err: tg_topic::TopicError) -> Self {
        Error::new(ErrorKind::InvalidTopic, err.to_string())
    }
}

impl From<tg_topic::QueueIdError> for Error {
    fn from(err: tg_topic::QueueIdError) -> Self {
        Error::new(ErrorKind::InvalidTopic, err.to_string())
    }
}

impl From<tg_schema::CodecError> for Error {
    fn from(err: tg_schema::CodecError) -> Self {
        let kind = match err.direction() {
            tg_schema::Direction::Encode => ErrorKind::Encode,
            tg_schema::Direction::Decode => ErrorKind::Decode,
        };
        Error::new(kind, err.to_string()).with_context("type", err.type_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_kind_context_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::connection("cannot reach redis")
            .with_context("url", "redis://127.0.0.1:6379")
            .with_source(io);
        assert!(err.is_temporary());
        assert_eq!(
            err.to_string(),
            "cannot reach redis [Connection, temporary, url: redis://127.0.0.1:6379]: refused"
        );
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(err.context_value("url"), Some("redis://127.0.0.1:6379"));
    }

    #[test]
    fn temporary_can_be_overridden() {
        let err = Error::new(ErrorKind::Unexpected, "x");
        assert!(!err.is_temporary());
        assert!(err.set_temporary(true).is_temporary());
        assert!(!Error::new(ErrorKind::Timeout, "t")
            .set_temporary(false)
            .is_temporary());
    }

    #[test]
    fn topic_error_converts_to_invalid_topic() {
        let err: Error = tg_topic::Topic::parse("q9/a/b/c").unwrap_err().into();
        assert_eq!(err.kind(), ErrorKind::InvalidTopic);
        assert!(err.message().contains("q9"), "{err}");
    }
}
