//! Consumers: one `pulsar::Consumer` per tg consumer.
//!
//! The `pulsar` crate's consumer is a `Stream` that needs `&mut` to receive and to acknowledge,
//! while tg consumers are shared between tasks (`&self`). It lives in a mutex that is only held
//! for a poll or to queue an acknowledgement (the crate queues both on unbounded channels to its
//! own engine task, so neither waits), never across an `.await`; `receive` polls the stream
//! directly, so a message takes no extra task hop. One `receive` runs at a time.
//!
//! On top of what the crate does: batches are acknowledged whole (`batch.rs`), q2 copies are
//! dropped (`dedup.rs`), and the consumer subscribes again after the crate gave up: the crate
//! re-subscribes once after its connection broke and then ends the stream; the consumer then
//! subscribes again in the background, with back-off, until it works or the consumer is closed.
//!
//! Batches: `receive_batch` waits for the first message as `receive` does, then takes what the
//! crate has already buffered (up to `receiver_queue` messages) under one lock, without waiting.
//! `acknowledge_batch` sends one cumulative acknowledgement where that acknowledges exactly
//! what the application acknowledged (`batch.rs`: `Exclusive` and `Failover` subscriptions, with
//! nothing handed out below it still unacknowledged), and one acknowledgement per message
//! otherwise: the crate's consumer takes one id per acknowledgement, so the protocol's id lists
//! are out of reach. `negative_acknowledge_batch` asks once per broker entry (a nack brings the
//! whole entry back).

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use pulsar::consumer::InitialPosition as PulsarPosition;
use pulsar::proto::MessageIdData;
use pulsar::{SubType, TokioExecutor};
use tg_backend_api::kit::RawConsumer;
use tg_backend_api::{
    receive_timeout, AckHandle, Backoff, ConsumerOptions, ConsumerType, Error, ErrorKind,
    InitialPosition, Message, Properties, Qos, Result, Topic, DEDUP_ID_PROPERTY,
};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batch::{entry_key, BatchAcks, Delivery, EntryKey, OpenEntries};
use crate::core::Core;
use crate::dedup::Dedup;
use crate::error::kind_of;
use crate::message_id::message_id;
use crate::topic::pulsar_topic;

type Stream = pulsar::Consumer<Vec<u8>, TokioExecutor>;

/// Subscribes (again) with the consumer's settings.
type Subscribe =
    Box<dyn Fn() -> BoxFuture<'static, std::result::Result<Stream, pulsar::Error>> + Send + Sync>;

/// Everything behind the consumer's mutex.
struct State {
    /// None while subscribing again, and after close.
    stream: Option<Stream>,
    seq: u64,
    batches: BatchAcks,
    /// What this consumer handed out and has not acknowledged, where a cumulative
    /// acknowledgement can stand for several (`Exclusive` and `Failover` subscriptions of
    /// persistent topics); `None` elsewhere.
    open: Option<OpenEntries>,
    dedup: Option<Dedup>,
    /// Why the consumer is disconnected, when it is.
    failure: Option<String>,
    resubscribing: bool,
}

/// The part of a consumer its background re-subscription shares.
struct Shared {
    core: Arc<Core>,
    topic: Topic,
    pulsar_topic: String,
    subscription: String,
    id: u64,
    state: Mutex<State>,
    /// One `receive` at a time: the stream keeps one waker.
    receiving: tokio::sync::Mutex<()>,
    /// Signalled when the consumer subscribed again.
    resubscribed: Notify,
    /// Cancelled when the consumer or its backend closes: stops the re-subscription.
    stop: CancellationToken,
    subscribe: Subscribe,
}

/// What one poll of the stream gave.
enum Next {
    Message(Message),
    /// The stream ended: the crate gave up on the subscription.
    Ended,
    /// No stream right now (subscribing again, or closed).
    Disconnected,
}

impl Shared {
    fn err(&self, e: pulsar::Error, what: &str) -> Error {
        self.core
            .err(e, what)
            .with_context("topic", &self.topic)
            .with_context("subscription", &self.subscription)
    }

    /// Queues acknowledgements with the crate's engine (never waits).
    fn send_acks(&self, stream: &mut Stream, ids: Vec<MessageIdData>) -> Result<()> {
        for id in ids {
            match stream.ack_with_id(&self.pulsar_topic, id).now_or_never() {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(self.err(e.into(), "acknowledgement failed")),
                None => tracing::warn!(topic = %self.pulsar_topic, "acknowledgement not queued"),
            }
        }
        Ok(())
    }

    /// Queues one cumulative acknowledgement of everything up to the entry of `id`.
    fn send_cumulative(&self, stream: &mut Stream, id: &MessageIdData) -> Result<()> {
        // the entry's position, without a batch index: the whole entry is acknowledged (the
        // Java client sends a completed batch so too)
        let entry = MessageIdData {
            ledger_id: id.ledger_id,
            entry_id: id.entry_id,
            partition: id.partition,
            ..Default::default()
        };
        match stream
            .cumulative_ack_with_id(&self.pulsar_topic, entry)
            .now_or_never()
        {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(self.err(e.into(), "acknowledgement failed")),
            None => {
                tracing::warn!(topic = %self.pulsar_topic, "acknowledgement not queued");
                Ok(())
            }
        }
    }

    /// Polls the stream for the next message to hand out, skipping what is not handed out.
    fn poll_next(&self, cx: &mut std::task::Context<'_>) -> Poll<Next> {
        let mut state = self.state.lock();
        self.poll_one(&mut state, cx)
    }

    /// Adds to `batch` what the crate has buffered, up to `max` messages, without waiting.
    /// Returns true when the stream ended meanwhile (the caller subscribes again).
    fn drain(&self, cx: &mut std::task::Context<'_>, batch: &mut Vec<Message>, max: usize) -> bool {
        let mut state = self.state.lock();
        while batch.len() < max {
            match self.poll_one(&mut state, cx) {
                Poll::Ready(Next::Message(m)) => batch.push(m),
                Poll::Ready(Next::Ended) => return true,
                Poll::Ready(Next::Disconnected) | Poll::Pending => break,
            }
        }
        false
    }

    /// One message to hand out, polling the stream as often as it takes.
    fn poll_one(&self, state: &mut State, cx: &mut std::task::Context<'_>) -> Poll<Next> {
        loop {
            let Some(stream) = state.stream.as_mut() else {
                return Poll::Ready(Next::Disconnected);
            };
            let raw = match stream.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    state.stream = None;
                    return Poll::Ready(Next::Ended);
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(topic = %self.pulsar_topic, error = %e, "Pulsar consumer error");
                    continue;
                }
                Poll::Ready(Some(Ok(m))) => m,
            };
            if let Some(message) = self.convert(state, raw) {
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
        if state.batches.already_acked(&id, batch_size) {
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
                let ids = state.batches.ids_to_ack(&delivery);
                if let (false, Some(open)) = (ids.is_empty(), state.open.as_mut()) {
                    open.acknowledged(&entry_key(&delivery.id));
                }
                if let Some(stream) = state.stream.as_mut() {
                    let _ = self.send_acks(stream, ids);
                }
                return None;
            }
        }
        state.seq += 1;
        if let Some(open) = state.open.as_mut() {
            open.handed_out(entry_key(&delivery.id));
        }
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

    /// Subscribes again in the background (once at a time), with back-off, until it works or
    /// the consumer closes.
    fn start_resubscribing(self: &Arc<Self>) {
        {
            let mut state = self.state.lock();
            if state.resubscribing || self.stop.is_cancelled() {
                return;
            }
            state.resubscribing = true;
            state.failure = Some("the connection to the broker broke; subscribing again".into());
        }
        tracing::warn!(server = %self.core.server, topic = %self.pulsar_topic,
            "the Pulsar consumer stopped; subscribing again");
        let weak: Weak<Self> = Arc::downgrade(self);
        let stop = self.stop.clone();
        let backoff =
            Backoff::new(Duration::from_millis(100), self.core.config.reconnect_max).jitter(false);
        tokio::spawn(async move {
            for retry in 1.. {
                let Some(attempt) = weak.upgrade().map(|shared| (shared.subscribe)()) else {
                    return;
                };
                let outcome = attempt.await;
                let Some(shared) = weak.upgrade() else { return };
                let delay = backoff.delay(retry);
                match outcome {
                    Ok(mut stream) if stop.is_cancelled() => {
                        // closed meanwhile: this subscription is nobody's
                        let _ = stream.close().await;
                        return;
                    }
                    Ok(stream) => {
                        {
                            let mut state = shared.state.lock();
                            state.stream = Some(stream);
                            state.failure = None;
                            state.resubscribing = false;
                        }
                        tracing::info!(topic = %shared.pulsar_topic, "the Pulsar consumer subscribed again");
                        shared.resubscribed.notify_waiters();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(topic = %shared.pulsar_topic, error = %e, ?delay,
                            "subscribing again failed; retrying");
                        shared.state.lock().failure = Some(format!("cannot subscribe again: {e}"));
                    }
                }
                drop(shared);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return,
                }
            }
        });
    }

    fn delivery<'m>(&self, message: &'m Message) -> Result<&'m Delivery> {
        message.ack_handle().extra::<Delivery>().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "the message was not received by a Pulsar consumer",
            )
            .with_context("subscription", &self.subscription)
        })
    }

    /// Takes the stream away (closing or unsubscribing) and stops the re-subscription.
    fn take_stream(&self) -> Option<Stream> {
        self.stop.cancel();
        self.state.lock().stream.take()
    }
}

/// The Pulsar consumer of one subscription (as the kit sees it; applications get it as a
/// `Box<dyn Consumer>`).
pub struct PulsarConsumer {
    shared: Arc<Shared>,
}

impl PulsarConsumer {
    pub(crate) async fn create(
        core: Arc<Core>,
        topic: Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<Self> {
        let config = &core.config;
        let ptopic = pulsar_topic(&topic);
        let sub_type = match options.consumer_type {
            ConsumerType::Shared => SubType::Shared,
            ConsumerType::Exclusive => SubType::Exclusive,
            ConsumerType::Failover => SubType::Failover,
        };
        // a non-persistent topic keeps nothing to start from (the kit logs that)
        let position = match (topic.qos(), options.initial_position) {
            (Qos::Q0, _) | (_, InitialPosition::Latest) => PulsarPosition::Latest,
            (_, InitialPosition::Earliest) => PulsarPosition::Earliest,
        };
        let pulsar_options = pulsar::ConsumerOptions {
            initial_position: position,
            receiver_queue_size: Some(config.receiver_queue),
            ..Default::default()
        };
        let subscribe: Subscribe = {
            let client = core.consumer_client.clone();
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
        let stream = core
            .bounded("cannot subscribe", subscribe())
            .await
            .map_err(|e| {
                e.with_context("topic", &topic)
                    .with_context("subscription", &options.subscription)
            })?;
        let dedup = (topic.qos() == Qos::Q2 && config.dedup_capacity > 0)
            .then(|| Dedup::new(config.dedup_capacity));
        // acknowledgements change nothing on a non-persistent topic
        let open = (options.consumer_type != ConsumerType::Shared && topic.qos() != Qos::Q0)
            .then(OpenEntries::default);
        let stop = core.life.token().child_token();
        Ok(Self {
            shared: Arc::new(Shared {
                core,
                topic,
                pulsar_topic: ptopic,
                subscription: options.subscription.clone(),
                id,
                state: Mutex::new(State {
                    stream: Some(stream),
                    seq: 0,
                    batches: BatchAcks::default(),
                    open,
                    dedup,
                    failure: None,
                    resubscribing: false,
                }),
                receiving: tokio::sync::Mutex::new(()),
                resubscribed: Notify::new(),
                stop,
                subscribe,
            }),
        })
    }
}

impl fmt::Debug for PulsarConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PulsarConsumer")
            .field("id", &self.shared.id)
            .field("pulsar_topic", &self.shared.pulsar_topic)
            .field("subscription", &self.shared.subscription)
            .finish_non_exhaustive()
    }
}

impl PulsarConsumer {
    /// `receive`, for a caller that holds `receiving`.
    async fn receive_locked(&self, timeout: Duration) -> Result<Message> {
        let shared = &self.shared;
        let deadline = Instant::now() + timeout;
        loop {
            // register for a change before looking, so that none is missed
            let resubscribed = shared.resubscribed.notified();
            let next = futures::future::poll_fn(|cx| shared.poll_next(cx));
            let next = if timeout.is_zero() {
                next.now_or_never()
            } else {
                tokio::time::timeout_at(deadline, next).await.ok()
            };
            match next {
                None => return Err(receive_timeout(timeout)),
                Some(Next::Message(m)) => return Ok(m),
                Some(Next::Ended) => shared.start_resubscribing(),
                Some(Next::Disconnected) => {
                    if shared.stop.is_cancelled() {
                        return Err(Error::closed("Pulsar consumer"));
                    }
                    if !shared.state.lock().resubscribing {
                        shared.start_resubscribing();
                        continue;
                    }
                    if tokio::time::timeout_at(deadline, resubscribed)
                        .await
                        .is_err()
                    {
                        let why = shared.state.lock().failure.clone();
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
}

impl RawConsumer for PulsarConsumer {
    async fn receive(&self, timeout: Duration) -> Result<Message> {
        let _receiving = self.shared.receiving.lock().await;
        self.receive_locked(timeout).await
    }

    /// The first message as `receive` gives it, then what the crate has buffered.
    async fn receive_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        let shared = &self.shared;
        let _receiving = shared.receiving.lock().await;
        let first = match self.receive_locked(timeout).await {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::Timeout => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut batch = Vec::with_capacity(max.min(shared.core.config.receiver_queue as usize));
        batch.push(first);
        let ended =
            futures::future::poll_fn(|cx| Poll::Ready(shared.drain(cx, &mut batch, max))).await;
        if ended {
            shared.start_resubscribing();
        }
        Ok(batch)
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        let shared = &self.shared;
        let delivery = shared.delivery(message)?;
        let mut state = shared.state.lock();
        let ids = state.batches.ids_to_ack(delivery);
        if let (false, Some(open)) = (ids.is_empty(), state.open.as_mut()) {
            open.acknowledged(&entry_key(&delivery.id));
        }
        match state.stream.as_mut() {
            Some(stream) if !ids.is_empty() => shared.send_acks(stream, ids),
            // subscribing again: the broker redelivers the message (at least once)
            _ => Ok(()),
        }
    }

    /// One cumulative acknowledgement where it acknowledges exactly these messages' entries
    /// and what was acknowledged before them (see `batch.rs`); one per message otherwise.
    async fn acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        let shared = &self.shared;
        let deliveries = messages
            .iter()
            .map(|m| shared.delivery(m))
            .collect::<Result<Vec<_>>>()?;
        let mut state = shared.state.lock();
        let state = &mut *state;
        let mut ids = Vec::new();
        // the highest entry this batch completes, and a message id of it
        let mut highest: Option<(EntryKey, &MessageIdData)> = None;
        for delivery in deliveries {
            let acked = state.batches.ids_to_ack(delivery);
            if acked.is_empty() {
                continue;
            }
            let key = entry_key(&delivery.id);
            if let Some(open) = state.open.as_mut() {
                open.acknowledged(&key);
            }
            if highest.is_none_or(|(h, _)| (key.0, key.1) > (h.0, h.1)) {
                highest = Some((key, &delivery.id));
            }
            ids.extend(acked);
        }
        let Some(stream) = state.stream.as_mut() else {
            // subscribing again: the broker redelivers the messages (at least once)
            return Ok(());
        };
        match (highest, &state.open) {
            (Some((key, id)), Some(open)) if ids.len() > 1 && open.cumulative_allowed(&key) => {
                tracing::trace!(topic = %shared.pulsar_topic, cumulative_up_to = ?key,
                    ids = ids.len(), "one cumulative acknowledgement");
                shared.send_cumulative(stream, id)
            }
            _ if ids.is_empty() => Ok(()),
            _ => shared.send_acks(stream, ids),
        }
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        self.negative_acknowledge_batch(std::slice::from_ref(message))
            .await
    }

    /// One redelivery request per broker entry: the broker brings an entry back whole, and
    /// the consumer drops the messages of it that were acknowledged already.
    async fn negative_acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        let shared = &self.shared;
        let deliveries = messages
            .iter()
            .map(|m| shared.delivery(m))
            .collect::<Result<Vec<_>>>()?;
        let mut asked = HashSet::with_capacity(deliveries.len());
        let mut state = shared.state.lock();
        let Some(stream) = state.stream.as_mut() else {
            return Ok(()); // redelivered anyway when the consumer subscribes again
        };
        for delivery in deliveries {
            if !asked.insert(entry_key(&delivery.id)) {
                continue;
            }
            if let Some(Err(e)) = stream
                .nack_with_id(&shared.pulsar_topic, delivery.id.clone())
                .now_or_never()
            {
                return Err(shared.err(e.into(), "negative acknowledgement failed"));
            }
        }
        Ok(())
    }

    async fn unsubscribe(&self) -> Result<()> {
        let shared = &self.shared;
        let Some(mut stream) = shared.take_stream() else {
            return Err(Error::connection(
                "cannot unsubscribe: the consumer is disconnected from the broker",
            )
            .with_context("topic", &shared.topic)
            .with_context("subscription", &shared.subscription));
        };
        let result = shared
            .core
            .bounded("cannot unsubscribe", stream.unsubscribe())
            .await
            .map_err(|e| {
                e.with_context("topic", &shared.topic)
                    .with_context("subscription", &shared.subscription)
            });
        let timeout = shared.core.config.operation_timeout;
        let _ = tokio::time::timeout(timeout, stream.close()).await;
        result
    }

    /// Closes the consumer; its unacknowledged messages go back to the subscription.
    async fn close(&self) -> Result<()> {
        let shared = &self.shared;
        let Some(mut stream) = shared.take_stream() else {
            return Ok(());
        };
        let timeout = shared.core.config.operation_timeout;
        match tokio::time::timeout(timeout, stream.close()).await {
            Ok(Err(e)) if kind_of(&e) != ErrorKind::Connection => {
                Err(shared.err(e, "closing the consumer"))
            }
            _ => Ok(()), // closed, or the connection is gone and the broker dropped it already
        }
    }
}
