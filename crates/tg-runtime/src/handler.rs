//! Message handlers and the errors they return.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tg_backend_api::{ErrorKind, TypedMessage};

/// What the runner does with a message whose handler failed.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandlerErrorKind {
    /// Retried after a growing delay; dead-lettered once the attempts run out.
    Failed,
    /// The handler (or something it called) is rate limited: retried after a back-off, and the
    /// retry does not count as an attempt.
    RateLimited,
    /// Retrying cannot help: the message goes to the dead-letter topic at once.
    Permanent,
}

impl HandlerErrorKind {
    /// The name used in logs, metrics and dead-letter properties.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::RateLimited => "rate_limited",
            Self::Permanent => "permanent",
        }
    }
}

/// The error of a message handler: a [`HandlerErrorKind`] saying how the runner reacts, and a text
/// that ends up in logs and in the dead-letter message.
///
/// Any `std::error::Error` converts into it with `?` (as [`HandlerErrorKind::Failed`]; a
/// [`tg_backend_api::Error`] of kind `RateLimited` becomes [`HandlerErrorKind::RateLimited`]).
///
/// ```
/// use std::time::Duration;
/// use tg_runtime::{HandlerError, HandlerErrorKind};
///
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     Ok(s.parse::<u32>()?)
/// }
/// assert_eq!(parse("x").unwrap_err().kind(), HandlerErrorKind::Failed);
/// let e = HandlerError::rate_limited("429 from the LLM").retry_after(Duration::from_secs(2));
/// assert_eq!(e.kind(), HandlerErrorKind::RateLimited);
/// assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(2)));
/// assert_eq!(HandlerError::permanent("bad request").to_string(), "permanent: bad request");
/// ```
pub struct HandlerError {
    kind: HandlerErrorKind,
    message: String,
    retry_after: Option<Duration>,
}

impl HandlerError {
    /// A failure to retry (see [`HandlerErrorKind::Failed`]).
    pub fn failed(message: impl fmt::Display) -> Self {
        Self::with_kind(HandlerErrorKind::Failed, message)
    }

    /// Rate limited: retry after a back-off without counting an attempt.
    pub fn rate_limited(message: impl fmt::Display) -> Self {
        Self::with_kind(HandlerErrorKind::RateLimited, message)
    }

    /// A failure retrying cannot fix: dead-letter at once.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self::with_kind(HandlerErrorKind::Permanent, message)
    }

    /// An error of this kind.
    pub fn with_kind(kind: HandlerErrorKind, message: impl fmt::Display) -> Self {
        Self {
            kind,
            message: message.to_string(),
            retry_after: None,
        }
    }

    /// For rate-limited errors: wait at least this long before retrying.
    #[must_use]
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The kind.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }

    /// The text.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The wait asked for by [`retry_after`](Self::retry_after).
    pub fn retry_after_hint(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(err: E) -> Self {
        let any: &dyn std::any::Any = &err;
        let kind = match any.downcast_ref::<tg_backend_api::Error>() {
            Some(e) if e.kind() == ErrorKind::RateLimited => HandlerErrorKind::RateLimited,
            _ => HandlerErrorKind::Failed,
        };
        Self::with_kind(kind, err)
    }
}

/// Handles one decoded message. Implemented for every
/// `Fn(TypedMessage<T>) -> impl Future<Output = Result<(), HandlerError>>` closure (`async` blocks
/// included); implement it by hand for handlers with state.
///
/// ```
/// use tg_backend_api::TypedMessage;
/// use tg_runtime::{Handler, HandlerError};
///
/// struct Store;
/// impl Handler<String> for Store {
///     async fn handle(&self, message: TypedMessage<String>) -> Result<(), HandlerError> {
///         if message.value().is_empty() {
///             return Err(HandlerError::permanent("empty"));
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Handler<T>: Send + Sync + 'static {
    /// Handles the message. `Ok` acknowledges it; see [`HandlerError`] for the errors.
    fn handle(
        &self,
        message: TypedMessage<T>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<T, F, Fut> Handler<T> for F
where
    T: Send + 'static,
    F: Fn(TypedMessage<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(
        &self,
        message: TypedMessage<T>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(message)
    }
}
