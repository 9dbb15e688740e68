//! One lifecycle for every backend: the closed state, the live producers and consumers a close
//! shuts down, closing on drop; and the checks every call goes through.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tg_topic::{Qos, Topic};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::raw::{Feature, RawBackend, RawConsumer, RawProducer};
use crate::{
    Backend, Capabilities, Consumer, ConsumerOptions, ConsumerType, Error, ErrorKind,
    HandleRegistry, InitialPosition, Message, OutboundMessage, Producer, ProducerOptions, Result,
    SendReceipt,
};

/// The closed state of one backend and the producers and consumers still alive, which
/// [`Backend::close`] closes. A backend keeps one in its shared state and returns it from
/// [`RawBackend::lifecycle`]; its background tasks can wait for [`Lifecycle::closed`].
///
/// ```
/// use tg_backend_api::kit::Lifecycle;
/// let life = Lifecycle::new("demo backend");
/// assert!(life.check_open().is_ok());
/// life.mark_closed();
/// assert_eq!(life.check_open().unwrap_err().to_string(), "demo backend is closed [Closed]");
/// ```
pub struct Lifecycle {
    what: &'static str,
    token: CancellationToken,
    handles: HandleRegistry<dyn Closable>,
}

impl Lifecycle {
    /// An open lifecycle; `what` names the backend in errors (`Redis backend`).
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            token: CancellationToken::new(),
            handles: HandleRegistry::new(),
        }
    }

    /// Whether the backend was closed.
    pub fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }

    /// `Closed` once the backend was closed.
    pub fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed(self.what))
        } else {
            Ok(())
        }
    }

    /// Resolves when the backend is closed (for background tasks to end with it). It resolves
    /// *before* the live producers and consumers are closed: a task that their `close` still
    /// needs (a connection that must carry an unsubscribe or the last acknowledgements) must not
    /// end here but in [`RawBackend::shutdown`], which runs after they are closed.
    pub fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// A token cancelled when the backend is closed, for tasks that outlive a borrow.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Marks the backend closed without closing its handles (for a backend dropped or failed as a
    /// whole); [`Backend::close`] does this and closes the handles.
    pub fn mark_closed(&self) {
        self.token.cancel();
    }

    fn register(&self, handle: Arc<dyn Closable>) {
        self.handles.register(&handle);
    }

    /// Marks the backend closed and closes every live handle, all at once (a consumer's close
    /// may wait on its broker, and a backend with many should not wait for each in turn); the
    /// first error is returned, after every handle was tried.
    async fn close_handles(&self) -> Result<()> {
        self.mark_closed();
        let handles = self.handles.drain_live();
        let results = futures::future::join_all(handles.iter().map(|h| h.close_boxed())).await;
        results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
    }
}

impl fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lifecycle")
            .field("closed", &self.is_closed())
            .field("handles", &self.handles)
            .finish()
    }
}

/// A producer or consumer the lifecycle can close.
trait Closable: Send + Sync {
    fn close_boxed(&self) -> BoxFuture<'_, Result<()>>;
}

/// A backend's producer or consumer with its own closed state; closed once, by whichever comes
/// first of `close`, `unsubscribe`, the backend's close and drop.
struct Handle<T> {
    inner: T,
    /// Cancelled when this handle or its backend closes.
    token: CancellationToken,
    closed: AtomicBool,
}

impl<T> Handle<T> {
    fn new(inner: T, life: &Lifecycle) -> Self {
        Self {
            inner,
            token: life.token.child_token(),
            closed: AtomicBool::new(false),
        }
    }

    /// True for the one caller that gets to close it.
    fn begin_close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::AcqRel);
        self.token.cancel();
        first
    }

    fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }
}

impl<P: RawProducer> Closable for Handle<P> {
    fn close_boxed(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.begin_close() {
                self.inner.close().await
            } else {
                Ok(())
            }
        })
    }
}

struct ConsumerHandle<C>(Handle<C>);

impl<C: RawConsumer> Closable for ConsumerHandle<C> {
    fn close_boxed(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.0.begin_close() {
                self.0.inner.close().await
            } else {
                Ok(())
            }
        })
    }
}

#[async_trait]
impl<B: RawBackend> Backend for B {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn capabilities(&self, qos: Qos) -> Capabilities {
        self.caps(qos)
    }

    async fn create_producer(
        &self,
        topic: &Topic,
        options: ProducerOptions,
    ) -> Result<Box<dyn Producer>> {
        let life = self.lifecycle();
        life.check_open()?;
        let caps = self.caps(topic.qos());
        let retained =
            (!caps.retained).then(|| self.why_not(topic.qos(), Feature::Retained).into_owned());
        let inner = self.open_producer(topic, &options).await?;
        let handle = Arc::new(Handle::new(inner, life));
        life.register(handle.clone());
        Ok(Box::new(CheckedProducer {
            handle,
            topic: topic.clone(),
            max_payload: caps.max_payload,
            no_retained: retained,
            what: life.what,
        }))
    }

    async fn create_consumer(
        &self,
        topic: &Topic,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        let life = self.lifecycle();
        life.check_open()?;
        options.validate()?;
        let qos = topic.qos();
        let caps = self.caps(qos);
        // Shared is the default type: where `shared` is false a subscription takes one consumer
        // (of the default type), so only the other types are refused here; the backend refuses a
        // second consumer itself.
        if options.consumer_type != ConsumerType::Shared && !caps.supports(options.consumer_type) {
            return Err(Error::unsupported(
                self.why_not(qos, Feature::Consumer(options.consumer_type)),
            )
            .with_context("topic", topic)
            .with_context("subscription", &options.subscription));
        }
        if options.initial_position == InitialPosition::Earliest && !caps.earliest {
            let why = self.why_not(qos, Feature::Earliest);
            if qos.is_persistent() {
                tracing::warn!(%topic, subscription = %options.subscription, "{why}: Earliest behaves as Latest");
            } else {
                tracing::debug!(%topic, subscription = %options.subscription, "{why}: Earliest behaves as Latest");
            }
        }
        let id = crate::next_consumer_id();
        let inner = self.open_consumer(topic, &options, id).await?;
        let handle = Arc::new(ConsumerHandle(Handle::new(inner, life)));
        life.register(handle.clone());
        Ok(Box::new(CheckedConsumer {
            handle,
            id,
            topic: topic.clone(),
            subscription: options.subscription,
            what: life.what,
        }))
    }

    async fn ping(&self) -> Result<()> {
        self.lifecycle().check_open()?;
        self.probe().await
    }

    async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        self.lifecycle().check_open()?;
        self.remove_topic(topic).await
    }

    async fn close(&self) -> Result<()> {
        let life = self.lifecycle();
        if life.is_closed() {
            return Ok(());
        }
        let handles = life.close_handles().await;
        let shutdown = self.shutdown().await;
        handles.and(shutdown)
    }
}

/// The [`Producer`] the kit hands out around a backend's [`RawProducer`].
struct CheckedProducer<P: RawProducer> {
    handle: Arc<Handle<P>>,
    topic: Topic,
    max_payload: usize,
    /// Why retained messages are refused, where they are.
    no_retained: Option<String>,
    what: &'static str,
}

impl<P: RawProducer> CheckedProducer<P> {
    /// The payload limit and retained check; gives a q2 message its de-duplication id.
    fn check_message(&self, message: &mut OutboundMessage) -> Result<()> {
        let len = message.payload().len();
        if len > self.max_payload {
            return Err(
                Error::payload_too_large(len, self.max_payload).with_context("topic", &self.topic)
            );
        }
        if message.is_retained() {
            if let Some(why) = &self.no_retained {
                return Err(Error::unsupported(why.clone()).with_context("topic", &self.topic));
            }
        }
        if self.topic.qos() == Qos::Q2 {
            message.ensure_dedup_id();
        }
        Ok(())
    }

    fn check_open(&self) -> Result<()> {
        if self.handle.is_closed() {
            return Err(closed_error(&self.handle, self.what, "producer")
                .with_context("topic", &self.topic));
        }
        Ok(())
    }
}

/// `Closed` naming what closed: the handle itself, or its backend.
fn closed_error<T>(handle: &Handle<T>, backend: &'static str, what: &'static str) -> Error {
    if handle.closed.load(Ordering::Acquire) {
        Error::closed(what)
    } else {
        Error::closed(backend)
    }
}

#[async_trait]
impl<P: RawProducer> Producer for CheckedProducer<P> {
    fn topic(&self) -> &Topic {
        &self.topic
    }

    async fn send(&self, mut message: OutboundMessage) -> Result<SendReceipt> {
        self.check_open()?;
        self.check_message(&mut message)?;
        self.handle.inner.send(message).await
    }

    async fn send_batch(&self, mut messages: Vec<OutboundMessage>) -> Result<Vec<SendReceipt>> {
        self.check_open()?;
        for (index, message) in messages.iter_mut().enumerate() {
            self.check_message(message)
                .map_err(|e| e.with_context("batch_index", index))?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        self.handle.inner.send_batch(messages).await
    }

    async fn flush(&self) -> Result<()> {
        self.check_open()?;
        self.handle.inner.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.handle.close_boxed().await
    }
}

impl<P: RawProducer> Drop for CheckedProducer<P> {
    fn drop(&mut self) {
        if self.handle.is_closed() {
            return;
        }
        if self.handle.inner.close_sync() {
            self.handle.begin_close();
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let handle = self.handle.clone();
            runtime.spawn(async move { handle.close_boxed().await });
        }
    }
}

impl<P: RawProducer> fmt::Debug for CheckedProducer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("topic", &self.topic)
            .field("closed", &self.handle.is_closed())
            .field("backend", &self.handle.inner)
            .finish()
    }
}

/// The [`Consumer`] the kit hands out around a backend's [`RawConsumer`].
struct CheckedConsumer<C: RawConsumer> {
    handle: Arc<ConsumerHandle<C>>,
    id: u64,
    topic: Topic,
    subscription: String,
    what: &'static str,
}

impl<C: RawConsumer> CheckedConsumer<C> {
    fn closed(&self) -> Error {
        closed_error(&self.handle.0, self.what, "consumer")
            .with_context("topic", &self.topic)
            .with_context("subscription", &self.subscription)
    }

    fn check_open(&self) -> Result<()> {
        if self.handle.0.is_closed() {
            return Err(self.closed());
        }
        Ok(())
    }

    fn check_own(&self, message: &Message) -> Result<()> {
        if message.ack_handle().consumer() != self.id {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the message was received by another consumer; acknowledge it there",
            )
            .with_context("message_id", message.id()));
        }
        self.check_open()
    }
}

#[async_trait]
impl<C: RawConsumer> Consumer for CheckedConsumer<C> {
    fn topic(&self) -> &Topic {
        &self.topic
    }

    fn subscription(&self) -> &str {
        &self.subscription
    }

    async fn receive(&self, timeout: Duration) -> Result<Message> {
        self.check_open()?;
        let handle = &self.handle.0;
        let received = handle.inner.receive(timeout);
        tokio::pin!(received);
        // A message that is already there is taken without setting up the wait for a close
        // (the common case under load, where that set-up would cost more than the take).
        let outcome = match futures::poll!(received.as_mut()) {
            std::task::Poll::Ready(outcome) => outcome,
            std::task::Poll::Pending => tokio::select! {
                biased;
                outcome = received => outcome,
                () = handle.token.cancelled() => return Err(self.closed()),
            },
        };
        match outcome {
            Err(e) if handle.is_closed() && e.kind() != ErrorKind::Closed => Err(self.closed()),
            other => other,
        }
    }

    async fn receive_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        crate::check_batch_max(max)?;
        self.check_open()?;
        let handle = &self.handle.0;
        tokio::select! {
            biased;
            received = handle.inner.receive_batch(max, timeout) => match received {
                Err(e) if handle.is_closed() && e.kind() != ErrorKind::Closed => Err(self.closed()),
                other => other,
            },
            () = handle.token.cancelled() => Err(self.closed()),
        }
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        self.check_own(message)?;
        self.handle.0.inner.acknowledge(message).await
    }

    async fn acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        for message in messages {
            self.check_own(message)?;
        }
        if messages.is_empty() {
            return Ok(());
        }
        self.handle.0.inner.acknowledge_batch(messages).await
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        self.check_own(message)?;
        self.handle.0.inner.negative_acknowledge(message).await
    }

    async fn negative_acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        for message in messages {
            self.check_own(message)?;
        }
        if messages.is_empty() {
            return Ok(());
        }
        self.handle
            .0
            .inner
            .negative_acknowledge_batch(messages)
            .await
    }

    async fn unsubscribe(&self) -> Result<()> {
        self.check_open()?;
        if !self.handle.0.begin_close() {
            return Err(self.closed());
        }
        self.handle.0.inner.unsubscribe().await
    }

    async fn close(&self) -> Result<()> {
        self.handle.close_boxed().await
    }
}

impl<C: RawConsumer> Drop for CheckedConsumer<C> {
    fn drop(&mut self) {
        let handle = &self.handle.0;
        if handle.is_closed() {
            return;
        }
        if handle.inner.close_sync() {
            handle.begin_close();
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let handle = self.handle.clone();
            runtime.spawn(async move { handle.close_boxed().await });
        }
    }
}

impl<C: RawConsumer> fmt::Debug for CheckedConsumer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("subscription", &self.subscription)
            .field("closed", &self.handle.0.is_closed())
            .field("backend", &self.handle.0.inner)
            .finish()
    }
}
