//! Message handlers and the errors they return.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

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
    /// The handler panicked (caught per message in a batch, counted as a panic by the runner).
    pub(crate) panicked: bool,
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
            panicked: false,
        }
    }

    /// For rate-limited errors: wait at least this long before retrying.
    #[must_use]
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// A [`HandlerErrorKind::Failed`] error for a handler that panicked with `panic`.
    pub(crate) fn from_panic(panic: &(dyn std::any::Any + Send)) -> Self {
        let text = if let Some(s) = panic.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = panic.downcast_ref::<String>() {
            s.clone()
        } else {
            "non-string panic payload".to_owned()
        };
        let mut e = Self::failed(format!("handler panicked: {text}"));
        e.panicked = true;
        e
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

    /// Handles a batch (the runner's batch mode, [`RunnerConfig::max_batch`](crate::RunnerConfig)):
    /// one outcome per message, in the batch's order. The default hands the messages to
    /// [`handle`](Self::handle) one after the other; [`BatchHandler`]s (through
    /// [`batch_handler`]) get the whole batch at once.
    fn handle_batch(
        &self,
        batch: Vec<TypedMessage<T>>,
    ) -> impl Future<Output = Vec<Result<(), HandlerError>>> + Send
    where
        T: Send,
    {
        async move {
            let mut outcomes = Vec::with_capacity(batch.len());
            for message in batch {
                // A panic fails its own message only, as it would outside a batch.
                let outcome = AssertUnwindSafe(self.handle(message))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| Err(HandlerError::from_panic(&*panic)));
                outcomes.push(outcome);
            }
            outcomes
        }
    }
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

/// Handles a whole batch at once (the runner's batch mode): gets up to
/// [`RunnerConfig::max_batch`](crate::RunnerConfig) messages and returns one outcome per message,
/// in order — `Ok` acknowledges it; an error is retried after a delay, dead-lettered or waited
/// out exactly as a single handler's error is (see [`HandlerError`]). Missing outcomes count as
/// failures. Wrap one with [`batch_handler`] to give it to a
/// [`ConsumerRunner`](crate::ConsumerRunner).
pub trait BatchHandler<T>: Send + Sync + 'static {
    /// Handles the batch.
    fn handle(
        &self,
        batch: Vec<TypedMessage<T>>,
    ) -> impl Future<Output = Vec<Result<(), HandlerError>>> + Send;
}

impl<T, F, Fut> BatchHandler<T> for F
where
    T: Send + 'static,
    F: Fn(Vec<TypedMessage<T>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Result<(), HandlerError>>> + Send,
{
    fn handle(
        &self,
        batch: Vec<TypedMessage<T>>,
    ) -> impl Future<Output = Vec<Result<(), HandlerError>>> + Send {
        self(batch)
    }
}

/// A [`BatchHandler`] as a runner's [`Handler`]: in batch mode it gets whole batches; a message
/// retried on its own (in place, where the backend cannot redeliver) is a batch of one.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::sync::Arc;
/// use tg_backend_api::{Backend, BackendExt, ConsumerOptions, TypedMessage};
/// use tg_runtime::{batch_handler, ConsumerRunner, HandlerError, RunnerConfig};
///
/// let backend: Arc<dyn Backend> = Arc::new(tg_backend_memory::MemoryBackend::new());
/// let topic = tg_topic::topic("rows")?;
/// let store = batch_handler(|rows: Vec<TypedMessage<String>>| async move {
///     // one INSERT of every row, say; here every row is fine but the empty one
///     rows.iter()
///         .map(|r| if r.value().is_empty() { Err(HandlerError::permanent("empty row")) } else { Ok(()) })
///         .collect::<Vec<_>>()
/// });
/// let runner = ConsumerRunner::new(backend.clone(), topic.clone(), ConsumerOptions::new("store"), store)
///     .config(RunnerConfig::default().max_batch(100))
///     .start()
///     .await?;
/// let producer = backend.typed_producer::<String>(&topic).await?;
/// producer.send_batch(&["a".to_owned(), "b".to_owned(), String::new()]).await?;
/// # tokio::time::sleep(std::time::Duration::from_millis(300)).await;
/// let report = runner.shutdown().await?;
/// assert_eq!((report.stats.succeeded, report.stats.dead_lettered), (2, 1));
/// # Ok(()) }
/// ```
pub fn batch_handler<T, B: BatchHandler<T>>(handler: B) -> Batched<B> {
    Batched(handler)
}

/// A [`BatchHandler`] made a [`Handler`] by [`batch_handler`].
#[derive(Debug, Clone)]
pub struct Batched<B>(pub B);

impl<T, B> Handler<T> for Batched<B>
where
    T: Send + 'static,
    B: BatchHandler<T>,
{
    async fn handle(&self, message: TypedMessage<T>) -> Result<(), HandlerError> {
        self.0
            .handle(vec![message])
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                Err(HandlerError::failed(
                    "the batch handler returned no outcome",
                ))
            })
    }

    fn handle_batch(
        &self,
        batch: Vec<TypedMessage<T>>,
    ) -> impl Future<Output = Vec<Result<(), HandlerError>>> + Send
    where
        T: Send,
    {
        self.0.handle(batch)
    }
}
