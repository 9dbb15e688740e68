//! One backend consumer fanned out to many in-process recipients.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tg_backend_api::{
    Backend, ConsumerOptions, Error, ErrorKind, Result, Topic, TypedConsumer, TypedMessage,
    CORRELATION_ID_PROPERTY,
};
use tg_schema::{Codec, JsonCodec};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Backoff;

/// What a full recipient queue does with a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Drop the oldest queued message to make room (latest values matter most).
    DropOldest,
    /// Drop the new message (what is queued is kept, e.g. the start of a response stream).
    DropNewest,
}

/// How a [`Subscriber`] routes and queues.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// Property that routes a message to a keyed recipient. Default: `id` (the Python framework's
    /// request/response correlation property).
    pub key_property: String,
    /// Queue size of each keyed recipient. Default: 1024.
    pub keyed_capacity: usize,
    /// Policy of a full keyed queue. Default: [`WhenFull::DropNewest`].
    pub keyed_when_full: WhenFull,
    /// Queue size of each see-everything recipient. Default: 1024.
    pub all_capacity: usize,
    /// Policy of a full see-everything queue. Default: [`WhenFull::DropOldest`].
    pub all_when_full: WhenFull,
    /// Longest single wait in `receive`. Default: 100 ms.
    pub poll_interval: Duration,
    /// Delay between attempts to recreate the consumer after a connection error.
    pub reconnect_backoff: Backoff,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        Self {
            key_property: CORRELATION_ID_PROPERTY.to_owned(),
            keyed_capacity: 1024,
            keyed_when_full: WhenFull::DropNewest,
            all_capacity: 1024,
            all_when_full: WhenFull::DropOldest,
            poll_interval: Duration::from_millis(100),
            reconnect_backoff: Backoff::reconnect(),
        }
    }
}

impl SubscriberConfig {
    /// Sets `key_property`.
    #[must_use]
    pub fn key_property(mut self, p: impl Into<String>) -> Self {
        self.key_property = p.into();
        self
    }

    /// Sets the keyed queue size and policy.
    #[must_use]
    pub fn keyed_queue(mut self, capacity: usize, when_full: WhenFull) -> Self {
        self.keyed_capacity = capacity.max(1);
        self.keyed_when_full = when_full;
        self
    }

    /// Sets the see-everything queue size and policy.
    #[must_use]
    pub fn all_queue(mut self, capacity: usize, when_full: WhenFull) -> Self {
        self.all_capacity = capacity.max(1);
        self.all_when_full = when_full;
        self
    }

    /// Sets `poll_interval`.
    #[must_use]
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }
}

/// A bounded single-reader queue with a policy for when it is full.
struct Mailbox<M> {
    queue: Mutex<VecDeque<M>>,
    capacity: usize,
    when_full: WhenFull,
    notify: Notify,
    closed: AtomicBool,
    dropped: AtomicU64,
}

impl<M> Mailbox<M> {
    fn new(capacity: usize, when_full: WhenFull) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            when_full,
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        }
    }

    /// Never waits; `false` if something was dropped.
    fn push(&self, m: M) -> bool {
        let mut q = self.queue.lock();
        let mut kept = true;
        if q.len() >= self.capacity {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            kept = false;
            match self.when_full {
                WhenFull::DropOldest => {
                    q.pop_front();
                }
                WhenFull::DropNewest => return false,
            }
        }
        q.push_back(m);
        drop(q);
        self.notify.notify_one();
        kept
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    async fn pop(&self) -> Option<M> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(m) = self.queue.lock().pop_front() {
                return Some(m);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            notified.await;
        }
    }
}

type Inbox<T> = Arc<Mailbox<TypedMessage<T>>>;
type Keyed<T> = HashMap<String, (u64, Inbox<T>)>;

struct Routes<T> {
    keyed: Mutex<Keyed<T>>,
    all: Mutex<Vec<(u64, Inbox<T>)>>,
    next_id: AtomicU64,
    unrouted: AtomicU64,
    received: AtomicU64,
    undecodable: AtomicU64,
    stopped: AtomicBool,
}

/// Receives one typed topic with one backend consumer and hands each message to
/// - the keyed recipient registered for the value of its routing property
///   ([`SubscriberConfig::key_property`], `id` by default), and
/// - every see-everything recipient.
///
/// Each recipient has its own bounded queue; the dispatcher never waits for a recipient, so a
/// slow one cannot stall the others. When a queue is full the configured [`WhenFull`] policy
/// applies (keyed: drop the new message; see-everything: drop the oldest) and the drop is counted
/// ([`Recipient::dropped`]). Messages are acknowledged as soon as they are queued (or found to have
/// no recipient, counted in [`Subscriber::unrouted`]): a subscriber delivers at most once, which
/// suits responses and fan-out; use a [`ConsumerRunner`](crate::ConsumerRunner) for work that must
/// not be lost. Undecodable messages are logged, counted and acknowledged.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::{sync::Arc, time::Duration};
/// use tg_backend_api::{Backend, BackendExt, ConsumerOptions};
/// use tg_runtime::{Subscriber, SubscriberConfig};
///
/// let backend: Arc<dyn Backend> = Arc::new(tg_backend_memory::MemoryBackend::new());
/// let topic = tg_topic::topic("responses")?;
/// let sub = Subscriber::<String>::start(backend.clone(), topic.clone(), ConsumerOptions::new("me"), SubscriberConfig::default()).await?;
/// let mine = sub.register("req-1");
/// let producer = backend.typed_producer::<String>(&topic).await?;
/// producer.send_with(&"answer".to_owned(), [("id".to_owned(), "req-1".to_owned())].into()).await?;
/// let got = mine.recv_timeout(Duration::from_secs(1)).await?;
/// assert_eq!(got.value(), "answer");
/// sub.shutdown().await
/// # }
/// ```
pub struct Subscriber<T: tg_schema::Message> {
    routes: Arc<Routes<T>>,
    config: SubscriberConfig,
    token: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl<T: tg_schema::Message + Clone> Subscriber<T> {
    /// Creates the consumer (the subscription exists when this returns) and starts dispatching.
    pub async fn start(
        backend: Arc<dyn Backend>,
        topic: Topic,
        options: ConsumerOptions,
        config: SubscriberConfig,
    ) -> Result<Self> {
        Self::start_with_codec(backend, topic, options, config, JsonCodec).await
    }

    /// Same with another codec.
    pub async fn start_with_codec<C: Codec>(
        backend: Arc<dyn Backend>,
        topic: Topic,
        options: ConsumerOptions,
        config: SubscriberConfig,
        codec: C,
    ) -> Result<Self> {
        options.validate()?;
        let consumer = backend.create_consumer(&topic, options.clone()).await?;
        let consumer = TypedConsumer::<T, C>::with_codec(consumer, codec.clone());
        let routes = Arc::new(Routes {
            keyed: Mutex::new(HashMap::new()),
            all: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            unrouted: AtomicU64::new(0),
            received: AtomicU64::new(0),
            undecodable: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        });
        let token = CancellationToken::new();
        let task = tokio::spawn(dispatch(
            backend,
            topic,
            options,
            codec,
            consumer,
            routes.clone(),
            config.clone(),
            token.clone(),
        ));
        Ok(Self {
            routes,
            config,
            token,
            task: Mutex::new(Some(task)),
        })
    }

    /// A recipient of the messages whose routing property equals `key`. Registering the same key
    /// again replaces the earlier recipient (which then sees no more messages). Dropping the
    /// recipient unregisters it.
    pub fn register(&self, key: impl Into<String>) -> Recipient<T> {
        let key = key.into();
        let id = self.routes.next_id.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::new(
            self.config.keyed_capacity,
            self.config.keyed_when_full,
        ));
        if self.routes.stopped.load(Ordering::Acquire) {
            mailbox.close();
        }
        if let Some((_, old)) = self
            .routes
            .keyed
            .lock()
            .insert(key.clone(), (id, mailbox.clone()))
        {
            old.close();
        }
        Recipient {
            mailbox,
            routes: self.routes.clone(),
            route: Route::Keyed(key, id),
        }
    }

    /// A recipient of every message.
    pub fn subscribe_all(&self) -> Recipient<T> {
        let id = self.routes.next_id.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::new(
            self.config.all_capacity,
            self.config.all_when_full,
        ));
        if self.routes.stopped.load(Ordering::Acquire) {
            mailbox.close();
        }
        self.routes.all.lock().push((id, mailbox.clone()));
        Recipient {
            mailbox,
            routes: self.routes.clone(),
            route: Route::All(id),
        }
    }

    /// Messages received.
    pub fn received(&self) -> u64 {
        self.routes.received.load(Ordering::Relaxed)
    }

    /// Messages that had no recipient.
    pub fn unrouted(&self) -> u64 {
        self.routes.unrouted.load(Ordering::Relaxed)
    }

    /// Messages that did not decode.
    pub fn undecodable(&self) -> u64 {
        self.routes.undecodable.load(Ordering::Relaxed)
    }

    /// Stops dispatching and closes the consumer; recipients get `None` once their queue is empty.
    pub async fn shutdown(&self) -> Result<()> {
        self.token.cancel();
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        Ok(())
    }
}

impl<T: tg_schema::Message> Drop for Subscriber<T> {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

impl<T: tg_schema::Message> fmt::Debug for Subscriber<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("config", &self.config)
            .field("received", &self.routes.received.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn close_all<T>(routes: &Routes<T>) {
    routes.stopped.store(true, Ordering::Release);
    for (_, m) in routes.keyed.lock().values() {
        m.close();
    }
    for (_, m) in routes.all.lock().iter() {
        m.close();
    }
}

#[allow(clippy::too_many_arguments)]
async fn dispatch<T: tg_schema::Message + Clone, C: Codec>(
    backend: Arc<dyn Backend>,
    topic: Topic,
    options: ConsumerOptions,
    codec: C,
    consumer: TypedConsumer<T, C>,
    routes: Arc<Routes<T>>,
    config: SubscriberConfig,
    token: CancellationToken,
) {
    let mut consumer = Some(consumer);
    let mut errors = 0u32;
    while !token.is_cancelled() {
        let Some(c) = &consumer else {
            match backend.create_consumer(&topic, options.clone()).await {
                Ok(inner) => {
                    tracing::info!(%topic, "subscriber reconnected");
                    consumer = Some(TypedConsumer::with_codec(inner, codec.clone()));
                    errors = 0;
                }
                Err(e) if e.kind() == ErrorKind::Closed || !e.is_temporary() => {
                    tracing::error!(%topic, error = %e, "subscriber cannot recreate its consumer; stopping");
                    break;
                }
                Err(e) => {
                    errors += 1;
                    tracing::warn!(%topic, error = %e, "subscriber reconnect failed");
                    let delay = config.reconnect_backoff.delay(errors);
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
            continue;
        };
        let raw = match c.inner().receive(config.poll_interval).await {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::Timeout => continue,
            Err(e) if e.kind() == ErrorKind::Closed => break,
            Err(e) => {
                errors += 1;
                tracing::warn!(%topic, error = %e, "subscriber receive failed");
                if e.kind() == ErrorKind::Connection {
                    consumer = None;
                    continue;
                }
                let delay = config.reconnect_backoff.delay(errors);
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        routes.received.fetch_add(1, Ordering::Relaxed);
        let ack = raw.clone();
        match c.decode(raw) {
            Ok(msg) => route(&routes, &config.key_property, msg),
            Err(e) => {
                routes.undecodable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%topic, error = %e, "subscriber dropped an undecodable message");
            }
        }
        if let Err(e) = c.inner().acknowledge(&ack).await {
            tracing::debug!(%topic, error = %e, "subscriber acknowledge failed");
        }
    }
    close_all(&routes);
    if let Some(c) = consumer {
        let _ = c.close().await;
    }
}

fn route<T: Clone>(routes: &Routes<T>, key_property: &str, msg: TypedMessage<T>) {
    let keyed = msg
        .property(key_property)
        .and_then(|k| routes.keyed.lock().get(k).map(|(_, m)| m.clone()));
    let all: Vec<_> = routes.all.lock().iter().map(|(_, m)| m.clone()).collect();
    if keyed.is_none() && all.is_empty() {
        routes.unrouted.fetch_add(1, Ordering::Relaxed);
        return;
    }
    for m in &all {
        m.push(msg.clone());
    }
    if let Some(k) = keyed {
        k.push(msg);
    }
}

enum Route {
    Keyed(String, u64),
    All(u64),
}

/// One recipient of a [`Subscriber`]; unregisters itself when dropped.
pub struct Recipient<T> {
    mailbox: Arc<Mailbox<TypedMessage<T>>>,
    routes: Arc<Routes<T>>,
    route: Route,
}

impl<T> Recipient<T> {
    /// The next message; `None` once the subscriber stopped (or this key was registered again)
    /// and the queue is empty.
    pub async fn recv(&self) -> Option<TypedMessage<T>> {
        self.mailbox.pop().await
    }

    /// The next message, failing with [`ErrorKind::Timeout`] after `timeout` and with
    /// [`ErrorKind::Closed`] when the subscriber stopped.
    pub async fn recv_timeout(&self, timeout: Duration) -> Result<TypedMessage<T>> {
        match tokio::time::timeout(timeout, self.mailbox.pop()).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Error::closed("subscriber")),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("no message within {timeout:?}"),
            )),
        }
    }

    /// Messages dropped because this recipient's queue was full.
    pub fn dropped(&self) -> u64 {
        self.mailbox.dropped.load(Ordering::Relaxed)
    }

    /// Messages waiting in this recipient's queue.
    pub fn queued(&self) -> usize {
        self.mailbox.queue.lock().len()
    }
}

impl<T> Drop for Recipient<T> {
    fn drop(&mut self) {
        match &self.route {
            Route::Keyed(key, id) => {
                let mut keyed = self.routes.keyed.lock();
                if keyed.get(key).is_some_and(|(i, _)| i == id) {
                    keyed.remove(key);
                }
            }
            Route::All(id) => self.routes.all.lock().retain(|(i, _)| i != id),
        }
    }
}

impl<T> fmt::Debug for Recipient<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = match &self.route {
            Route::Keyed(k, _) => format!("key {k}"),
            Route::All(_) => "all".to_owned(),
        };
        f.debug_struct("Recipient")
            .field("route", &route)
            .field("queued", &self.queued())
            .field("dropped", &self.dropped())
            .finish()
    }
}
