//! A producer that retries temporary errors and recreates its backend producer after
//! connection errors.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tg_backend_api::{
    Backend, Error, ErrorKind, MessageId, OutboundMessage, Producer, ProducerOptions, Result, Topic,
};
use tokio::time::Instant;

use crate::metrics::{ProducerMetrics, RuntimeMetrics};
use crate::Backoff;

/// How a [`RetryingProducer`] retries.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Tries per message, the first included. Default: 10.
    pub max_attempts: u32,
    /// No new try starts after this long since the first. Default: 30 s.
    pub max_elapsed: Duration,
    /// Delay between tries after a temporary error other than a connection error.
    /// Default: 100 ms doubling to 5 s, full jitter.
    pub backoff: Backoff,
    /// Delay between tries after a connection error (the backend producer is recreated before
    /// the next try). Default: [`Backoff::reconnect`] (50 ms doubling to 1 s, full jitter).
    pub reconnect: Backoff,
    /// Options for the backend producer.
    pub options: ProducerOptions,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            max_elapsed: Duration::from_secs(30),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            reconnect: Backoff::reconnect(),
            options: ProducerOptions::default(),
        }
    }
}

impl ProducerConfig {
    /// Sets `max_attempts` (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets `max_elapsed`.
    #[must_use]
    pub fn max_elapsed(mut self, d: Duration) -> Self {
        self.max_elapsed = d;
        self
    }

    /// Sets `backoff`.
    #[must_use]
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// Sets `reconnect`.
    #[must_use]
    pub fn reconnect(mut self, b: Backoff) -> Self {
        self.reconnect = b;
        self
    }

    /// Sets the backend producer options.
    #[must_use]
    pub fn options(mut self, o: ProducerOptions) -> Self {
        self.options = o;
        self
    }
}

/// Sends to one topic, retrying temporary errors ([`Error::is_temporary`]) with exponential
/// back-off and full jitter, bounded by [`ProducerConfig::max_attempts`] and
/// [`ProducerConfig::max_elapsed`]. After a [`ErrorKind::Connection`] error the backend producer
/// is dropped and recreated from the backend before the next try. When the retries run out the
/// last error is returned, its message saying so and how many tries were made; permanent errors
/// (`PayloadTooLarge`, `Unsupported`, …) are returned at once.
///
/// Each try re-sends the same message (a clone), so a try whose receipt was lost may be
/// delivered twice: on q2 topics the backend de-duplicates on the `tg-dedup-id` property, which
/// this producer sets once, before the first try.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::sync::Arc;
/// use tg_backend_api::{Backend, OutboundMessage};
/// use tg_runtime::{ProducerConfig, RetryingProducer};
///
/// let backend: Arc<dyn Backend> = Arc::new(tg_backend_memory::MemoryBackend::new());
/// let producer = RetryingProducer::new(backend, tg_topic::topic("events")?, ProducerConfig::default());
/// producer.send(OutboundMessage::new("hello")).await?;
/// producer.close().await
/// # }
/// ```
pub struct RetryingProducer {
    backend: Arc<dyn Backend>,
    topic: Topic,
    config: ProducerConfig,
    current: Mutex<Option<Arc<dyn Producer>>>,
    metrics: ProducerMetrics,
    dropped: AtomicU64,
    created: AtomicU64,
}

impl RetryingProducer {
    /// A producer for `topic`; the backend producer is created on the first send.
    pub fn new(backend: Arc<dyn Backend>, topic: Topic, config: ProducerConfig) -> Self {
        Self::with_metrics(backend, topic, config, None)
    }

    /// Same, reporting into `metrics`.
    pub fn with_metrics(
        backend: Arc<dyn Backend>,
        topic: Topic,
        config: ProducerConfig,
        metrics: Option<&RuntimeMetrics>,
    ) -> Self {
        let metrics = match metrics {
            Some(m) => m.producer(topic.as_str()),
            None => RuntimeMetrics::unregistered().producer(topic.as_str()),
        };
        Self {
            backend,
            topic,
            config,
            current: Mutex::new(None),
            metrics,
            dropped: AtomicU64::new(0),
            created: AtomicU64::new(0),
        }
    }

    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Messages dropped by [`send_or_drop`](Self::send_or_drop).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Backend producers created so far (1 + reconnections, once something was sent).
    pub fn connections(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    pub(crate) fn metrics(&self) -> &ProducerMetrics {
        &self.metrics
    }

    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        if let Some(p) = self.current.lock().clone() {
            return Ok(p);
        }
        let created: Arc<dyn Producer> = Arc::from(
            self.backend
                .create_producer(&self.topic, self.config.options.clone())
                .await?,
        );
        let mut slot = self.current.lock();
        if let Some(p) = slot.clone() {
            // Another task reconnected first; keep its producer.
            drop(slot);
            tokio::spawn(async move { created.close().await });
            return Ok(p);
        }
        *slot = Some(created.clone());
        if self.created.fetch_add(1, Ordering::Relaxed) > 0 {
            self.metrics.connection.reconnects.inc();
            tracing::info!(topic = %self.topic, "producer reconnected");
        }
        self.metrics.connection.connected.set(1);
        Ok(created)
    }

    fn invalidate(&self, failed: &Arc<dyn Producer>) {
        let mut slot = self.current.lock();
        if slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, failed)) {
            *slot = None;
            self.metrics.connection.connected.set(0);
            let old = failed.clone();
            tokio::spawn(async move {
                let _ = old.close().await;
            });
        }
    }

    /// Sends `message` and waits for the broker to accept it, retrying as configured.
    pub async fn send(&self, mut message: OutboundMessage) -> Result<MessageId> {
        if self.topic.qos() == tg_topic::Qos::Q2 {
            message.ensure_dedup_id();
        }
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut producer = None;
            let result = match self.producer().await {
                Ok(p) => {
                    producer = Some(p.clone());
                    match p.send(message.clone()).await {
                        Ok(receipt) => receipt.await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            let err = match result {
                Ok(id) => {
                    self.metrics.ok.inc();
                    return Ok(id);
                }
                Err(e) => e,
            };
            if err.kind() == ErrorKind::Connection {
                if let Some(p) = &producer {
                    self.invalidate(p);
                }
            }
            let elapsed = started.elapsed();
            if !err.is_temporary() {
                self.metrics.failed.inc();
                return Err(err);
            }
            if attempt >= self.config.max_attempts || elapsed >= self.config.max_elapsed {
                self.metrics.failed.inc();
                return Err(Error::new(
                    err.kind(),
                    format!(
                        "retries ran out: sending failed {attempt} times over {:.1} s; last error: {}",
                        elapsed.as_secs_f64(),
                        err.message()
                    ),
                )
                .set_temporary(false)
                .with_context("topic", &self.topic)
                .with_context("attempts", attempt)
                .with_source(err));
            }
            let delay = if err.kind() == ErrorKind::Connection {
                self.config.reconnect.delay(attempt)
            } else {
                self.config.backoff.delay(attempt)
            };
            self.metrics.retried.inc();
            tracing::debug!(topic = %self.topic, attempt, ?delay, error = %err, "send failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Like [`send`](Self::send), but once the retries run out the message is dropped: the drop
    /// is counted ([`dropped`](Self::dropped), metric `tg_pubsub_published_total{outcome="dropped"}`)
    /// and logged at `warn` with the error, and `None` is returned. Spec 003 FR-018 asks for this
    /// behaviour; use it only where losing a message is acceptable.
    pub async fn send_or_drop(&self, message: OutboundMessage) -> Option<MessageId> {
        match self.send(message).await {
            Ok(id) => Some(id),
            Err(err) => {
                self.note_drop(&err);
                None
            }
        }
    }

    pub(crate) fn note_drop(&self, err: &Error) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.dropped.inc();
        tracing::warn!(topic = %self.topic, dropped_total = n, error = %err, "message dropped after retries");
    }

    /// Waits until everything sent was accepted.
    pub async fn flush(&self) -> Result<()> {
        let current = self.current.lock().clone();
        match current {
            Some(p) => p.flush().await,
            None => Ok(()),
        }
    }

    /// Flushes and closes the backend producer.
    pub async fn close(&self) -> Result<()> {
        let current = self.current.lock().take();
        self.metrics.connection.connected.set(0);
        match current {
            Some(p) => p.close().await,
            None => Ok(()),
        }
    }
}

impl fmt::Debug for RetryingProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryingProducer")
            .field("topic", &self.topic)
            .field("config", &self.config)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}
