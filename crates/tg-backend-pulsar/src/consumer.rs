//! Consumers: one `pulsar::Consumer` per tg consumer.
//!
//! The `pulsar` crate's consumer is a `Stream` that needs `&mut` to receive and to acknowledge,
//! while tg consumers are shared between tasks (`&self`). It lives in a mutex that is only held
//! for a poll or to queue an acknowledgement (the crate queues both on unbounded channels to its
//! own engine task, so neither waits), never across an `.await`; `receive` polls the stream
//! directly, so a message takes no extra task hop. One `receive` runs at a time.
//!
//! On top of what the crate does:
//!
//! * **Batches are acknowledged whole.** A batch of the producer is one broker entry; Pulsar
//!   brokers without batch-index acknowledgement treat the ack of any message of a batch as the
//!   ack of the entry. The consumer therefore acknowledges an entry only when the application has
//!   acknowledged every message of it, and when a nack brings an entry back, it drops the
//!   messages of it that were already acknowledged.
//! * **q2 de-duplication.** A message whose `tg-dedup-id` was seen in the consumer's last
//!   `dedup_window` messages (with another message id: a redelivery of the same message is not a
//!   duplicate) is acknowledged and skipped.
//! * **Subscribing again.** The crate re-subscribes once after its connection broke and then
//!   ends the stream; the consumer then subscribes again in the background, with backoff, until
//!   it works or the consumer is closed.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use pulsar::consumer::InitialPosition as PulsarPosition;
use pulsar::proto::MessageIdData;
use pulsar::{SubType, TokioExecutor};
use tg_backend_api::{
    next_consumer_id, receive_timeout, AckHandle, Consumer, ConsumerOptions, ConsumerType, Error,
    ErrorKind, InitialPosition, Message, Properties, Qos, Result, Topic, DEDUP_ID_PROPERTY,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::Shared;
use crate::error::convert;
use crate::topic::{message_id, pulsar_topic};

type RawConsumer = pulsar::Consumer<Vec<u8>, TokioExecutor>;

/// Subscribes (again) with the consumer's settings.
type Subscribe = Box<
    dyn Fn() -> BoxFuture<'static, std::result::Result<RawConsumer, pulsar::Error>> + Send + Sync,
>;

/// What an [`AckHandle`] of this backend carries: the Pulsar id and the size of its batch.
#[derive(Clone, Debug)]
struct Delivery {
    id: MessageIdData,
    batch_size: i32,
}

/// Acknowledgement state of one batch (broker entry) with messages still unacknowledged.
struct BatchState {
    acked: Vec<bool>,
    remaining: usize,
}

/// The key of a broker entry.
type EntryKey = (u64, u64, i32);

fn entry_key(id: &MessageIdData) -> EntryKey {
    (id.ledger_id, id.entry_id, id.partition.unwrap_or(-1))
}

/// The last de-duplication ids one q2 consumer saw, with the message that carried each.
struct Dedup {
    seen: HashMap<String, (EntryKey, i32)>,
    order: VecDeque<String>,
    window: usize,
}

impl Dedup {
    fn new(window: usize) -> Self {
        Self {
            seen: HashMap::new(),
            order: VecDeque::new(),
            window,
        }
    }

    /// Records `dedup_id` for message `id`; false when another message carried it before.
    fn first_time(&mut self, dedup_id: &str, id: &MessageIdData) -> bool {
        let this = (entry_key(id), id.batch_index.unwrap_or(-1));
        match self.seen.get(dedup_id) {
            Some(first) => *first == this, // a redelivery of the first copy is delivered
            None => {
                if self.order.len() >= self.window {
                    if let Some(old) = self.order.pop_front() {
                        self.seen.remove(&old);
                    }
                }
                self.seen.insert(dedup_id.to_owned(), this);
                self.order.push_back(dedup_id.to_owned());
                true
            }
        }
    }
}

/// Everything behind the consumer's mutex.
struct State {
    /// None while subscribing again, and after close.
    raw: Option<RawConsumer>,
    seq: u64,
    batches: HashMap<EntryKey, BatchState>,
    dedup: Option<Dedup>,
    /// Why the consumer is disconnected, when it is.
    failure: Option<String>,
    resubscribing: bool,
}

impl State {
    /// The ids to acknowledge now for this delivery: none while its batch has unacknowledged
    /// messages, all of the batch when the last one is acknowledged.
    fn ids_to_ack(&mut self, d: &Delivery) -> Vec<MessageIdData> {
        match (d.batch_size > 1, d.id.batch_index) {
            (true, Some(index)) if index >= 0 && index < d.batch_size => {
                let key = entry_key(&d.id);
                let state = self.batches.entry(key).or_insert_with(|| BatchState {
                    acked: vec![false; d.batch_size as usize],
                    remaining: d.batch_size as usize,
                });
                let slot = &mut state.acked[index as usize];
                if !*slot {
                    *slot = true;
                    state.remaining -= 1;
                }
                if state.remaining > 0 {
                    return Vec::new();
                }
                self.batches.remove(&key);
                (0..d.batch_size)
                    .map(|i| MessageIdData {
                        batch_index: Some(i),
                        ..d.id.clone()
                    })
                    .collect()
            }
            _ => vec![d.id.clone()],
        }
    }

    /// Whether this message of a redelivered batch was acknowledged already.
    fn already_acked(&self, id: &MessageIdData, batch_size: i32) -> bool {
        if batch_size <= 1 {
            return false;
        }
        match (self.batches.get(&entry_key(id)), id.batch_index) {
            (Some(state), Some(index)) if index >= 0 => {
                state.acked.get(index as usize).copied().unwrap_or(false)
            }
            _ => false,
        }
    }
}

/// The consumer's shared part (the backend keeps a weak reference to close it).
pub(crate) struct ConsumerCore {
    shared: Arc<Shared>,
    topic: Topic,
    pulsar_topic: String,
    subscription: String,
    id: u64,
    state: Mutex<State>,
    /// One `receive` at a time: the stream keeps one waker.
    receiving: tokio::sync::Mutex<()>,
    /// Signalled when the consumer subscribed again or closed.
    changed: Notify,
    closed: AtomicBool,
    subscribe: Subscribe,
}

/// What one poll of the stream gave.
enum Next {
    Message(Message),
    /// The stream ended: the crate gave up on the subscription.
    Ended,
    /// No consumer right now (subscribing again, or closed).
    Disconnected,
}

impl ConsumerCore {
    fn closed_error(&self) -> Error {
        Error::closed("pulsar consumer")
            .with_context("topic", &self.topic)
            .with_context("subscription", &self.subscription)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.shared.is_closed()
    }

    fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(self.closed_error())
        } else {
            Ok(())
        }
    }

    fn err(&self, e: pulsar::Error, what: &str) -> Error {
        convert(e, what, &self.shared.server)
            .with_context("topic", &self.topic)
            .with_context("subscription", &self.subscription)
    }

    /// Queues acknowledgements with the crate's engine (never waits).
    fn send_acks(&self, raw: &mut RawConsumer, ids: Vec<MessageIdData>) -> Result<()> {
        for id in ids {
            match raw.ack_with_id(&self.pulsar_topic, id).now_or_never() {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(self.err(e.into(), "acknowledgement failed")),
                None => tracing::warn!(topic = %self.pulsar_topic, "acknowledgement not queued"),
            }
        }
        Ok(())
    }

    /// Polls the stream for the next message to hand out, skipping what is not handed out.
    fn poll_next(&self, cx: &mut std::task::Context<'_>) -> Poll<Next> {
        let mut state = self.state.lock();
        loop {
            let Some(raw) = state.raw.as_mut() else {
                return Poll::Ready(Next::Disconnected);
            };
            let raw_message = match raw.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    state.raw = None;
                    return Poll::Ready(Next::Ended);
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(topic = %self.pulsar_topic, error = %e, "Pulsar consumer error");
                    continue;
                }
                Poll::Ready(Some(Ok(m))) => m,
            };
            if let Some(message) = self.convert(&mut state, raw_message) {
                return Poll::Ready(Next::Message(message));
            }
        }
    }

    /// The tg message of a Pulsar message, or None when it is skipped (an already acknowledged
    /// part of a redelivered batch, or a q2 duplicate, which is acknowledged).
    fn convert(
        &self,
        state: &mut State,
        raw: pulsar::consumer::Message<Vec<u8>>,
    ) -> Option<Message> {
        let id = raw.message_id.id;
        let batch_size = raw.message_id.batch_size.unwrap_or(0);
        if state.already_acked(&id, batch_size) {
            return None;
        }
        let pulsar::Payload { metadata, data } = raw.payload;
        let properties: Properties = metadata
            .properties
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        let delivery = Delivery { id, batch_size };
        if let (Some(dedup), Some(dedup_id)) = (&mut state.dedup, properties.get(DEDUP_ID_PROPERTY))
        {
            if !dedup.first_time(dedup_id, &delivery.id) {
                tracing::debug!(dedup_id = %dedup_id, "q2 duplicate acknowledged and skipped");
                let ids = state.ids_to_ack(&delivery);
                if let Some(raw) = state.raw.as_mut() {
                    let _ = self.send_acks(raw, ids);
                }
                return None;
            }
        }
        state.seq += 1;
        let mid = message_id(&delivery.id);
        let handle = AckHandle::new(self.id, state.seq).with_extra(delivery);
        let mut message = Message::new(Bytes::from(data), properties, mid, handle)
            .with_key(metadata.partition_key);
        if metadata.publish_time > 0 {
            message = message.with_publish_time(
                SystemTime::UNIX_EPOCH + Duration::from_millis(metadata.publish_time),
            );
        }
        Some(message)
    }

    /// Subscribes again in the background (once at a time), with backoff, until it works or
    /// the consumer is closed.
    fn start_resubscribing(self: &Arc<Self>) {
        {
            let mut state = self.state.lock();
            if state.resubscribing || self.is_closed() {
                return;
            }
            state.resubscribing = true;
            state.failure = Some("the connection to the broker broke; subscribing again".into());
        }
        tracing::warn!(server = %self.shared.server, topic = %self.pulsar_topic,
            "the Pulsar consumer stopped; subscribing again");
        let weak: Weak<Self> = Arc::downgrade(self);
        let max = self.shared.config.reconnect_max_delay;
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                let Some(attempt) = weak.upgrade().map(|core| (core.subscribe)()) else {
                    return;
                };
                let outcome = attempt.await;
                let Some(core) = weak.upgrade() else { return };
                match outcome {
                    Ok(raw) => {
                        if core.is_closed() {
                            let mut raw = raw;
                            let _ = raw.close().await;
                        } else {
                            let mut state = core.state.lock();
                            state.raw = Some(raw);
                            state.failure = None;
                            state.resubscribing = false;
                            tracing::info!(topic = %core.pulsar_topic, "the Pulsar consumer subscribed again");
                        }
                        core.changed.notify_waiters();
                        return;
                    }
                    Err(e) => {
                        if core.is_closed() {
                            return;
                        }
                        tracing::warn!(topic = %core.pulsar_topic, error = %e, ?delay,
                            "subscribing again failed; retrying");
                        core.state.lock().failure = Some(format!("cannot subscribe again: {e}"));
                    }
                }
                drop(core);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max);
            }
        });
    }

    /// Closes the consumer; its unacknowledged messages go back to the subscription.
    pub(crate) async fn shutdown(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let raw = self.state.lock().raw.take();
        self.changed.notify_waiters();
        let Some(mut raw) = raw else { return Ok(()) };
        match tokio::time::timeout(self.shared.config.operation_timeout, raw.close()).await {
            Ok(Err(e)) if !matches!(crate::error::kind_of(&e), ErrorKind::Connection) => {
                Err(self.err(e, "closing the consumer"))
            }
            _ => Ok(()), // closed, or the connection is gone and the broker dropped it already
        }
    }

    fn delivery<'m>(&self, message: &'m Message) -> Result<&'m Delivery> {
        let handle = message.ack_handle();
        match handle.extra::<Delivery>() {
            Some(d) if handle.consumer() == self.id => Ok(d),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                "the message was not received by this consumer",
            )
            .with_context("subscription", &self.subscription)),
        }
    }
}

/// A consumer of one subscription.
pub(crate) struct PulsarConsumer {
    core: Arc<ConsumerCore>,
}

impl PulsarConsumer {
    pub(crate) async fn create(
        shared: Arc<Shared>,
        topic: Topic,
        options: ConsumerOptions,
    ) -> Result<Self> {
        let config = &shared.config;
        let ptopic = pulsar_topic(&topic);
        let sub_type = match options.consumer_type {
            ConsumerType::Shared => SubType::Shared,
            ConsumerType::Exclusive => SubType::Exclusive,
            ConsumerType::Failover => SubType::Failover,
        };
        let position = match (topic.qos(), options.initial_position) {
            (Qos::Q0, InitialPosition::Earliest) => {
                tracing::debug!(%topic, "q0 topics retain nothing: Earliest behaves as Latest");
                PulsarPosition::Latest
            }
            (_, InitialPosition::Earliest) => PulsarPosition::Earliest,
            (_, InitialPosition::Latest) => PulsarPosition::Latest,
        };
        let pulsar_options = pulsar::ConsumerOptions {
            initial_position: position,
            receiver_queue_size: Some(config.receiver_queue),
            ..Default::default()
        };
        let subscribe: Subscribe = {
            let client = shared.consumer_client.clone();
            let (ptopic, subscription, name) = (
                ptopic.clone(),
                options.subscription.clone(),
                options.consumer_name.clone(),
            );
            let queue = config.receiver_queue;
            Box::new(move || {
                let mut builder = client
                    .consumer()
                    .with_topic(ptopic.clone())
                    .with_subscription(subscription.clone())
                    .with_subscription_type(sub_type)
                    .with_batch_size(queue)
                    .with_options(pulsar_options.clone());
                if let Some(name) = &name {
                    builder = builder.with_consumer_name(name.clone());
                }
                Box::pin(async move { builder.build::<Vec<u8>>().await })
            })
        };
        let raw: RawConsumer = shared
            .bounded("cannot subscribe", subscribe())
            .await
            .map_err(|e| {
                e.with_context("topic", &topic)
                    .with_context("subscription", &options.subscription)
            })?;
        let dedup = (topic.qos() == Qos::Q2 && config.dedup_window > 0)
            .then(|| Dedup::new(config.dedup_window));
        Ok(Self {
            core: Arc::new(ConsumerCore {
                shared,
                topic,
                pulsar_topic: ptopic,
                subscription: options.subscription,
                id: next_consumer_id(),
                state: Mutex::new(State {
                    raw: Some(raw),
                    seq: 0,
                    batches: HashMap::new(),
                    dedup,
                    failure: None,
                    resubscribing: false,
                }),
                receiving: tokio::sync::Mutex::new(()),
                changed: Notify::new(),
                closed: AtomicBool::new(false),
                subscribe,
            }),
        })
    }

    pub(crate) fn core(&self) -> &Arc<ConsumerCore> {
        &self.core
    }
}

impl fmt::Debug for PulsarConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PulsarConsumer")
            .field("topic", &self.core.topic)
            .field("subscription", &self.core.subscription)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Consumer for PulsarConsumer {
    fn topic(&self) -> &Topic {
        &self.core.topic
    }

    fn subscription(&self) -> &str {
        &self.core.subscription
    }

    async fn receive(&self, timeout: Duration) -> Result<Message> {
        let core = &self.core;
        core.check_open()?;
        let _receiving = core.receiving.lock().await;
        let deadline = Instant::now() + timeout;
        loop {
            core.check_open()?;
            // register for a change before looking, so that none is missed
            let changed = core.changed.notified();
            let next = futures::future::poll_fn(|cx| core.poll_next(cx));
            let next = if timeout.is_zero() {
                next.now_or_never()
            } else {
                tokio::time::timeout_at(deadline, next).await.ok()
            };
            match next {
                None => return Err(receive_timeout(timeout)),
                Some(Next::Message(m)) => return Ok(m),
                Some(Next::Ended) => core.start_resubscribing(),
                Some(Next::Disconnected) => {
                    if core.is_closed() {
                        return Err(core.closed_error());
                    }
                    if !core.state.lock().resubscribing {
                        core.start_resubscribing();
                        continue;
                    }
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        let why = core.state.lock().failure.clone();
                        let err = receive_timeout(timeout);
                        return Err(match why {
                            Some(why) => err.with_context("disconnected", why),
                            None => err,
                        });
                    }
                }
            }
        }
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        let core = &self.core;
        let delivery = core.delivery(message)?;
        let mut state = core.state.lock();
        let ids = state.ids_to_ack(delivery);
        if ids.is_empty() {
            return Ok(());
        }
        match state.raw.as_mut() {
            Some(raw) => core.send_acks(raw, ids),
            // closed or subscribing again: the broker redelivers the message (at least once)
            None if core.is_closed() => Err(core.closed_error()),
            None => Ok(()),
        }
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        let core = &self.core;
        let delivery = core.delivery(message)?.clone();
        let mut state = core.state.lock();
        match state.raw.as_mut() {
            Some(raw) => match raw
                .nack_with_id(&core.pulsar_topic, delivery.id)
                .now_or_never()
            {
                Some(Err(e)) => Err(core.err(e.into(), "negative acknowledgement failed")),
                _ => Ok(()),
            },
            None if core.is_closed() => Err(core.closed_error()),
            None => Ok(()), // redelivered anyway when the consumer subscribes again
        }
    }

    async fn unsubscribe(&self) -> Result<()> {
        let core = &self.core;
        core.check_open()?;
        core.closed.store(true, Ordering::Release);
        let raw = core.state.lock().raw.take();
        core.changed.notify_waiters();
        let Some(mut raw) = raw else {
            return Err(Error::connection(
                "cannot unsubscribe: the consumer is disconnected from the broker",
            )
            .with_context("topic", &core.topic)
            .with_context("subscription", &core.subscription));
        };
        let result = core
            .shared
            .bounded("cannot unsubscribe", raw.unsubscribe())
            .await
            .map_err(|e| {
                e.with_context("topic", &core.topic)
                    .with_context("subscription", &core.subscription)
            });
        let _ = tokio::time::timeout(core.shared.config.operation_timeout, raw.close()).await;
        result
    }

    async fn close(&self) -> Result<()> {
        self.core.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(entry: u64, batch: Option<i32>) -> MessageIdData {
        MessageIdData {
            ledger_id: 1,
            entry_id: entry,
            batch_index: batch,
            ..Default::default()
        }
    }

    #[test]
    fn dedup_skips_copies_but_not_redeliveries() {
        let mut d = Dedup::new(2);
        assert!(d.first_time("a", &id(1, None)));
        assert!(
            d.first_time("a", &id(1, None)),
            "redelivery of the same message"
        );
        assert!(
            !d.first_time("a", &id(2, None)),
            "a second message with the same id"
        );
        assert!(d.first_time("b", &id(3, Some(0))));
        assert!(d.first_time("c", &id(3, Some(1))));
        // "a" fell out of the window of 2
        assert!(d.first_time("a", &id(4, None)));
    }

    #[test]
    fn batches_are_acknowledged_whole() {
        let mut s = State {
            raw: None,
            seq: 0,
            batches: HashMap::new(),
            dedup: None,
            failure: None,
            resubscribing: false,
        };
        let d = |i| Delivery {
            id: id(7, Some(i)),
            batch_size: 3,
        };
        assert!(s.ids_to_ack(&d(0)).is_empty());
        assert!(s.ids_to_ack(&d(0)).is_empty(), "twice is fine");
        assert!(s.already_acked(&id(7, Some(0)), 3));
        assert!(!s.already_acked(&id(7, Some(1)), 3));
        assert!(s.ids_to_ack(&d(2)).is_empty());
        let all = s.ids_to_ack(&d(1));
        assert_eq!(
            all.iter().map(|i| i.batch_index).collect::<Vec<_>>(),
            [Some(0), Some(1), Some(2)]
        );
        assert!(s.batches.is_empty());
        // a message outside a batch is acknowledged at once
        let single = Delivery {
            id: id(8, None),
            batch_size: 0,
        };
        assert_eq!(s.ids_to_ack(&single).len(), 1);
    }
}
