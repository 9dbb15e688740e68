//! The RabbitMQ consumer: a channel of its own with a prefetch, the subscription's queue declared
//! and bound as the framework declares it, manual acknowledgements. When its channel closes (a
//! broker restart, a lost connection, a channel error) the next `receive` subscribes again on a
//! new channel; what it held unacknowledged the broker redelivers.
//!
//! Batches: `receive_batch` waits for the first delivery as `receive` does, then takes what the
//! prefetch has already brought, without waiting. `acknowledge_batch` and
//! `negative_acknowledge_batch` send one `basic.ack` / `basic.nack` with `multiple=true` where the
//! batch is every open delivery of its channel up to its highest tag (`acks.rs`), and one frame
//! per delivery otherwise, all handed to the connection before any is awaited.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, Channel};
use tg_backend_api::kit::RawConsumer;
use tg_backend_api::{
    receive_timeout, AckHandle, ConsumerOptions, ConsumerType, Error, ErrorKind, Message,
    MessageId, Properties, Qos, Result, Topic, DEDUP_ID_PROPERTY,
};
use tokio::time::Instant;

use crate::acks::{Plan, Tags};
use crate::config::QueueType;
use crate::connection::bounded;
use crate::core::Core;
use crate::declare;
use crate::dedup::Dedup;
use crate::error::{convert, is_transport};
use crate::topic::{Mapping, QueueKind};

/// The header a quorum queue counts deliveries in.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// The RabbitMQ consumer (as the kit sees it; applications get it as a `Box<dyn Consumer>`).
pub struct RabbitConsumer {
    core: Arc<Core>,
    id: u64,
    topic: Topic,
    subscription: String,
    exchange: String,
    /// The subscription's queue; `None`: a server-named one per consumer.
    queue: Option<String>,
    kind: QueueKind,
    consumer_type: ConsumerType,
    /// Quorum queues count deliveries.
    counts_deliveries: bool,
    subscribed: tokio::sync::Mutex<Option<Subscribed>>,
    dedup: Option<parking_lot::Mutex<Dedup>>,
}

/// A live `basic.consume` on a channel.
struct Subscribed {
    channel: Channel,
    stream: lapin::Consumer,
    queue: ShortString,
    /// The connection generation, part of the ids of messages without a `message_id`.
    generation: u64,
    /// The channel's deliveries handed out and not settled.
    tags: Arc<Tags>,
}

/// What a message of this backend carries to be settled: its delivery's acker and the tags of
/// the channel that delivered it.
struct Settle {
    acker: Acker,
    tag: u64,
    tags: Arc<Tags>,
}

/// A message of a batch with what settles it.
type Of<'m> = (&'m Message, &'m Settle);

/// How a batch of deliveries is settled: acknowledged, or negatively acknowledged (requeued).
#[derive(Clone, Copy)]
enum Verdict {
    Ack,
    Nack,
}

impl Verdict {
    fn doing(self) -> &'static str {
        match self {
            Self::Ack => "acknowledging",
            Self::Nack => "negatively acknowledging",
        }
    }

    /// Sends the frame for `acker`'s delivery (and with `multiple`, every unsettled one
    /// before it): whether it was sent (false: settled before, or the channel is gone).
    async fn send(self, acker: &Acker, multiple: bool) -> lapin::Result<bool> {
        match self {
            Self::Ack => acker.ack(BasicAckOptions { multiple }).await,
            Self::Nack => {
                acker
                    .nack(BasicNackOptions {
                        multiple,
                        requeue: true,
                    })
                    .await
            }
        }
    }
}

impl RabbitConsumer {
    pub(crate) async fn open(
        core: Arc<Core>,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<Self> {
        let mapping = Mapping::of(topic)?;
        let queue = mapping.queue(topic, &options.subscription)?;
        if mapping.kind == QueueKind::PerConsumer && options.consumer_type != ConsumerType::Shared {
            return Err(Error::unsupported(format!(
                "on the framework's `{}` topics every consumer has a queue of its own (as the Python \
                 framework declares them), so a {} consumer has nothing to share or hand over; use Shared",
                topic.namespace(),
                options.consumer_type
            ))
            .with_context("topic", topic));
        }
        let o = &core.config.options;
        let dedup = (topic.qos() == Qos::Q2)
            .then(|| parking_lot::Mutex::new(Dedup::new(o.dedup_window, o.dedup_capacity)));
        let consumer = Self {
            id,
            topic: topic.clone(),
            subscription: options.subscription.clone(),
            exchange: mapping.exchange,
            queue,
            kind: mapping.kind,
            consumer_type: options.consumer_type,
            counts_deliveries: mapping.kind.durable() && o.queue_type == QueueType::Quorum,
            subscribed: tokio::sync::Mutex::new(None),
            dedup,
            core,
        };
        // the subscription exists when this returns
        let deadline = Instant::now() + consumer.core.config.options.connect_timeout;
        let subscribed = consumer.subscribe(deadline).await?;
        *consumer.subscribed.lock().await = Some(subscribed);
        Ok(consumer)
    }

    /// Opens a channel, declares and binds the queue and starts consuming; retries lost
    /// connections until `deadline`.
    async fn subscribe(&self, deadline: Instant) -> Result<Subscribed> {
        loop {
            let (channel, generation) = self.core.consumers.channel(deadline).await?;
            match self.setup(&channel).await {
                Ok((queue, stream)) => {
                    return Ok(Subscribed {
                        channel,
                        stream,
                        queue,
                        generation,
                        tags: Arc::default(),
                    })
                }
                Err(e) if e.kind() == ErrorKind::Connection && Instant::now() < deadline => {
                    tracing::debug!(topic = %self.topic, error = %e, "consumer channel lost while subscribing; retrying");
                }
                Err(e) => {
                    return Err(e
                        .with_context("topic", &self.topic)
                        .with_context("subscription", &self.subscription))
                }
            }
        }
    }

    async fn setup(&self, channel: &Channel) -> Result<(ShortString, lapin::Consumer)> {
        let prefetch = self.core.config.options.prefetch;
        let limit = self.core.consumers.op_timeout();
        let qos = channel.basic_qos(prefetch, BasicQosOptions::default());
        bounded(limit, "setting the prefetch", qos).await?;
        declare::exchange(channel, &self.exchange, limit).await?;
        let arguments =
            declare::arguments(self.kind, self.consumer_type, &self.core.config.options);
        let queue = declare::queue(
            channel,
            &self.exchange,
            self.queue.as_deref(),
            self.kind,
            arguments,
            limit,
        )
        .await
        .map_err(|e| self.explain_declare(e))?;
        let consume = channel.basic_consume(
            queue.clone(),
            "".into(),
            BasicConsumeOptions {
                exclusive: self.consumer_type == ConsumerType::Exclusive,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        );
        let stream = bounded(limit, &format!("consuming from queue {queue}"), consume).await?;
        Ok((queue, stream))
    }

    /// A refused queue declaration, with what usually causes it.
    fn explain_declare(&self, e: Error) -> Error {
        if e.kind() != ErrorKind::ConfigInvalid {
            return e;
        }
        let message = format!(
            "{} — the queue exists with other arguments: another client (the Python framework, or \
             a {} consumer of tg-pubsub) declared it first; a Failover subscription needs \
             x-single-active-consumer from its first declaration, and queue_type, \
             dead_letter_exchange and delivery_limit must match too",
            e.message(),
            if self.consumer_type == ConsumerType::Failover {
                "Shared or Exclusive"
            } else {
                "Failover"
            }
        );
        e.with_message(message)
    }

    /// The message of a delivery, or `None` for a q2 duplicate (acknowledged and dropped) and for
    /// a delivery its closed channel can no longer acknowledge.
    async fn accept(
        &self,
        delivery: Delivery,
        generation: u64,
        tags: &Arc<Tags>,
    ) -> Option<Message> {
        let Delivery {
            delivery_tag,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
            ..
        } = delivery;
        if acker.poisoned() {
            // delivered ahead (prefetch) on a channel that closed since: it could not be
            // acknowledged, and the broker delivers it again
            tracing::debug!(topic = %self.topic, delivery_tag, "skipping a delivery of a closed channel");
            return None;
        }
        let mut props = Properties::new();
        let mut count = 0u32;
        if let Some(headers) = properties.headers() {
            for (key, value) in headers {
                if key.as_str() == DELIVERY_COUNT {
                    count = as_count(value);
                } else {
                    props.insert(key.to_string(), text(value));
                }
            }
        }
        if let (Some(dedup), Some(dedup_id)) = (&self.dedup, props.get(DEDUP_ID_PROPERTY)) {
            if dedup.lock().is_duplicate(dedup_id, redelivered) {
                tracing::debug!(topic = %self.topic, dedup_id, "q2 duplicate dropped");
                let _ = acker.ack(BasicAckOptions::default()).await;
                return None;
            }
        }
        let id = match properties.message_id() {
            Some(id) => MessageId::from_text(id.as_str()),
            None => MessageId::from_text(format!("{generation}:{delivery_tag}")),
        };
        let key = (!routing_key.as_str().is_empty()).then(|| routing_key.to_string());
        tags.handed_out(delivery_tag);
        let settle = Settle {
            acker,
            tag: delivery_tag,
            tags: tags.clone(),
        };
        let mut message = Message::new(
            Bytes::from(data),
            props,
            id,
            AckHandle::new(self.id, delivery_tag).with_extra(settle),
        )
        .with_key(key);
        if self.counts_deliveries {
            message = message.with_redelivery_count(count);
        }
        if let Some(seconds) = properties.timestamp() {
            message =
                message.with_publish_time(std::time::UNIX_EPOCH + Duration::from_secs(*seconds));
        }
        Some(message)
    }

    fn settle_of<'m>(&self, message: &'m Message) -> Result<&'m Settle> {
        message.ack_handle().extra::<Settle>().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "the message was not delivered by a RabbitMQ consumer",
            )
        })
    }

    /// Settles `messages` with as few frames as `acks.rs` allows: per channel that delivered
    /// them, one `multiple` frame or one frame each, all handed to the connection before any is
    /// awaited. Messages settled before are left alone. The first error is returned after every
    /// frame was tried.
    async fn settle(&self, messages: &[Message], verdict: Verdict) -> Result<()> {
        let settles = messages
            .iter()
            .map(|m| self.settle_of(m).map(|s| (m, s)))
            .collect::<Result<Vec<_>>>()?;
        // the messages of each channel (one, unless the consumer subscribed again meanwhile)
        let mut channels: Vec<(&Arc<Tags>, Vec<Of<'_>>)> = Vec::new();
        for (message, settle) in settles {
            match channels
                .iter_mut()
                .find(|(t, _)| Arc::ptr_eq(t, &settle.tags))
            {
                Some((_, of)) => of.push((message, settle)),
                None => channels.push((&settle.tags, vec![(message, settle)])),
            }
        }
        let mut first_error = None;
        for (tags, mut of) in channels {
            of.sort_by_key(|(_, s)| s.tag);
            let wanted: Vec<u64> = of.iter().map(|(_, s)| s.tag).collect();
            let plan = tags.take(&wanted);
            let taken = match &plan {
                Plan::Nothing => continue,
                Plan::Multiple(taken) | Plan::Each(taken) => taken,
            };
            // a message twice in the batch is settled once
            let mut settled: Vec<&Of<'_>> = Vec::with_capacity(taken.len());
            for tag in taken {
                if let Ok(i) = of.binary_search_by_key(tag, |(_, s)| s.tag) {
                    settled.push(&of[i]);
                }
            }
            if let (Verdict::Nack, Some(dedup)) = (verdict, &self.dedup) {
                let mut dedup = dedup.lock();
                for id in settled
                    .iter()
                    .filter_map(|(m, _)| m.property(DEDUP_ID_PROPERTY))
                {
                    dedup.forget(id);
                }
            }
            let outcome = match &plan {
                Plan::Nothing => Ok(()),
                Plan::Multiple(_) => {
                    // taken in tag order: the last is the highest
                    let (message, settle) = settled.last().expect("a plan has tags");
                    tracing::trace!(topic = %self.topic, multiple_up_to = settle.tag,
                        deliveries = settled.len(), "{} with one frame", verdict.doing());
                    let sent = verdict.send(&settle.acker, true).await;
                    self.outcome(sent, &settle.acker, message, verdict)
                }
                Plan::Each(_) => {
                    let sends = settled.iter().map(|(m, s)| async move {
                        let sent = verdict.send(&s.acker, false).await;
                        self.outcome(sent, &s.acker, m, verdict)
                    });
                    futures::future::join_all(sends)
                        .await
                        .into_iter()
                        .find(Result::is_err)
                        .unwrap_or(Ok(()))
                }
            };
            tags.sent(&plan);
            match outcome {
                Ok(()) => {
                    if let (Verdict::Ack, Some(dedup)) = (verdict, &self.dedup) {
                        let mut dedup = dedup.lock();
                        for id in settled
                            .iter()
                            .filter_map(|(m, _)| m.property(DEDUP_ID_PROPERTY))
                        {
                            dedup.done(id);
                        }
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Settles one message with its own frame (unless it was settled before).
    async fn settle_one(&self, message: &Message, verdict: Verdict) -> Result<()> {
        let settle = self.settle_of(message)?;
        if !settle.tags.take_one(settle.tag) {
            return Ok(());
        }
        let dedup_id = self.dedup.as_ref().zip(message.property(DEDUP_ID_PROPERTY));
        if let (Verdict::Nack, Some((dedup, id))) = (verdict, dedup_id) {
            dedup.lock().forget(id);
        }
        let sent = verdict.send(&settle.acker, false).await;
        settle.tags.sent_one(settle.tag);
        self.outcome(sent, &settle.acker, message, verdict)?;
        if let (Verdict::Ack, Some((dedup, id))) = (verdict, dedup_id) {
            dedup.lock().done(id);
        }
        Ok(())
    }

    /// The result of one frame: sent, or why not.
    fn outcome(
        &self,
        sent: lapin::Result<bool>,
        acker: &Acker,
        message: &Message,
        verdict: Verdict,
    ) -> Result<()> {
        match sent {
            Ok(false) if acker.poisoned() => Err(Error::connection(format!(
                "the channel that delivered the message closed before {} it; the broker \
                 delivers it again",
                verdict.doing()
            ))
            .with_context("message_id", message.id())),
            // sent, or settled before through this acker
            Ok(_) => Ok(()),
            Err(e) => Err(convert(e, verdict.doing()).with_context("message_id", message.id())),
        }
    }

    /// Cancels the consume and closes the channel: the broker requeues what it held.
    async fn release(&self) -> Option<Subscribed> {
        let subscribed = self.subscribed.lock().await.take()?;
        if subscribed.channel.status().connected() {
            let cancel = subscribed
                .channel
                .basic_cancel(subscribed.stream.tag(), BasicCancelOptions::default());
            let _ = bounded(
                self.core.consumers.op_timeout(),
                "cancelling a consumer",
                cancel,
            )
            .await;
        }
        Some(subscribed)
    }
}

/// A header value as text.
fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Void => String::new(),
        other => format!("{other:?}"),
    }
}

fn as_count(value: &AMQPValue) -> u32 {
    let n: i64 = match value {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        _ => 0,
    };
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

impl RabbitConsumer {
    /// `receive`, for a caller that holds the `subscribed` lock.
    async fn next_message(
        &self,
        guard: &mut Option<Subscribed>,
        timeout: Duration,
    ) -> Result<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            let subscribed = match guard.as_mut() {
                Some(s) => s,
                None => {
                    let s = self.subscribe(deadline).await?;
                    tracing::info!(topic = %self.topic, subscription = %self.subscription, "consumer subscribed again");
                    guard.insert(s)
                }
            };
            let next = if timeout.is_zero() {
                match subscribed.stream.next().now_or_never() {
                    Some(next) => next,
                    None => return Err(receive_timeout(timeout)),
                }
            } else {
                match tokio::time::timeout_at(deadline, subscribed.stream.next()).await {
                    Ok(next) => next,
                    Err(_) => return Err(receive_timeout(timeout)),
                }
            };
            match next {
                Some(Ok(delivery)) => {
                    let generation = subscribed.generation;
                    let tags = subscribed.tags.clone();
                    if let Some(message) = self.accept(delivery, generation, &tags).await {
                        return Ok(message);
                    }
                }
                Some(Err(e)) => {
                    if !is_transport(&e) {
                        tracing::warn!(topic = %self.topic, error = %e, "consumer channel closed by the broker; subscribing again");
                    } else {
                        tracing::warn!(topic = %self.topic, error = %e, "consumer connection lost; subscribing again");
                    }
                    guard.take();
                }
                None => {
                    tracing::warn!(topic = %self.topic, "the broker cancelled the consumer (queue deleted?); subscribing again");
                    guard.take();
                }
            }
            if Instant::now() >= deadline {
                return Err(receive_timeout(timeout));
            }
        }
    }
}

impl RawConsumer for RabbitConsumer {
    async fn receive(&self, timeout: Duration) -> Result<Message> {
        let mut guard = self.subscribed.lock().await;
        self.next_message(&mut guard, timeout).await
    }

    /// The first delivery as `receive` gives it, then what the prefetch has brought already.
    async fn receive_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        let mut guard = self.subscribed.lock().await;
        let first = match self.next_message(&mut guard, timeout).await {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::Timeout => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let prefetch = usize::from(self.core.config.options.prefetch).max(1);
        let mut batch = Vec::with_capacity(max.min(prefetch));
        batch.push(first);
        while batch.len() < max {
            let Some(subscribed) = guard.as_mut() else {
                break;
            };
            match subscribed.stream.next().now_or_never() {
                // nothing more there
                None => break,
                Some(Some(Ok(delivery))) => {
                    let (generation, tags) = (subscribed.generation, subscribed.tags.clone());
                    if let Some(message) = self.accept(delivery, generation, &tags).await {
                        batch.push(message);
                    }
                }
                // the channel closed: the next call subscribes again; this batch's
                // acknowledgements fail and the broker delivers its messages again
                Some(Some(Err(e))) => {
                    tracing::warn!(topic = %self.topic, error = %e, "consumer channel closed; subscribing again");
                    guard.take();
                }
                Some(None) => {
                    tracing::warn!(topic = %self.topic, "the broker cancelled the consumer (queue deleted?); subscribing again");
                    guard.take();
                }
            }
        }
        Ok(batch)
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        self.settle_one(message, Verdict::Ack).await
    }

    async fn acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        self.settle(messages, Verdict::Ack).await
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        self.settle_one(message, Verdict::Nack).await
    }

    async fn negative_acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        self.settle(messages, Verdict::Nack).await
    }

    async fn unsubscribe(&self) -> Result<()> {
        let subscribed = self.release().await;
        let deadline = Instant::now() + self.core.config.options.connect_timeout;
        let (channel, queue) = match subscribed {
            Some(s) if s.channel.status().connected() => (s.channel, s.queue),
            Some(s) => (self.core.consumers.channel(deadline).await?.0, s.queue),
            None => match &self.queue {
                Some(q) => (
                    self.core.consumers.channel(deadline).await?.0,
                    q.as_str().into(),
                ),
                None => return Ok(()),
            },
        };
        let limit = self.core.consumers.op_timeout();
        let delete = channel.queue_delete(queue.clone(), QueueDeleteOptions::default());
        let deleted = bounded(limit, &format!("deleting queue {queue}"), delete)
            .await
            .map(drop);
        if channel.status().connected() {
            let _ = bounded(
                limit,
                "closing a channel",
                channel.close(200, "unsubscribed".into()),
            )
            .await;
        }
        deleted
    }

    async fn close(&self) -> Result<()> {
        if let Some(subscribed) = self.release().await {
            if subscribed.channel.status().connected() {
                let close = subscribed.channel.close(200, "consumer closed".into());
                let _ = bounded(self.core.consumers.op_timeout(), "closing a channel", close).await;
            }
        }
        Ok(())
    }

    fn close_sync(&self) -> bool {
        // dropping the channel closes it, and the broker requeues what it held
        match self.subscribed.try_lock() {
            Ok(mut guard) => {
                guard.take();
                true
            }
            Err(_) => false,
        }
    }
}

impl fmt::Debug for RabbitConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConsumer")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("subscription", &self.subscription)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}
