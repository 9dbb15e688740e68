//! The in-process broker's data: a topic's retained messages and de-duplication ids, and its
//! subscriptions with their pending and unacknowledged messages.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tg_backend_api::kit::Lifecycle;
use tg_backend_api::{
    AckHandle, ConsumerType, Error, ErrorKind, InitialPosition, Message, MessageId, Properties,
    Result, Topic,
};
use tokio::sync::Notify;

use crate::config::{MemoryConfig, Overflow};

/// A message as the broker stores it, shared by every subscription that holds it.
#[derive(Debug)]
pub(crate) struct Stored {
    seq: u64,
    payload: Bytes,
    properties: Properties,
    key: Option<String>,
    time: SystemTime,
}

#[derive(Debug, Clone)]
struct Delivery {
    msg: Arc<Stored>,
    redeliveries: u32,
}

#[derive(Debug)]
pub(crate) struct TopicState {
    topic: Topic,
    inner: Mutex<TopicInner>,
}

#[derive(Debug, Default)]
struct TopicInner {
    next_seq: u64,
    subs: HashMap<String, Arc<Subscription>>,
    snapshot: Arc<[Arc<Subscription>]>,
    retained: VecDeque<Arc<Stored>>,
    /// De-duplication id → the first copy's sequence number and when it came.
    dedup_ids: HashMap<String, (u64, Instant)>,
    /// De-duplication ids in the order they came, with when, for forgetting the oldest first.
    dedup_order: VecDeque<(String, Instant)>,
}

impl TopicInner {
    fn rebuild_snapshot(&mut self) {
        self.snapshot = self.subs.values().cloned().collect();
    }
}

/// The configured bounds a producer publishes within.
#[derive(Debug)]
pub(crate) struct PublishLimits {
    pub(crate) capacity: usize,
    pub(crate) overflow: Overflow,
    pub(crate) retention: usize,
    pub(crate) dedup_window: Duration,
    pub(crate) dedup_capacity: usize,
}

impl PublishLimits {
    pub(crate) fn new(config: &MemoryConfig) -> Self {
        Self {
            capacity: config.subscription_capacity,
            overflow: config.overflow,
            retention: config.retention,
            dedup_window: config.dedup_window,
            dedup_capacity: config.dedup_capacity,
        }
    }
}

/// A message not yet stored.
pub(crate) struct Unpublished {
    pub(crate) payload: Bytes,
    pub(crate) properties: Properties,
    pub(crate) key: Option<String>,
    pub(crate) dedup_id: Option<String>,
}

impl TopicState {
    pub(crate) fn new(topic: Topic) -> Self {
        Self {
            topic,
            inner: Mutex::default(),
        }
    }

    pub(crate) fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Wakes every reader and writer of the topic's subscriptions (the backend closed).
    pub(crate) fn wake_all(&self) {
        for sub in self.inner.lock().snapshot.iter() {
            sub.wake_all();
        }
    }

    /// Stores a message and hands it to every subscription, if every subscription has room;
    /// otherwise gives the message back with the first full subscription. A q2 message
    /// whose dedup id was seen within the window is dropped and the id of the first copy returned.
    pub(crate) fn try_publish(
        &self,
        message: Unpublished,
        limits: &PublishLimits,
    ) -> std::result::Result<MessageId, (Unpublished, Arc<Subscription>)> {
        let mut inner = self.inner.lock();
        if let Some(full) = inner.snapshot.iter().find(|s| !s.has_room(limits.capacity)) {
            return Err((message, full.clone()));
        }
        let Unpublished {
            payload,
            properties,
            key,
            dedup_id,
        } = message;
        if let Some(id) = &dedup_id {
            // an id past the window counts as new even before a later publish forgets it
            if let Some((seq, at)) = inner.dedup_ids.get(id) {
                if at.elapsed() <= limits.dedup_window {
                    return Ok(MessageId::from_u64(*seq));
                }
            }
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let stored = Arc::new(Stored {
            seq,
            payload,
            properties,
            key,
            time: SystemTime::now(),
        });
        if let Some(id) = dedup_id {
            let now = Instant::now();
            inner.dedup_ids.insert(id.clone(), (seq, now));
            inner.dedup_order.push_back((id, now));
            while let Some((_, at)) = inner.dedup_order.front() {
                let expired = now.duration_since(*at) > limits.dedup_window;
                if !expired && inner.dedup_order.len() <= limits.dedup_capacity {
                    break;
                }
                let Some((old, at)) = inner.dedup_order.pop_front() else {
                    break;
                };
                // the id may have come again after it expired: forget only this entry's copy
                if inner.dedup_ids.get(&old).is_some_and(|(_, t)| *t == at) {
                    inner.dedup_ids.remove(&old);
                }
            }
        }
        if limits.retention > 0 && self.topic.qos().is_persistent() {
            inner.retained.push_back(stored.clone());
            while inner.retained.len() > limits.retention {
                inner.retained.pop_front();
            }
        }
        for sub in inner.snapshot.iter() {
            sub.push(Delivery {
                msg: stored.clone(),
                redeliveries: 0,
            });
        }
        Ok(MessageId::from_u64(seq))
    }

    /// Attaches consumer `consumer` to subscription `name`, creating it if needed.
    pub(crate) fn attach(
        &self,
        name: &str,
        consumer: u64,
        consumer_type: ConsumerType,
        position: InitialPosition,
    ) -> Result<Arc<Subscription>> {
        let mut inner = self.inner.lock();
        let sub = match inner.subs.get(name) {
            Some(sub) => sub.clone(),
            None => {
                let durable = self.topic.qos().is_persistent();
                let pending: VecDeque<Delivery> =
                    if durable && position == InitialPosition::Earliest {
                        inner
                            .retained
                            .iter()
                            .map(|m| Delivery {
                                msg: m.clone(),
                                redeliveries: 0,
                            })
                            .collect()
                    } else {
                        VecDeque::new()
                    };
                let sub = Arc::new(Subscription::new(name.to_owned(), durable, pending));
                inner.subs.insert(name.to_owned(), sub.clone());
                inner.rebuild_snapshot();
                sub
            }
        };
        sub.attach(consumer, consumer_type, &self.topic)?;
        Ok(sub)
    }

    /// Removes a subscription (unsubscribe, or the last consumer of a non-durable one left).
    pub(crate) fn remove_subscription(&self, sub: &Arc<Subscription>) {
        let mut inner = self.inner.lock();
        if inner
            .subs
            .get(&sub.name)
            .is_some_and(|s| Arc::ptr_eq(s, sub))
        {
            inner.subs.remove(&sub.name);
            inner.rebuild_snapshot();
        }
        drop(inner);
        sub.mark_removed();
    }
}

#[derive(Debug)]
pub(crate) struct Subscription {
    name: String,
    durable: bool,
    inner: Mutex<SubInner>,
    /// Messages held (pending + unacknowledged), readable without the lock.
    held: AtomicUsize,
    readable: Notify,
    readers_waiting: AtomicUsize,
    writable: Notify,
    writers_waiting: AtomicUsize,
}

#[derive(Debug, Default)]
struct SubInner {
    pending: VecDeque<Delivery>,
    unacked: FxHashMap<u64, (Delivery, u64)>,
    consumers: Vec<u64>,
    consumer_type: Option<ConsumerType>,
    removed: bool,
}

impl SubInner {
    /// Puts a delivery back in sequence order with its redelivery count raised.
    fn requeue(&mut self, mut delivery: Delivery) {
        delivery.redeliveries += 1;
        let seq = delivery.msg.seq;
        let at = self.pending.partition_point(|d| d.msg.seq < seq);
        self.pending.insert(at, delivery);
    }
}

/// What the consumer learns when it takes a message.
pub(crate) enum Take {
    Message(Message),
    Empty,
}

impl Subscription {
    fn new(name: String, durable: bool, pending: VecDeque<Delivery>) -> Self {
        Self {
            name,
            durable,
            held: AtomicUsize::new(pending.len()),
            inner: Mutex::new(SubInner {
                pending,
                ..SubInner::default()
            }),
            readable: Notify::new(),
            readers_waiting: AtomicUsize::new(0),
            writable: Notify::new(),
            writers_waiting: AtomicUsize::new(0),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn attach(&self, consumer: u64, consumer_type: ConsumerType, topic: &Topic) -> Result<()> {
        let mut inner = self.inner.lock();
        if inner.removed {
            return Err(Error::new(
                ErrorKind::Closed,
                "subscription was just deleted; retry",
            ));
        }
        if let (Some(existing), false) = (inner.consumer_type, inner.consumers.is_empty()) {
            if existing != consumer_type {
                return Err(Error::new(
                    ErrorKind::ConsumerBusy,
                    format!(
                        "subscription {:?} has {existing} consumers; a {consumer_type} consumer cannot join",
                        self.name
                    ),
                )
                .with_context("topic", topic));
            }
            if existing == ConsumerType::Exclusive {
                return Err(Error::new(
                    ErrorKind::ConsumerBusy,
                    format!(
                        "subscription {:?} already has an exclusive consumer",
                        self.name
                    ),
                )
                .with_context("topic", topic));
            }
        }
        inner.consumer_type = Some(consumer_type);
        inner.consumers.push(consumer);
        Ok(())
    }

    fn push(&self, delivery: Delivery) {
        self.inner.lock().pending.push_back(delivery);
        self.held.fetch_add(1, Ordering::AcqRel);
        if self.readers_waiting.load(Ordering::SeqCst) > 0 {
            self.readable.notify_waiters();
        }
    }

    pub(crate) fn wake_all(&self) {
        self.readable.notify_waiters();
        self.writable.notify_waiters();
    }

    fn room_freed(&self) {
        if self.writers_waiting.load(Ordering::SeqCst) > 0 {
            self.writable.notify_waiters();
        }
    }

    fn wake_readers(&self) {
        if self.readers_waiting.load(Ordering::SeqCst) > 0 {
            self.readable.notify_waiters();
        }
    }

    fn has_room(&self, capacity: usize) -> bool {
        self.held.load(Ordering::Acquire) < capacity
    }

    /// Waits until the subscription has room (or fails under [`Overflow::Fail`], or once the
    /// backend closes).
    pub(crate) async fn wait_for_room(
        &self,
        limits: &PublishLimits,
        life: &Lifecycle,
    ) -> Result<()> {
        let capacity = limits.capacity;
        if self.has_room(capacity) {
            return Ok(());
        }
        if limits.overflow == Overflow::Fail {
            return Err(Error::new(
                ErrorKind::QueueFull,
                format!(
                    "subscription {:?} holds {capacity} messages (its capacity) and the overflow \
                     policy is fail",
                    self.name
                ),
            ));
        }
        loop {
            let notified = self.writable.notified();
            tokio::pin!(notified);
            self.writers_waiting.fetch_add(1, Ordering::SeqCst);
            notified.as_mut().enable();
            let room = self.has_room(capacity) || life.is_closed();
            if !room {
                notified.await;
            }
            self.writers_waiting.fetch_sub(1, Ordering::SeqCst);
            life.check_open()?;
            if room || self.has_room(capacity) {
                return Ok(());
            }
        }
    }

    /// Takes the next message for `consumer`, if it may receive now.
    pub(crate) fn try_take(&self, consumer: u64) -> Result<Take> {
        let mut taken = Vec::with_capacity(1);
        self.try_take_many(consumer, 1, &mut taken)?;
        Ok(taken.pop().map_or(Take::Empty, Take::Message))
    }

    /// Moves up to `max` messages `consumer` may receive now into `out`, under one lock.
    pub(crate) fn try_take_many(
        &self,
        consumer: u64,
        max: usize,
        out: &mut Vec<Message>,
    ) -> Result<()> {
        let mut inner = self.inner.lock();
        if inner.removed {
            return Err(Error::new(
                ErrorKind::Closed,
                "the subscription was deleted",
            ));
        }
        if inner.consumer_type == Some(ConsumerType::Failover)
            && inner.consumers.first() != Some(&consumer)
        {
            return Ok(());
        }
        for _ in 0..max {
            let Some(delivery) = inner.pending.pop_front() else {
                break;
            };
            let msg = &delivery.msg;
            out.push(
                Message::new(
                    msg.payload.clone(),
                    msg.properties.clone(),
                    MessageId::from_u64(msg.seq),
                    AckHandle::new(consumer, msg.seq),
                )
                .with_redelivery_count(delivery.redeliveries)
                .with_key(msg.key.clone())
                .with_publish_time(msg.time),
            );
            inner.unacked.insert(msg.seq, (delivery, consumer));
        }
        Ok(())
    }

    /// Registers as a waiting reader and returns the guard that unregisters.
    pub(crate) fn reader_guard(&self) -> ReaderGuard<'_> {
        self.readers_waiting.fetch_add(1, Ordering::SeqCst);
        ReaderGuard(self)
    }

    pub(crate) fn readable(&self) -> &Notify {
        &self.readable
    }

    pub(crate) fn ack(&self, seq: u64) {
        self.ack_many([seq]);
    }

    /// Acknowledges several messages under one lock.
    pub(crate) fn ack_many(&self, seqs: impl IntoIterator<Item = u64>) {
        let removed = {
            let mut inner = self.inner.lock();
            seqs.into_iter()
                .filter(|seq| inner.unacked.remove(seq).is_some())
                .count()
        };
        if removed > 0 {
            self.held.fetch_sub(removed, Ordering::AcqRel);
            self.room_freed();
        }
    }

    pub(crate) fn nack(&self, seq: u64) {
        let mut inner = self.inner.lock();
        if let Some((delivery, _)) = inner.unacked.remove(&seq) {
            inner.requeue(delivery);
            drop(inner);
            self.wake_readers();
        }
    }

    /// Detaches a consumer: what it held goes back, in order, with a raised redelivery count.
    /// Returns whether the subscription is now unused and not durable (so it should be removed).
    pub(crate) fn detach(&self, consumer: u64) -> bool {
        let mut inner = self.inner.lock();
        inner.consumers.retain(|c| *c != consumer);
        let held: Vec<u64> = inner
            .unacked
            .iter()
            .filter(|(_, (_, c))| *c == consumer)
            .map(|(seq, _)| *seq)
            .collect();
        let mut returned: Vec<Delivery> = held
            .iter()
            .filter_map(|seq| inner.unacked.remove(seq))
            .map(|(d, _)| d)
            .collect();
        returned.sort_by_key(|d| d.msg.seq);
        for delivery in returned {
            inner.requeue(delivery);
        }
        let unused = inner.consumers.is_empty();
        if unused {
            inner.consumer_type = None;
        }
        drop(inner);
        self.wake_readers();
        unused && !self.durable
    }

    fn mark_removed(&self) {
        let mut inner = self.inner.lock();
        inner.removed = true;
        inner.pending.clear();
        inner.unacked.clear();
        self.held.store(0, Ordering::Release);
        drop(inner);
        self.wake_all();
    }
}

pub(crate) struct ReaderGuard<'a>(&'a Subscription);

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        self.0.readers_waiting.fetch_sub(1, Ordering::SeqCst);
    }
}
