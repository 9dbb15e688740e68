//! The consumer runner: a typed handler over one subscription, with concurrency, retries,
//! dead-lettering, per-key ordering, reconnection and graceful shutdown.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use parking_lot::Mutex;
use tg_backend_api::{
    Backend, ConsumerOptions, Error, ErrorKind, Message, MessageId, OutboundMessage, Qos, Result,
    Topic, TypedConsumer, TypedMessage,
};
use tg_schema::{Codec, JsonCodec};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::metrics::{ConsumerMetrics, RuntimeMetrics};
use crate::{
    Backoff, Deduplicator, Handler, HandlerError, HandlerErrorKind, ProducerConfig,
    RetryingProducer,
};

/// Suffix added to the queue name for the default dead-letter topic: `orders` → `orders:dlq`.
pub const DEAD_LETTER_SUFFIX: &str = ":dlq";
/// Dead-letter property: the topic the message came from.
pub const DLQ_TOPIC_PROPERTY: &str = "tg-dlq-topic";
/// Dead-letter property: the subscription that gave up on it.
pub const DLQ_SUBSCRIPTION_PROPERTY: &str = "tg-dlq-subscription";
/// Dead-letter property: the last error text (at most 4096 bytes).
pub const DLQ_ERROR_PROPERTY: &str = "tg-dlq-error";
/// Dead-letter property: how many times the message was handled (decimal).
pub const DLQ_ATTEMPTS_PROPERTY: &str = "tg-dlq-attempts";
/// Dead-letter property: why — `failed` (attempts ran out), `permanent` (the handler said so),
/// `decode` (the payload does not decode into the handler's type).
pub const DLQ_REASON_PROPERTY: &str = "tg-dlq-reason";
/// Dead-letter property: the message's id on the source topic.
pub const DLQ_MESSAGE_ID_PROPERTY: &str = "tg-dlq-message-id";

const MAX_ERROR_TEXT: usize = 4096;

/// Where messages go when the runner gives up on them.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeadLetter {
    /// Same tenant and namespace, queue `{queue}:dlq` ([`DEAD_LETTER_SUFFIX`]); q1 when the source
    /// is q0 (dead letters are kept for someone to look at), else the source's qos. The default.
    #[default]
    Default,
    /// This topic.
    Topic(Topic),
    /// No dead-letter topic: a message whose attempts ran out is negatively acknowledged again
    /// after the longest retry delay, forever (it is never dropped).
    Disabled,
}

impl DeadLetter {
    /// The dead-letter topic for `source`, if any.
    pub fn topic_for(&self, source: &Topic) -> Result<Option<Topic>> {
        Ok(match self {
            DeadLetter::Default => {
                let queue = format!("{}{DEAD_LETTER_SUFFIX}", source.queue());
                let qos = if source.qos() == Qos::Q0 {
                    Qos::Q1
                } else {
                    source.qos()
                };
                Some(source.with_queue(&queue)?.with_qos(qos))
            }
            DeadLetter::Topic(t) => Some(t.clone()),
            DeadLetter::Disabled => None,
        })
    }
}

/// Which messages must be handled one after another.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KeyOrdering {
    /// No ordering: up to `concurrency` messages in flight in any order. The default.
    #[default]
    None,
    /// Messages with the same [`Message::key`] are handled one after another, in the order
    /// received; messages without a key are not ordered.
    MessageKey,
    /// Same, keyed by this property.
    Property(String),
}

/// How a [`ConsumerRunner`] runs. Every field has a default; see each.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Messages handled at once (received but not yet acknowledged, queued per key included).
    /// Default: 16.
    pub concurrency: usize,
    /// Handling attempts before a failing message is dead-lettered. Default: 5.
    pub max_attempts: u32,
    /// Delay before a failed message is handled again, growing per attempt.
    /// Default: 100 ms doubling to 10 s, full jitter.
    pub retry_backoff: Backoff,
    /// Delay before a rate-limited message is handled again, growing per consecutive
    /// rate-limited reply (a handler's `retry_after` hint is a lower bound).
    /// Default: 1 s doubling to 30 s, full jitter.
    pub rate_limit_backoff: Backoff,
    /// Where given-up messages go. Default: [`DeadLetter::Default`].
    pub dead_letter: DeadLetter,
    /// Per-key ordering. Default: none.
    pub ordering: KeyOrdering,
    /// Longest single wait in `receive`; shutdown is noticed within it. Default: 100 ms.
    pub poll_interval: Duration,
    /// How long shutdown waits for in-flight handlers. Default: 30 s.
    pub shutdown_timeout: Duration,
    /// Delay between attempts to recreate the consumer after a connection error.
    /// Default: [`Backoff::reconnect`] (50 ms doubling to 1 s, full jitter).
    pub reconnect_backoff: Backoff,
    /// Messages whose attempts are counted in process (backends without a redelivery count).
    /// Default: 10,000.
    pub attempt_cache: usize,
    /// Retry policy of the dead-letter producer.
    pub dead_letter_producer: ProducerConfig,
    /// Batch mode when above 1: each worker receives up to this many messages at once, hands
    /// them to the handler's [`handle_batch`](crate::Handler::handle_batch) (a
    /// [`BatchHandler`](crate::BatchHandler) gets them all in one call) and acknowledges the
    /// successes in one request; failures follow the single-message rules one by one.
    /// Not with key ordering. Default: 1 (one message at a time).
    pub max_batch: usize,
    /// In batch mode, how long a worker waits for more messages after the first before it
    /// hands over a batch smaller than `max_batch`. Default: 0 (what is there).
    pub max_wait: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_attempts: 5,
            retry_backoff: Backoff::default(),
            rate_limit_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            dead_letter: DeadLetter::Default,
            ordering: KeyOrdering::None,
            poll_interval: Duration::from_millis(100),
            shutdown_timeout: Duration::from_secs(30),
            reconnect_backoff: Backoff::reconnect(),
            attempt_cache: 10_000,
            dead_letter_producer: ProducerConfig::default(),
            max_batch: 1,
            max_wait: Duration::ZERO,
        }
    }
}

macro_rules! setters {
    ($($(#[$m:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $( $(#[$m])* #[must_use] pub fn $name(mut self, value: $ty) -> Self { self.$name = value; self } )*
    };
}

impl RunnerConfig {
    setters! {
        /// Sets `concurrency` (0 is taken as 1).
        concurrency: usize,
        /// Sets `max_attempts` (0 is taken as 1).
        max_attempts: u32,
        /// Sets `retry_backoff`.
        retry_backoff: Backoff,
        /// Sets `rate_limit_backoff`.
        rate_limit_backoff: Backoff,
        /// Sets `dead_letter`.
        dead_letter: DeadLetter,
        /// Sets `ordering`.
        ordering: KeyOrdering,
        /// Sets `poll_interval`.
        poll_interval: Duration,
        /// Sets `shutdown_timeout`.
        shutdown_timeout: Duration,
        /// Sets `reconnect_backoff`.
        reconnect_backoff: Backoff,
        /// Sets `attempt_cache`.
        attempt_cache: usize,
        /// Sets `dead_letter_producer`.
        dead_letter_producer: ProducerConfig,
        /// Sets `max_batch` (0 is taken as 1).
        max_batch: usize,
        /// Sets `max_wait`.
        max_wait: Duration,
    }
}

type DedupKey<T> = Arc<dyn Fn(&TypedMessage<T>) -> Option<String> + Send + Sync>;

/// Runs a [`Handler`] over one subscription of a typed topic.
///
/// - Up to [`RunnerConfig::concurrency`] messages are in flight; each handler runs in its own
///   task, and a panic is caught and treated as an error.
/// - `Ok` → acknowledged. [`HandlerErrorKind::Failed`] or a panic → handled again after
///   [`RunnerConfig::retry_backoff`]`.delay(attempt)`; once [`RunnerConfig::max_attempts`] attempts
///   failed the message is published to the dead-letter topic with the `tg-dlq-*` properties
///   (plus its own) and acknowledged on the source. [`HandlerErrorKind::Permanent`] and payloads that
///   do not decode go to the dead-letter topic at once. [`HandlerErrorKind::RateLimited`] waits
///   [`RunnerConfig::rate_limit_backoff`] and tries again without counting an attempt.
/// - Retry mechanics: where the backend redelivers negatively acknowledged messages
///   ([`Capabilities::nack_redelivery`](tg_backend_api::Capabilities)) and no ordering is asked for,
///   the message is negatively acknowledged once its delay has passed (the delay runs in its own
///   task and holds no concurrency slot); otherwise it is retried in place, holding its slot (and its
///   key's turn). Attempts are `redelivery_count + 1` where the backend counts redeliveries, else
///   counted in process per message id (bounded by [`RunnerConfig::attempt_cache`]).
/// - A connection error from `receive` recreates the consumer with [`RunnerConfig::reconnect_backoff`];
///   messages in flight are acknowledged on the consumer that received them.
/// - Shutdown ([`RunnerHandle::shutdown`] or the token given to [`run`](Self::run)): receiving stops,
///   handlers in flight get [`RunnerConfig::shutdown_timeout`] to finish and are acknowledged,
///   messages waiting for a retry are negatively acknowledged at once, then the consumer is closed.
///   Handlers still running at the deadline are dropped unacknowledged (the backend redelivers them).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::sync::Arc;
/// use tg_backend_api::{Backend, BackendExt, ConsumerOptions, TypedMessage};
/// use tg_runtime::{ConsumerRunner, HandlerError, RunnerConfig};
///
/// let backend: Arc<dyn Backend> = Arc::new(tg_backend_memory::MemoryBackend::new());
/// let topic = tg_topic::topic("greetings")?;
/// let handler = |msg: TypedMessage<String>| async move {
///     println!("hello {}", msg.value());
///     Ok::<(), HandlerError>(())
/// };
/// let runner = ConsumerRunner::new(backend.clone(), topic.clone(), ConsumerOptions::new("greeter"), handler)
///     .config(RunnerConfig::default().concurrency(8))
///     .start()
///     .await?;
/// backend.typed_producer::<String>(&topic).await?.send(&"world".to_owned()).await?;
/// # tokio::time::sleep(std::time::Duration::from_millis(50)).await;
/// let report = runner.shutdown().await?;
/// assert_eq!(report.stats.succeeded, 1);
/// # Ok(()) }
/// ```
pub struct ConsumerRunner<T, H, C = JsonCodec> {
    backend: Arc<dyn Backend>,
    topic: Topic,
    options: ConsumerOptions,
    handler: H,
    codec: C,
    config: RunnerConfig,
    metrics: Option<Arc<RuntimeMetrics>>,
    dedup: Option<(Arc<Deduplicator>, DedupKey<T>)>,
}

impl<T, H> ConsumerRunner<T, H, JsonCodec>
where
    T: tg_schema::Message,
    H: Handler<T>,
{
    /// A runner of `handler` over subscription `options` of `topic`, JSON codec, default config.
    pub fn new(
        backend: Arc<dyn Backend>,
        topic: Topic,
        options: ConsumerOptions,
        handler: H,
    ) -> Self {
        Self {
            backend,
            topic,
            options,
            handler,
            codec: JsonCodec,
            config: RunnerConfig::default(),
            metrics: None,
            dedup: None,
        }
    }
}

impl<T, H, C> ConsumerRunner<T, H, C>
where
    T: tg_schema::Message,
    H: Handler<T>,
    C: Codec,
{
    /// Uses another codec.
    pub fn with_codec<C2: Codec>(self, codec: C2) -> ConsumerRunner<T, H, C2> {
        ConsumerRunner {
            backend: self.backend,
            topic: self.topic,
            options: self.options,
            handler: self.handler,
            codec,
            config: self.config,
            metrics: self.metrics,
            dedup: self.dedup,
        }
    }

    /// Sets the configuration.
    #[must_use]
    pub fn config(mut self, config: RunnerConfig) -> Self {
        self.config = config;
        self
    }

    /// Reports into these metrics.
    #[must_use]
    pub fn metrics(mut self, metrics: Arc<RuntimeMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Drops messages whose id (`key` of the message; `None` = never a duplicate) was already
    /// handled successfully or is being handled. An id is forgotten again when its handling fails,
    /// so the retry is handled. Typical keys: the envelope id, or the `id` property.
    #[must_use]
    pub fn deduplicate(
        mut self,
        seen: Arc<Deduplicator>,
        key: impl Fn(&TypedMessage<T>) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.dedup = Some((seen, Arc::new(key)));
        self
    }

    /// Creates the consumer (so the subscription exists when this returns) and runs the receive
    /// loop in a task. Fails if the consumer cannot be created (after retrying connection errors
    /// for [`RunnerConfig::shutdown_timeout`]).
    pub async fn start(self) -> Result<RunnerHandle> {
        self.start_with_token(CancellationToken::new()).await
    }

    /// Like [`start`](Self::start), stopping when `token` is cancelled (share one token between
    /// runners and [`cancel_on_signal`](crate::cancel_on_signal)).
    pub async fn start_with_token(self, token: CancellationToken) -> Result<RunnerHandle> {
        let (shared, first) = self.prepare(token.clone()).await?;
        let stats = shared.stats.clone();
        let join = tokio::spawn(run_loop(shared, first));
        Ok(RunnerHandle { token, join, stats })
    }

    /// Creates the consumer and runs until `shutdown` is cancelled, then shuts down gracefully and
    /// returns what happened.
    pub async fn run(self, shutdown: CancellationToken) -> Result<RunReport> {
        let (shared, first) = self.prepare(shutdown).await?;
        run_loop(shared, first).await
    }

    async fn prepare(
        self,
        stop: CancellationToken,
    ) -> Result<(Arc<Shared<T, H, C>>, Arc<Gen<T, C>>)> {
        self.options.validate()?;
        let caps = self.backend.capabilities(self.topic.qos());
        let metrics = self
            .metrics
            .as_ref()
            .map(|m| m.consumer(self.topic.as_str(), &self.options.subscription));
        let dlq = self.config.dead_letter.topic_for(&self.topic)?.map(|t| {
            RetryingProducer::with_metrics(
                self.backend.clone(),
                t,
                self.config.dead_letter_producer.clone(),
                self.metrics.as_deref(),
            )
        });
        let mut config = self.config;
        config.concurrency = config.concurrency.max(1);
        config.max_attempts = config.max_attempts.max(1);
        config.max_batch = config.max_batch.max(1);
        let dispatcher_mode = config.ordering != KeyOrdering::None;
        if dispatcher_mode && config.max_batch > 1 {
            return Err(Error::config(
                "a runner handles batches or keeps per-key order, not both: set max_batch to 1 or ordering to None",
            ));
        }
        let retry_in_place = dispatcher_mode || !caps.nack_redelivery;
        let workers = if dispatcher_mode {
            0
        } else {
            config.concurrency
        };
        let shared = Arc::new(Shared {
            backend: self.backend,
            topic: self.topic,
            options: self.options,
            handler: self.handler,
            codec: self.codec,
            semaphore: Arc::new(Semaphore::new(config.concurrency)),
            attempts: Mutex::new(AttemptCache::new(config.attempt_cache)),
            config,
            use_redelivery_count: caps.redelivery_count,
            retry_in_place,
            metrics,
            stats: Arc::new(Stats::new(workers)),
            dlq,
            dedup: self.dedup,
            stop,
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
            lanes: Mutex::new(HashMap::new()),
            dispatcher_mode,
            stopping: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
            slot: Slot {
                current: parking_lot::RwLock::new(None),
                connecting: tokio::sync::Mutex::new(()),
            },
            stopped_by: Mutex::new(None),
        });
        let first = shared.connect(true).await?;
        Ok((shared, first))
    }
}

impl<T, H, C: fmt::Debug> fmt::Debug for ConsumerRunner<T, H, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerRunner")
            .field("topic", &self.topic)
            .field("options", &self.options)
            .field("codec", &self.codec)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A running [`ConsumerRunner`].
#[derive(Debug)]
pub struct RunnerHandle {
    token: CancellationToken,
    join: JoinHandle<Result<RunReport>>,
    stats: Arc<Stats>,
}

impl RunnerHandle {
    /// The token that stops the runner (cancel it from a signal handler, for example).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> RunStats {
        self.stats.snapshot()
    }

    /// Stops the runner gracefully (see [`ConsumerRunner`]) and returns what happened.
    pub async fn shutdown(self) -> Result<RunReport> {
        self.token.cancel();
        self.wait().await
    }

    /// Waits for the runner to stop (after its token was cancelled or the backend closed).
    pub async fn wait(self) -> Result<RunReport> {
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(Error::new(
                ErrorKind::Unexpected,
                format!("the runner task failed: {e}"),
            )),
        }
    }
}

/// What a runner did.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Counters.
    pub stats: RunStats,
    /// Handlers still running at the shutdown deadline, dropped unacknowledged.
    pub abandoned: usize,
    /// Why the runner stopped on its own (e.g. the backend was closed), if it did.
    pub stopped_by: Option<String>,
}

/// Counters of a runner.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Messages received.
    pub received: u64,
    /// Handled and acknowledged.
    pub succeeded: u64,
    /// Handler errors (each failed attempt).
    pub failed: u64,
    /// Handler panics (also counted in `failed`).
    pub panicked: u64,
    /// Rate-limited replies.
    pub rate_limited: u64,
    /// Negative acknowledgements sent.
    pub nacked: u64,
    /// Sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Dropped as duplicates.
    pub duplicates: u64,
    /// Acknowledgements that failed (the message will come again).
    pub ack_errors: u64,
    /// Consumers recreated after connection errors.
    pub reconnects: u64,
}

#[derive(Debug, Default)]
struct Stats {
    /// Received and succeeded by receive loops other than the workers (ordering mode), and
    /// successful retries.
    received: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    rate_limited: AtomicU64,
    nacked: AtomicU64,
    dead_lettered: AtomicU64,
    duplicates: AtomicU64,
    ack_errors: AtomicU64,
    reconnects: AtomicU64,
    /// Handlers running outside the workers (lanes, retries).
    running: AtomicU64,
    /// The workers' own counts.
    workers: Box<[WorkerTally]>,
}

/// The counts of one worker, which it alone writes: a plain load and store per count instead of
/// a locked read-modify-write (on the memory backend each of those is a visible part of a
/// message's cost). A cache line of its own, so workers on different threads share none.
#[derive(Debug, Default)]
#[repr(align(128))]
struct WorkerTally {
    received: AtomicU64,
    succeeded: AtomicU64,
    /// 1 while its handler runs.
    running: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds one to a counter only the calling task writes.
#[inline]
fn inc_own(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Where a [`drive`] loop counts: its worker's tally, or the shared counters.
#[derive(Clone, Copy)]
struct Tally<'a> {
    stats: &'a Stats,
    own: Option<&'a WorkerTally>,
}

impl Tally<'_> {
    #[inline]
    fn received(self) {
        match self.own {
            Some(t) => inc_own(&t.received),
            None => inc(&self.stats.received),
        }
    }

    #[inline]
    fn succeeded(self) {
        match self.own {
            Some(t) => inc_own(&t.succeeded),
            None => inc(&self.stats.succeeded),
        }
    }

    #[inline]
    fn running(self, running: bool) {
        match self.own {
            Some(t) => t.running.store(u64::from(running), Ordering::Relaxed),
            None if running => inc(&self.stats.running),
            None => {
                self.stats.running.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Stats {
    fn new(workers: usize) -> Self {
        Self {
            workers: (0..workers).map(|_| WorkerTally::default()).collect(),
            ..Self::default()
        }
    }

    /// Handlers running now.
    fn running(&self) -> u64 {
        let own: u64 = self
            .workers
            .iter()
            .map(|w| w.running.load(Ordering::Relaxed))
            .sum();
        own + self.running.load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> RunStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let sum = |f: fn(&WorkerTally) -> &AtomicU64| -> u64 {
            self.workers.iter().map(|w| g(f(w))).sum()
        };
        RunStats {
            received: g(&self.received) + sum(|w| &w.received),
            succeeded: g(&self.succeeded) + sum(|w| &w.succeeded),
            failed: g(&self.failed),
            panicked: g(&self.panicked),
            rate_limited: g(&self.rate_limited),
            nacked: g(&self.nacked),
            dead_lettered: g(&self.dead_lettered),
            duplicates: g(&self.duplicates),
            ack_errors: g(&self.ack_errors),
            reconnects: g(&self.reconnects),
        }
    }
}

/// One backend consumer; closed when the last message it delivered is done with it.
struct Gen<T: tg_schema::Message, C: Codec> {
    consumer: Arc<TypedConsumer<T, C>>,
    closed: AtomicBool,
    /// Set when it is no longer the current consumer (a connection error): workers keep the
    /// current one between messages and look here instead of at the slot's lock.
    retired: AtomicBool,
}

impl<T: tg_schema::Message, C: Codec> Drop for Gen<T, C> {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let c = self.consumer.clone();
                rt.spawn(async move {
                    let _ = TypedConsumer::inner(&c).close().await;
                });
            }
        }
    }
}

struct Job<T: tg_schema::Message, C: Codec> {
    gen: Arc<Gen<T, C>>,
    raw: Message,
    permit: Option<OwnedSemaphorePermit>,
}

/// Attempts counted in process, for backends without a redelivery count.
struct AttemptCache {
    capacity: usize,
    counts: HashMap<MessageId, u32>,
    order: VecDeque<MessageId>,
}

impl AttemptCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            counts: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, id: &MessageId) -> u32 {
        self.counts.get(id).copied().unwrap_or(0)
    }

    fn set(&mut self, id: &MessageId, failures: u32) {
        if self.counts.insert(id.clone(), failures).is_none() {
            self.order.push_back(id.clone());
        }
        while self.counts.len() > self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.counts.remove(&old);
                }
                None => break,
            }
        }
        // Keep the order queue from growing with ids already removed.
        if self.order.len() > self.capacity * 2 {
            let counts = &self.counts;
            self.order.retain(|id| counts.contains_key(id));
        }
    }

    fn remove(&mut self, id: &MessageId) {
        self.counts.remove(id);
    }
}

struct Shared<T: tg_schema::Message, H, C: Codec> {
    backend: Arc<dyn Backend>,
    topic: Topic,
    options: ConsumerOptions,
    handler: H,
    codec: C,
    config: RunnerConfig,
    semaphore: Arc<Semaphore>,
    attempts: Mutex<AttemptCache>,
    use_redelivery_count: bool,
    retry_in_place: bool,
    metrics: Option<ConsumerMetrics>,
    stats: Arc<Stats>,
    dlq: Option<RetryingProducer>,
    dedup: Option<(Arc<Deduplicator>, DedupKey<T>)>,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
    lanes: Mutex<HashMap<String, VecDeque<Job<T, C>>>>,
    dispatcher_mode: bool,
    /// Mirrors of `stop`/`abort` for the per-message checks (a token's `is_cancelled` locks a mutex).
    stopping: AtomicBool,
    aborting: AtomicBool,
    slot: Slot<T, C>,
    stopped_by: Mutex<Option<String>>,
}

/// The current backend consumer, recreated after connection errors (one task at a time).
struct Slot<T: tg_schema::Message, C: Codec> {
    current: parking_lot::RwLock<Option<Arc<Gen<T, C>>>>,
    connecting: tokio::sync::Mutex<()>,
}

impl<T: tg_schema::Message, C: Codec> Slot<T, C> {
    fn invalidate(&self, failed: &Arc<Gen<T, C>>) -> bool {
        let mut cur = self.current.write();
        failed.retired.store(true, Ordering::Release);
        if cur.as_ref().is_some_and(|g| Arc::ptr_eq(g, failed)) {
            *cur = None;
            true
        } else {
            false
        }
    }

    fn take(&self) -> Option<Arc<Gen<T, C>>> {
        self.current.write().take()
    }
}

enum Outcome {
    Ok,
    Err(HandlerError),
    Aborted,
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Sleeps `delay`; `false` if shutdown started first.
async fn sleep_unless(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

impl<T, H, C> Shared<T, H, C>
where
    T: tg_schema::Message,
    H: Handler<T>,
    C: Codec,
{
    /// Creates a consumer, retrying connection errors with the reconnect back-off until it works
    /// or shutdown starts. `first`: non-temporary errors are returned (bad config).
    async fn connect(&self, first: bool) -> Result<Arc<Gen<T, C>>> {
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self
                .backend
                .create_consumer(&self.topic, self.options.clone())
                .await
            {
                Ok(c) => {
                    if let Some(m) = &self.metrics {
                        m.connection.connected.set(1);
                    }
                    if !first {
                        inc(&self.stats.reconnects);
                        if let Some(m) = &self.metrics {
                            m.connection.reconnects.inc();
                        }
                        tracing::info!(topic = %self.topic, subscription = %self.options.subscription, attempt, "consumer reconnected");
                    }
                    return Ok(Arc::new(Gen {
                        consumer: Arc::new(TypedConsumer::with_codec(c, self.codec.clone())),
                        closed: AtomicBool::new(false),
                        retired: AtomicBool::new(false),
                    }));
                }
                Err(e) => {
                    let give_up = !e.is_temporary()
                        || (first && started.elapsed() >= self.config.shutdown_timeout);
                    if give_up && (first || e.kind() == ErrorKind::Closed) {
                        return Err(e);
                    }
                    let delay = self.config.reconnect_backoff.delay(attempt);
                    tracing::warn!(topic = %self.topic, attempt, ?delay, error = %e, "cannot create consumer; retrying");
                    if !sleep_unless(&self.stop, delay).await {
                        return Err(Error::closed("runner"));
                    }
                }
            }
        }
    }

    /// The current consumer, creating one if there is none.
    async fn consumer(&self) -> Result<Arc<Gen<T, C>>> {
        if let Some(g) = self.slot.current.read().clone() {
            return Ok(g);
        }
        // The reconnect path lives in its own (boxed) future so the receive loop's stays small.
        Box::pin(self.recreate_consumer()).await
    }

    /// Creates the next consumer, one task at a time.
    async fn recreate_consumer(&self) -> Result<Arc<Gen<T, C>>> {
        let _one_at_a_time = self.slot.connecting.lock().await;
        if let Some(g) = self.slot.current.read().clone() {
            return Ok(g);
        }
        let g = self.connect(false).await?;
        *self.slot.current.write() = Some(g.clone());
        Ok(g)
    }

    fn stopped_by(&self, e: &Error) {
        if !self.stop.is_cancelled() {
            tracing::error!(topic = %self.topic, error = %e, "the runner stops");
            self.stopped_by.lock().get_or_insert_with(|| e.to_string());
            self.stop.cancel();
        }
    }

    /// The current consumer for a receive loop, or `None` when it must stop (the reason noted).
    async fn current_or_stop(&self) -> Option<Arc<Gen<T, C>>> {
        match self.consumer().await {
            Ok(g) => Some(g),
            Err(e) => {
                if e.kind() == ErrorKind::Closed && !self.stop.is_cancelled() {
                    self.stopped_by(&e);
                }
                None
            }
        }
    }

    /// Where a receive loop counts (`worker`: its index).
    fn tally(&self, worker: Option<usize>) -> Tally<'_> {
        Tally {
            stats: &self.stats,
            own: worker.and_then(|i| self.stats.workers.get(i)),
        }
    }

    /// Counts a received message.
    #[inline]
    fn received(&self, tally: Tally<'_>) {
        tally.received();
        if let Some(m) = &self.metrics {
            m.received.inc();
        }
    }

    /// Receives once. `Ok(None)`: nothing came (or a recoverable error, after its back-off);
    /// `Err(())`: stop.
    async fn receive_one(
        &self,
        errors: &mut u32,
    ) -> std::result::Result<Option<(Arc<Gen<T, C>>, Message)>, ()> {
        let Some(gen) = self.current_or_stop().await else {
            return Err(());
        };
        match TypedConsumer::inner(&gen.consumer)
            .receive(self.config.poll_interval)
            .await
        {
            Ok(raw) => {
                *errors = 0;
                self.received(self.tally(None));
                Ok(Some((gen, raw)))
            }
            Err(e) if e.kind() == ErrorKind::Timeout => Ok(None),
            Err(e) if e.kind() == ErrorKind::Closed => {
                self.stopped_by(&e);
                Err(())
            }
            Err(e) => Box::pin(self.after_receive_error(&gen, e, errors))
                .await
                .map(|()| None),
        }
    }

    /// A receive error: recreate the consumer on connection errors, back off on repeated ones.
    /// `Err(())`: stop.
    async fn after_receive_error(
        &self,
        gen: &Arc<Gen<T, C>>,
        e: Error,
        errors: &mut u32,
    ) -> std::result::Result<(), ()> {
        *errors += 1;
        if e.kind() == ErrorKind::Connection {
            if self.slot.invalidate(gen) {
                if let Some(m) = &self.metrics {
                    m.connection.connected.set(0);
                }
                tracing::warn!(topic = %self.topic, error = %e, "connection lost; recreating the consumer");
            }
            if *errors == 1 {
                return Ok(());
            }
        } else {
            tracing::warn!(topic = %self.topic, error = %e, "receive failed");
        }
        let delay = self.config.reconnect_backoff.delay(*errors);
        if sleep_unless(&self.stop, delay).await {
            Ok(())
        } else {
            Err(())
        }
    }

    fn ordering_key(&self, raw: &Message) -> Option<String> {
        match &self.config.ordering {
            KeyOrdering::None => None,
            KeyOrdering::MessageKey => raw.key().map(str::to_owned),
            KeyOrdering::Property(p) => raw.property(p).map(str::to_owned),
        }
    }

    /// Failed attempts counted in process so far (0 where the backend counts redeliveries).
    fn counted_failures(&self, raw: &Message) -> u32 {
        if self.use_redelivery_count {
            0
        } else {
            self.attempts.lock().get(raw.id())
        }
    }

    /// The number of the attempt about to run, given [`counted_failures`](Self::counted_failures).
    fn attempt(&self, raw: &Message, counted: u32) -> u32 {
        if self.use_redelivery_count {
            raw.redelivery_count().saturating_add(1)
        } else {
            counted.saturating_add(1)
        }
    }

    async fn ack(&self, gen: &Gen<T, C>, raw: &Message) {
        let result = TypedConsumer::inner(&gen.consumer).acknowledge(raw).await;
        self.acked(raw, result);
    }

    /// After an acknowledgement: count a failure, forget the attempts.
    #[inline]
    fn acked(&self, raw: &Message, result: Result<()>) {
        if let Err(e) = result {
            self.ack_failed(raw, &e);
        }
        if !self.use_redelivery_count {
            self.attempts.lock().remove(raw.id());
        }
    }

    #[cold]
    fn ack_failed(&self, raw: &Message, e: &Error) {
        inc(&self.stats.ack_errors);
        tracing::warn!(topic = %self.topic, message_id = %raw.id(), error = %e, "acknowledge failed; the message will be delivered again");
    }

    async fn nack(&self, gen: &Gen<T, C>, raw: &Message) {
        inc(&self.stats.nacked);
        if let Err(e) = TypedConsumer::inner(&gen.consumer)
            .negative_acknowledge(raw)
            .await
        {
            tracing::warn!(topic = %self.topic, message_id = %raw.id(), error = %e, "negative acknowledge failed");
        }
    }

    fn forget_dedup(&self, typed_key: Option<&str>) {
        if let (Some((seen, _)), Some(k)) = (&self.dedup, typed_key) {
            seen.forget(k);
        }
    }

    /// Before a handler runs: `Some(start time)` when the latency is measured.
    #[inline]
    fn handler_starts(&self, tally: Tally<'_>) -> Option<Instant> {
        tally.running(true);
        self.metrics.as_ref().map(|_| Instant::now())
    }

    /// After a handler ran (a panic is counted and becomes a [`HandlerErrorKind::Failed`]).
    #[inline]
    fn handler_ended(
        &self,
        started: Option<Instant>,
        result: std::thread::Result<std::result::Result<(), HandlerError>>,
    ) -> std::result::Result<(), HandlerError> {
        if let (Some(m), Some(started)) = (&self.metrics, started) {
            m.latency.observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(r) => r,
            Err(panic) => Err(self.panicked(&*panic)),
        }
    }

    #[cold]
    fn panicked(&self, panic: &(dyn std::any::Any + Send)) -> HandlerError {
        self.count_panic();
        HandlerError::from_panic(panic)
    }

    #[cold]
    fn count_panic(&self) {
        inc(&self.stats.panicked);
        if let Some(m) = &self.metrics {
            m.panic.inc();
        }
    }

    /// Runs the handler once (retries; the first attempt runs in [`drive`]).
    async fn run_handler(&self, msg: TypedMessage<T>) -> Outcome {
        let tally = self.tally(None);
        let started = self.handler_starts(tally);
        let fut = AssertUnwindSafe(self.handler.handle(msg)).catch_unwind();
        // Workers are aborted through their join handles; lane tasks watch the abort token.
        let result = if self.dispatcher_mode {
            tokio::select! {
                biased;
                _ = self.abort.cancelled() => None,
                r = fut => Some(r),
            }
        } else {
            Some(fut.await)
        };
        tally.running(false);
        let Some(result) = result else {
            return Outcome::Aborted;
        };
        match self.handler_ended(started, result) {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Err(e),
        }
    }

    /// The de-duplication check: `Err(())` for a duplicate (counted), else the key to forget if
    /// handling fails.
    #[inline]
    fn dedup_check(&self, typed: &TypedMessage<T>) -> std::result::Result<Option<String>, ()> {
        match &self.dedup {
            None => Ok(None),
            Some(_) => self.dedup_lookup(typed),
        }
    }

    fn dedup_lookup(&self, typed: &TypedMessage<T>) -> std::result::Result<Option<String>, ()> {
        let Some((seen, key)) = &self.dedup else {
            return Ok(None);
        };
        let Some(k) = key(typed) else {
            return Ok(None);
        };
        if seen.first_time(&k) {
            return Ok(Some(k));
        }
        inc(&self.stats.duplicates);
        if let Some(m) = &self.metrics {
            m.duplicate.inc();
        }
        tracing::debug!(topic = %self.topic, id = %k, "duplicate dropped");
        Err(())
    }

    /// A payload that does not decode: straight to the dead-letter topic.
    async fn undecodable(
        self: &Arc<Self>,
        gen: &Arc<Gen<T, C>>,
        raw: &Message,
        e: Error,
        attempt: u32,
    ) {
        tracing::warn!(topic = %self.topic, message_id = %raw.id(), error = %e, "poison message: payload does not decode");
        self.dead_letter(gen, raw, "decode", &e.to_string(), attempt)
            .await;
    }

    /// Retries, delays, dead-letters: everything after a failed attempt.
    async fn after_failure(
        self: &Arc<Self>,
        gen: Arc<Gen<T, C>>,
        raw: Message,
        mut permit: Option<OwnedSemaphorePermit>,
        mut attempt: u32,
        dedup_key: Option<String>,
        first_error: HandlerError,
    ) {
        let mut rate_limited = 0u32;
        let mut pending = Some(first_error);
        loop {
            let err = match pending.take() {
                Some(e) => e,
                None => {
                    let typed = match gen.consumer.decode(raw.clone()) {
                        Ok(t) => t,
                        Err(e) => {
                            self.dead_letter(&gen, &raw, "decode", &e.to_string(), attempt)
                                .await;
                            return;
                        }
                    };
                    match self.run_handler(typed).await {
                        Outcome::Aborted => return,
                        Outcome::Ok => {
                            inc(&self.stats.succeeded);
                            if let Some(m) = &self.metrics {
                                m.ok.inc();
                            }
                            self.ack(&gen, &raw).await;
                            return;
                        }
                        Outcome::Err(e) => e,
                    }
                }
            };
            match err.kind() {
                HandlerErrorKind::RateLimited => {
                    rate_limited += 1;
                    inc(&self.stats.rate_limited);
                    if let Some(m) = &self.metrics {
                        m.rate_limited.inc();
                    }
                    let mut delay = self.config.rate_limit_backoff.delay(rate_limited);
                    if let Some(hint) = err.retry_after_hint() {
                        delay = delay.max(hint);
                    }
                    tracing::debug!(topic = %self.topic, message_id = %raw.id(), ?delay, "handler rate limited; retrying without counting an attempt");
                    if !sleep_unless(&self.stop, delay).await {
                        self.forget_dedup(dedup_key.as_deref());
                        self.nack(&gen, &raw).await;
                        return;
                    }
                }
                HandlerErrorKind::Permanent => {
                    inc(&self.stats.failed);
                    if let Some(m) = &self.metrics {
                        m.error.inc();
                    }
                    self.dead_letter(&gen, &raw, "permanent", err.message(), attempt)
                        .await;
                    return;
                }
                _ => {
                    inc(&self.stats.failed);
                    if let Some(m) = &self.metrics {
                        m.error.inc();
                    }
                    tracing::warn!(topic = %self.topic, message_id = %raw.id(), attempt, error = %err, "handler failed");
                    if attempt >= self.config.max_attempts && self.dlq.is_some() {
                        self.dead_letter(&gen, &raw, "failed", &err.to_string(), attempt)
                            .await;
                        return;
                    }
                    let delay = self.config.retry_backoff.delay(attempt);
                    if self.retry_in_place {
                        if !sleep_unless(&self.stop, delay).await {
                            self.forget_dedup(dedup_key.as_deref());
                            self.nack(&gen, &raw).await;
                            return;
                        }
                        attempt = attempt.saturating_add(1);
                        if !self.use_redelivery_count {
                            self.attempts.lock().set(raw.id(), attempt - 1);
                        }
                    } else {
                        self.forget_dedup(dedup_key.as_deref());
                        if !self.use_redelivery_count {
                            self.attempts.lock().set(raw.id(), attempt);
                        }
                        // The delay runs in its own task and holds no concurrency slot.
                        drop(permit.take());
                        self.nack_later(gen, raw, delay);
                        return;
                    }
                }
            }
        }
    }

    /// Negatively acknowledges after `delay` (at once when shutdown starts), in a tracked task.
    fn nack_later(self: &Arc<Self>, gen: Arc<Gen<T, C>>, raw: Message, delay: Duration) {
        let s = self.clone();
        self.tracker.spawn(async move {
            sleep_unless(&s.stop, delay).await;
            s.nack(&gen, &raw).await;
        });
    }

    async fn dead_letter(
        self: &Arc<Self>,
        gen: &Arc<Gen<T, C>>,
        raw: &Message,
        reason: &str,
        error: &str,
        attempts: u32,
    ) {
        let Some(dlq) = &self.dlq else {
            // No dead-letter topic: never drop; hand it back after the longest delay.
            let delay = self.config.retry_backoff.ceiling(u32::MAX);
            tracing::error!(topic = %self.topic, message_id = %raw.id(), attempts, reason, error, "giving up for now (no dead-letter topic); will be redelivered");
            self.nack_later(gen.clone(), raw.clone(), delay);
            return;
        };
        let mut props = raw.properties().clone();
        props.insert(DLQ_TOPIC_PROPERTY.into(), self.topic.to_string());
        props.insert(
            DLQ_SUBSCRIPTION_PROPERTY.into(),
            self.options.subscription.clone(),
        );
        props.insert(
            DLQ_ERROR_PROPERTY.into(),
            truncate(error, MAX_ERROR_TEXT).to_owned(),
        );
        props.insert(DLQ_ATTEMPTS_PROPERTY.into(), attempts.to_string());
        props.insert(DLQ_REASON_PROPERTY.into(), reason.to_owned());
        props.insert(DLQ_MESSAGE_ID_PROPERTY.into(), raw.id().to_string());
        // The source's de-duplication id must not make the dead-letter topic drop it.
        props.remove(tg_backend_api::DEDUP_ID_PROPERTY);
        let mut out = OutboundMessage::new(raw.payload().clone()).with_properties(props);
        if let Some(k) = raw.key() {
            out = out.key(k);
        }
        match dlq.send(out).await {
            Ok(_) => {
                inc(&self.stats.dead_lettered);
                if let Some(m) = &self.metrics {
                    m.dead_lettered.inc();
                }
                if let Some(m) = &self.metrics {
                    m.dead_lettered_outcome.inc();
                }
                tracing::error!(topic = %self.topic, dead_letter_topic = %dlq.topic(), message_id = %raw.id(), attempts, reason, error, "message dead-lettered");
                self.ack(gen, raw).await;
            }
            Err(e) => {
                tracing::error!(topic = %self.topic, message_id = %raw.id(), error = %e, "cannot publish to the dead-letter topic; the message will be redelivered");
                let delay = self.config.retry_backoff.delay(attempts);
                self.nack_later(gen.clone(), raw.clone(), delay);
            }
        }
    }

    /// The span a message is handled in (disabled when no subscriber wants it).
    #[inline]
    fn span(&self, raw: &Message) -> tracing::Span {
        // No subscriber was ever installed: one load instead of the callsite's interest check.
        if tracing::dispatcher::has_been_set() {
            self.new_span(raw)
        } else {
            tracing::Span::none()
        }
    }

    fn new_span(&self, raw: &Message) -> tracing::Span {
        if !tracing::span_enabled!(tracing::Level::INFO) {
            return tracing::Span::none();
        }
        let correlation = raw
            .property(tg_backend_api::CORRELATION_ID_PROPERTY)
            .or_else(|| raw.property("correlationid"))
            .unwrap_or("");
        tracing::info_span!(
            "tg.handle",
            topic = %self.topic,
            subscription = %self.options.subscription,
            message_id = %raw.id(),
            correlation_id = correlation,
        )
    }

    fn dispatch(self: &Arc<Self>, job: Job<T, C>) {
        let Some(key) = self.ordering_key(&job.raw) else {
            let span = self.span(&job.raw);
            self.tracker
                .spawn(drive(self.clone(), Source::One, Some(job), None).instrument(span));
            return;
        };
        {
            let mut lanes = self.lanes.lock();
            if let Some(q) = lanes.get_mut(&key) {
                q.push_back(job);
                return;
            }
            lanes.insert(key.clone(), VecDeque::new());
        }
        self.tracker
            .spawn(drive(self.clone(), Source::Lane(key), Some(job), None));
    }
}

/// Where a [`drive`] loop takes its messages from.
enum Source {
    /// A worker: receives from the current consumer until shutdown.
    Receive,
    /// A lane (ordering mode): the jobs queued under this key, until there are none.
    Lane(String),
    /// One job, already inside its span.
    One,
}

/// [`drive`] for one job inside `span`, as a boxed future of its own.
fn drive_in_span<T, H, C>(
    shared: Arc<Shared<T, H, C>>,
    job: Job<T, C>,
    span: tracing::Span,
    worker: Option<usize>,
) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    T: tg_schema::Message,
    H: Handler<T>,
    C: Codec,
{
    Box::pin(drive(shared, Source::One, Some(job), worker).instrument(span))
}

/// Handles messages one after another: receive one (or take the lane's next job), decode it,
/// de-duplicate, run the handler, acknowledge, again.
///
/// This is every message's path, written as one loop whose only awaits on the common path are
/// the backend's receive and acknowledgement and the handler itself (an async function called
/// for each message would have its future moved into this one each time). The rare paths
/// (reconnecting, receive errors, poison messages, duplicates, failures, and messages in a
/// `tracing` span) are boxed futures of their own.
///
/// `worker`: the index of the worker whose task this is (it counts in its own tally).
async fn drive<T, H, C>(
    shared: Arc<Shared<T, H, C>>,
    source: Source,
    mut next: Option<Job<T, C>>,
    worker: Option<usize>,
) where
    T: tg_schema::Message,
    H: Handler<T>,
    C: Codec,
{
    let tally = shared.tally(worker);
    let mut errors = 0u32;
    // The consumer of the message at hand. A worker keeps it between messages; a retired one
    // (connection error) is dropped and the slot asked again.
    let mut current: Option<Arc<Gen<T, C>>> = None;
    loop {
        // Assigned in place (a tuple would be one more copy of the message).
        let raw: Message;
        let permit: Option<OwnedSemaphorePermit>;
        match &source {
            Source::Receive => {
                if shared.stopping.load(Ordering::Relaxed) {
                    break;
                }
                if current
                    .as_ref()
                    .is_none_or(|g| g.retired.load(Ordering::Acquire))
                {
                    drop(current.take());
                    current = Box::pin(shared.current_or_stop()).await;
                }
                let Some(gen) = &current else {
                    break;
                };
                match TypedConsumer::inner(&gen.consumer)
                    .receive(shared.config.poll_interval)
                    .await
                {
                    Ok(received) => {
                        errors = 0;
                        shared.received(tally);
                        raw = received;
                        permit = None;
                    }
                    Err(e) if e.kind() == ErrorKind::Timeout => continue,
                    Err(e) if e.kind() == ErrorKind::Closed => {
                        shared.stopped_by(&e);
                        break;
                    }
                    Err(e) => match Box::pin(shared.after_receive_error(gen, e, &mut errors)).await
                    {
                        Ok(()) => continue,
                        Err(()) => break,
                    },
                }
            }
            Source::Lane(key) => {
                let job = match next.take() {
                    Some(job) => job,
                    None => {
                        let mut lanes = shared.lanes.lock();
                        match lanes.get_mut(key).and_then(VecDeque::pop_front) {
                            Some(job) => job,
                            None => {
                                lanes.remove(key);
                                break;
                            }
                        }
                    }
                };
                current = Some(job.gen);
                raw = job.raw;
                permit = job.permit;
            }
            Source::One => {
                let Some(job) = next.take() else {
                    break;
                };
                current = Some(job.gen);
                raw = job.raw;
                permit = job.permit;
            }
        }
        let Some(gen) = &current else {
            break;
        };
        if !matches!(source, Source::One) {
            let span = shared.span(&raw);
            if !span.is_disabled() {
                let job = Job {
                    gen: gen.clone(),
                    raw,
                    permit,
                };
                drive_in_span(shared.clone(), job, span, worker).await;
                continue;
            }
        }
        if shared.aborting.load(Ordering::Relaxed) {
            continue;
        }
        let counted = shared.counted_failures(&raw);
        if raw.redelivery_count() > 0 {
            if let Some(m) = &shared.metrics {
                m.redeliveries.inc();
            }
        }
        let typed = match gen.consumer.decode(raw.clone()) {
            Ok(t) => t,
            Err(e) => {
                let attempt = shared.attempt(&raw, counted);
                Box::pin(shared.undecodable(gen, &raw, e, attempt)).await;
                continue;
            }
        };
        let Ok(dedup_key) = shared.dedup_check(&typed) else {
            Box::pin(shared.ack(gen, &raw)).await;
            continue;
        };
        let started = shared.handler_starts(tally);
        // Workers are aborted through their join handles; lane tasks watch the abort token.
        let result = if shared.dispatcher_mode {
            let fut = AssertUnwindSafe(shared.handler.handle(typed)).catch_unwind();
            tokio::select! {
                biased;
                _ = shared.abort.cancelled() => None,
                r = fut => Some(r),
            }
        } else {
            // Awaited where it is made: one copy of the handler's future fewer.
            Some(
                AssertUnwindSafe(shared.handler.handle(typed))
                    .catch_unwind()
                    .await,
            )
        };
        tally.running(false);
        let Some(result) = result else {
            continue;
        };
        match shared.handler_ended(started, result) {
            Ok(()) => {
                tally.succeeded();
                if let Some(m) = &shared.metrics {
                    m.ok.inc();
                }
                let acked = TypedConsumer::inner(&gen.consumer).acknowledge(&raw).await;
                shared.acked(&raw, acked);
            }
            Err(e) => {
                let attempt = shared.attempt(&raw, counted);
                let gen = gen.clone();
                Box::pin(shared.after_failure(gen, raw, permit, attempt, dedup_key, e)).await;
            }
        }
    }
}

/// Receives up to `max_batch` messages (waiting up to `max_wait` for more after the first).
/// `Ok(None)`: nothing came (or a recoverable error, after its back-off); `Err(())`: stop.
async fn receive_batch<T, H, C>(
    shared: &Shared<T, H, C>,
    gen: &Arc<Gen<T, C>>,
    errors: &mut u32,
) -> std::result::Result<Option<Vec<Message>>, ()>
where
    T: tg_schema::Message,
    H: Handler<T>,
    C: Codec,
{
    let consumer = TypedConsumer::inner(&gen.consumer);
    let max = shared.config.max_batch;
    let mut batch = match consumer
        .receive_batch(max, shared.config.poll_interval)
        .await
    {
        Ok(batch) if batch.is_empty() => return Ok(None),
        Ok(batch) => batch,
        Err(e) if e.kind() == ErrorKind::Closed => {
            shared.stopped_by(&e);
            return Err(());
        }
        Err(e) => {
            return Box::pin(shared.after_receive_error(gen, e, errors))
                .await
                .map(|()| None)
        }
    };
    *errors = 0;
    if batch.len() < max && !shared.config.max_wait.is_zero() {
        let deadline = Instant::now() + shared.config.max_wait;
        while batch.len() < max && !shared.stopping.load(Ordering::Relaxed) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match consumer.receive_batch(max - batch.len(), left).await {
                Ok(more) if more.is_empty() => break,
                Ok(more) => batch.extend(more),
                // what came is handed over; the error shows at the next receive
                Err(_) => break,
            }
        }
    }
    Ok(Some(batch))
}

/// A worker of the batch mode: receive a batch, decode each message (poison ones go to the
/// dead-letter topic on their own), drop duplicates, run the handler on the rest at once,
/// acknowledge the successes in one request, and treat each failure as a single message's.
async fn drive_batches<T, H, C>(shared: Arc<Shared<T, H, C>>, worker: usize)
where
    T: tg_schema::Message,
    H: Handler<T>,
    C: Codec,
{
    let tally = shared.tally(Some(worker));
    let mut errors = 0u32;
    while !shared.stopping.load(Ordering::Relaxed) {
        let Some(gen) = shared.current_or_stop().await else {
            break;
        };
        let batch = match receive_batch(&shared, &gen, &mut errors).await {
            Ok(Some(batch)) => batch,
            Ok(None) => continue,
            Err(()) => break,
        };
        let consumer = TypedConsumer::inner(&gen.consumer);
        let mut done: Vec<Message> = Vec::with_capacity(batch.len());
        let mut typed = Vec::with_capacity(batch.len());
        // per message handed to the handler: its raw form, attempts counted, de-dup key
        let mut handed: Vec<(Message, u32, Option<String>)> = Vec::with_capacity(batch.len());
        for raw in batch {
            shared.received(tally);
            if raw.redelivery_count() > 0 {
                if let Some(m) = &shared.metrics {
                    m.redeliveries.inc();
                }
            }
            let counted = shared.counted_failures(&raw);
            match gen.consumer.decode(raw.clone()) {
                Ok(t) => match shared.dedup_check(&t) {
                    Ok(key) => {
                        typed.push(t);
                        handed.push((raw, counted, key));
                    }
                    Err(()) => done.push(raw),
                },
                Err(e) => {
                    let attempt = shared.attempt(&raw, counted);
                    Box::pin(shared.undecodable(&gen, &raw, e, attempt)).await;
                }
            }
        }
        let outcomes = if typed.is_empty() {
            Vec::new()
        } else {
            let started = shared.handler_starts(tally);
            let result = AssertUnwindSafe(shared.handler.handle_batch(typed))
                .catch_unwind()
                .await;
            tally.running(false);
            if let (Some(m), Some(started)) = (&shared.metrics, started) {
                m.latency.observe(started.elapsed().as_secs_f64());
            }
            match result {
                Ok(outcomes) => outcomes,
                Err(panic) => {
                    let e = shared.panicked(&*panic);
                    handed
                        .iter()
                        .map(|_| Err(HandlerError::failed(e.message())))
                        .collect()
                }
            }
        };
        let returned = outcomes.len();
        let mut outcomes = outcomes.into_iter();
        let mut failed = Vec::new();
        for (raw, counted, key) in handed {
            match outcomes.next().unwrap_or_else(|| {
                Err(HandlerError::failed(format!(
                    "the batch handler returned {returned} outcomes for a larger batch"
                )))
            }) {
                Ok(()) => {
                    tally.succeeded();
                    if let Some(m) = &shared.metrics {
                        m.ok.inc();
                    }
                    done.push(raw);
                }
                Err(e) => {
                    if e.panicked {
                        shared.count_panic();
                    }
                    failed.push((raw, counted, key, e));
                }
            }
        }
        if !done.is_empty() {
            let result = consumer.acknowledge_batch(&done).await;
            let failed_ack = result.as_ref().err().map(|e| e.to_string());
            for raw in &done {
                let each = match &failed_ack {
                    None => Ok(()),
                    Some(e) => Err(Error::new(ErrorKind::Connection, e.clone())),
                };
                shared.acked(raw, each);
            }
        }
        for (raw, counted, key, e) in failed {
            let attempt = shared.attempt(&raw, counted);
            Box::pin(shared.after_failure(gen.clone(), raw, None, attempt, key, e)).await;
        }
    }
}

/// Receives and hands messages to per-key lanes (ordering mode).
async fn dispatcher<T, H, C>(shared: Arc<Shared<T, H, C>>)
where
    T: tg_schema::Message,
    H: Handler<T>,
    C: Codec,
{
    let mut errors = 0u32;
    loop {
        let permit = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break,
            p = shared.semaphore.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        if shared.stop.is_cancelled() {
            break;
        }
        match shared.receive_one(&mut errors).await {
            Ok(Some((gen, raw))) => shared.dispatch(Job {
                gen,
                raw,
                permit: Some(permit),
            }),
            Ok(None) => {}
            Err(()) => break,
        }
    }
}

async fn run_loop<T, H, C>(shared: Arc<Shared<T, H, C>>, first: Arc<Gen<T, C>>) -> Result<RunReport>
where
    T: tg_schema::Message,
    H: Handler<T>,
    C: Codec,
{
    *shared.slot.current.write() = Some(first);
    let mut loops = Vec::new();
    if shared.dispatcher_mode {
        dispatcher(shared.clone()).await;
    } else if shared.config.max_batch > 1 {
        for i in 0..shared.config.concurrency {
            let worker = drive_batches(shared.clone(), i);
            loops.push(shared.tracker.spawn(worker));
        }
        shared.stop.cancelled().await;
    } else {
        for i in 0..shared.config.concurrency {
            let worker = drive(shared.clone(), Source::Receive, None, Some(i));
            loops.push(shared.tracker.spawn(worker));
        }
        shared.stop.cancelled().await;
    }
    shared.stopping.store(true, Ordering::Relaxed);
    // Shutdown: no more receiving; let in-flight work finish within the deadline.
    shared.stop.cancel();
    shared.tracker.close();
    let mut abandoned = 0;
    if tokio::time::timeout(shared.config.shutdown_timeout, shared.tracker.wait())
        .await
        .is_err()
    {
        abandoned = usize::try_from(shared.stats.running()).unwrap_or(usize::MAX);
        tracing::warn!(topic = %shared.topic, abandoned, "shutdown deadline passed; dropping handlers still running");
        shared.aborting.store(true, Ordering::Relaxed);
        shared.abort.cancel();
        for l in &loops {
            l.abort();
        }
        shared.tracker.wait().await;
    }
    if let Some(gen) = shared.slot.take() {
        gen.closed.store(true, Ordering::Release);
        if let Err(e) = TypedConsumer::inner(&gen.consumer).close().await {
            tracing::debug!(error = %e, "closing the consumer");
        }
    }
    if let Some(dlq) = &shared.dlq {
        let _ = dlq.close().await;
    }
    if let Some(m) = &shared.metrics {
        m.connection.connected.set(0);
    }
    Ok(RunReport {
        stats: shared.stats.snapshot(),
        abandoned,
        stopped_by: shared.stopped_by.lock().clone(),
    })
}
