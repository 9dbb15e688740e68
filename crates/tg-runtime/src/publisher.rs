//! A fire-and-forget publisher: a bounded queue drained by a background sender.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use tg_backend_api::{Backend, Error, ErrorKind, OutboundMessage, Result, Topic};
use tg_schema::{Codec, JsonCodec};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::metrics::RuntimeMetrics;
use crate::{ProducerConfig, RetryingProducer};

/// How a [`Publisher`] queues and sends.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Messages the queue holds; a full queue makes [`Publisher::publish`] wait and
    /// [`Publisher::try_publish`] fail with `QueueFull`. Default: 1024.
    pub capacity: usize,
    /// Messages handed to the backend and not yet confirmed. Default: 256.
    pub max_in_flight: usize,
    /// After the retries run out: `false` (the default) keeps the error and returns it from the
    /// next [`Publisher::flush`]/[`Publisher::close`]; `true` drops the message, counting and
    /// logging each drop (spec 003 FR-018's "drop after max retries" — opt in explicitly).
    pub drop_after_retries: bool,
    /// Retries of each send.
    pub producer: ProducerConfig,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            capacity: 1024,
            max_in_flight: 256,
            drop_after_retries: false,
            producer: ProducerConfig::default(),
        }
    }
}

impl PublisherConfig {
    /// Sets `capacity` (at least 1).
    #[must_use]
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n.max(1);
        self
    }

    /// Sets `max_in_flight` (at least 1).
    #[must_use]
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Sets `drop_after_retries`.
    #[must_use]
    pub fn drop_after_retries(mut self, on: bool) -> Self {
        self.drop_after_retries = on;
        self
    }

    /// Sets the retry policy.
    #[must_use]
    pub fn producer(mut self, p: ProducerConfig) -> Self {
        self.producer = p;
        self
    }
}

enum Command {
    Send(OutboundMessage),
    Flush(oneshot::Sender<Result<()>>),
}

struct State {
    failures: Mutex<Vec<Error>>,
    failed: AtomicU64,
    sent: AtomicU64,
    closed: AtomicBool,
}

/// Publishes without waiting for the broker: messages go into a bounded queue that a background
/// task sends through a [`RetryingProducer`] (up to `max_in_flight` at once, handed to the
/// backend in queue order). Memory is bounded by `capacity`: when the queue is full,
/// [`publish`](Self::publish) waits (backpressure) and [`try_publish`](Self::try_publish) fails
/// with [`ErrorKind::QueueFull`]. [`flush`](Self::flush) waits until everything queued before it
/// was confirmed and reports send failures since the last flush.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::sync::Arc;
/// use tg_backend_api::{Backend, OutboundMessage};
/// use tg_runtime::{Publisher, PublisherConfig};
///
/// let backend: Arc<dyn Backend> = Arc::new(tg_backend_memory::MemoryBackend::new());
/// let publisher = Publisher::new(backend, tg_topic::topic("events")?, PublisherConfig::default());
/// publisher.publish(OutboundMessage::new("a")).await?;
/// publisher.try_publish(OutboundMessage::new("b"))?;
/// publisher.flush().await?;
/// publisher.close().await
/// # }
/// ```
pub struct Publisher {
    tx: mpsc::Sender<Command>,
    task: Mutex<Option<JoinHandle<()>>>,
    state: Arc<State>,
    producer: Arc<RetryingProducer>,
    capacity: usize,
}

impl Publisher {
    /// A publisher to `topic`; the background task starts at once (in the current runtime).
    pub fn new(backend: Arc<dyn Backend>, topic: Topic, config: PublisherConfig) -> Self {
        Self::with_metrics(backend, topic, config, None)
    }

    /// Same, reporting into `metrics` (queue depth, outcomes, connection state).
    pub fn with_metrics(
        backend: Arc<dyn Backend>,
        topic: Topic,
        config: PublisherConfig,
        metrics: Option<&RuntimeMetrics>,
    ) -> Self {
        let capacity = config.capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let producer = Arc::new(RetryingProducer::with_metrics(
            backend,
            topic,
            config.producer.clone(),
            metrics,
        ));
        let state = Arc::new(State {
            failures: Mutex::new(Vec::new()),
            failed: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let task = tokio::spawn(sender(rx, producer.clone(), state.clone(), config));
        Self {
            tx,
            task: Mutex::new(Some(task)),
            state,
            producer,
            capacity,
        }
    }

    fn closed_error(&self) -> Error {
        Error::closed("publisher").with_context("topic", self.producer.topic())
    }

    /// Queues `message`, waiting while the queue is full.
    pub async fn publish(&self, message: OutboundMessage) -> Result<()> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        self.tx
            .send(Command::Send(message))
            .await
            .map_err(|_| self.closed_error())?;
        self.producer.metrics().queue_depth.inc();
        Ok(())
    }

    /// Encodes `value` as JSON and queues it with `properties`.
    pub async fn publish_value<T: tg_schema::Message>(
        &self,
        value: &T,
        properties: tg_backend_api::Properties,
    ) -> Result<()> {
        let bytes = JsonCodec.encode(value)?;
        self.publish(OutboundMessage::new(bytes).with_properties(properties))
            .await
    }

    /// Queues `message`, or fails at once with [`ErrorKind::QueueFull`] when the queue is full.
    pub fn try_publish(&self, message: OutboundMessage) -> Result<()> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        match self.tx.try_send(Command::Send(message)) {
            Ok(()) => {
                self.producer.metrics().queue_depth.inc();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(Error::new(
                ErrorKind::QueueFull,
                format!(
                    "the publisher queue is full ({} messages); publish more slowly, await `publish`, or raise `capacity`",
                    self.capacity
                ),
            )
            .with_context("topic", self.producer.topic())),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.closed_error()),
        }
    }

    /// Messages waiting in the queue.
    pub fn queued(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    /// Messages confirmed by the broker so far.
    pub fn sent(&self) -> u64 {
        self.state.sent.load(Ordering::Relaxed)
    }

    /// Messages whose retries ran out (kept for `flush` or dropped, per the config).
    pub fn failed(&self) -> u64 {
        self.state.failed.load(Ordering::Relaxed)
    }

    /// Messages dropped after their retries ran out (`drop_after_retries`).
    pub fn dropped(&self) -> u64 {
        self.producer.dropped()
    }

    /// Waits until everything queued before this call was confirmed; returns the first send
    /// failure since the last flush (with the count of failures in its context), if any.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Flush(tx))
            .await
            .map_err(|_| self.closed_error())?;
        rx.await.map_err(|_| self.closed_error())?
    }

    /// Flushes, stops the background task and closes the producer. Later publishes fail with
    /// [`ErrorKind::Closed`].
    pub async fn close(&self) -> Result<()> {
        if self.state.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let flushed = self.flush().await;
        let task = self.task.lock().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        let closed = self.producer.close().await;
        flushed.and(closed)
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", self.producer.topic())
            .field("capacity", &self.capacity)
            .field("queued", &self.queued())
            .field("sent", &self.sent())
            .field("failed", &self.failed())
            .finish()
    }
}

async fn sender(
    mut rx: mpsc::Receiver<Command>,
    producer: Arc<RetryingProducer>,
    state: Arc<State>,
    config: PublisherConfig,
) {
    let mut in_flight = FuturesUnordered::new();
    let record = |r: Result<tg_backend_api::MessageId>| match r {
        Ok(_) => {
            state.sent.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            state.failed.fetch_add(1, Ordering::Relaxed);
            if config.drop_after_retries {
                producer.note_drop(&e);
            } else {
                tracing::warn!(topic = %producer.topic(), error = %e, "publish failed after retries");
                let mut f = state.failures.lock();
                // Keep the first few; the count is in `failed`.
                if f.len() < 16 {
                    f.push(e);
                }
            }
        }
    };
    loop {
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => record(done),
            cmd = rx.recv(), if in_flight.len() < config.max_in_flight.max(1) => match cmd {
                None => break,
                Some(Command::Send(msg)) => {
                    producer.metrics().queue_depth.dec();
                    let p = producer.clone();
                    in_flight.push(async move { p.send(msg).await });
                }
                Some(Command::Flush(reply)) => {
                    while let Some(done) = in_flight.next().await {
                        record(done);
                    }
                    let flushed = producer.flush().await;
                    let mut failures = std::mem::take(&mut *state.failures.lock());
                    let result = if failures.is_empty() {
                        flushed
                    } else {
                        let n = failures.len();
                        let first = failures.swap_remove(0);
                        Err(first.with_context("failed_since_last_flush", n))
                    };
                    let _ = reply.send(result);
                }
            },
        }
    }
    while let Some(done) = in_flight.next().await {
        record(done);
    }
}
