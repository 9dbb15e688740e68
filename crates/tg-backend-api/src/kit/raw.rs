//! The traits a backend implements. The kit turns them into the public [`Backend`](crate::Backend),
//! [`Producer`](crate::Producer) and [`Consumer`](crate::Consumer), doing once, for every backend,
//! what each would otherwise repeat: closed checks, option and capability checks, the payload
//! limit, q2 de-duplication ids, acknowledgement ownership, closing on drop and on backend close.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use tg_topic::{Qos, Topic};

use super::Lifecycle;
use crate::{
    Capabilities, ConsumerOptions, ConsumerType, Message, OutboundMessage, ProducerOptions, Result,
    SendReceipt,
};

/// Something a backend may lack, for the `Unsupported` error (or log line) that says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Consumers of this type.
    Consumer(ConsumerType),
    /// Retained messages.
    Retained,
    /// Replaying from [`InitialPosition::Earliest`](crate::InitialPosition::Earliest).
    Earliest,
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Consumer(t) => write!(f, "{t} consumers"),
            Self::Retained => f.write_str("retained messages"),
            Self::Earliest => f.write_str("replay from the earliest message"),
        }
    }
}

/// A backend, before the kit's checks. Every type implementing it is a
/// [`Backend`](crate::Backend) (a blanket impl does the checks and wraps producers and consumers).
///
/// Method names differ from [`Backend`](crate::Backend)'s so both traits can be in scope.
pub trait RawBackend: Send + Sync + fmt::Debug + 'static {
    /// The backend's producer.
    type Producer: RawProducer;
    /// The backend's consumer.
    type Consumer: RawConsumer;

    /// The name `PUBSUB_BACKEND` spells it with.
    const NAME: &'static str;

    /// The backend's lifecycle: its closed state and live producers and consumers.
    fn lifecycle(&self) -> &Lifecycle;

    /// What the backend guarantees for topics of `qos`.
    fn caps(&self, qos: Qos) -> Capabilities;

    /// Why the backend lacks `feature` on `qos` topics: the text of the `Unsupported` error (or
    /// of the log line, for [`Feature::Earliest`]). Say what the broker does instead.
    fn why_not(&self, qos: Qos, feature: Feature) -> Cow<'static, str> {
        Cow::Owned(format!(
            "the {} backend has no {feature} on {qos} topics",
            Self::NAME
        ))
    }

    /// Creates a producer. The kit has checked that the backend is open.
    fn open_producer(
        &self,
        topic: &Topic,
        options: &ProducerOptions,
    ) -> impl Future<Output = Result<Self::Producer>> + Send;

    /// Creates a consumer with id `id` (put it in the [`AckHandle`](crate::AckHandle)s of the
    /// messages it delivers). The kit has checked that the backend is open, the options are
    /// valid and the consumer type is among the capabilities of the topic's quality of service.
    fn open_consumer(
        &self,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> impl Future<Output = Result<Self::Consumer>> + Send;

    /// Checks that the broker answers.
    fn probe(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Removes `topic` and everything the broker keeps for it (see
    /// [`Backend::delete_topic`](crate::Backend::delete_topic)). The kit has checked that the
    /// backend is open. By default: [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported).
    fn remove_topic(&self, topic: &Topic) -> impl Future<Output = Result<()>> + Send {
        let err = crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!("the {} backend cannot delete topic {topic}", Self::NAME),
        );
        async move { Err(err) }
    }

    /// Releases the backend's connections; called once, after every live producer and consumer
    /// was closed.
    fn shutdown(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}

/// A producer, before the kit's checks. The kit has checked, before `send`, that the producer and
/// its backend are open, the payload is within `max_payload`, a retained message is allowed, and
/// (on q2 topics) that the message has its de-duplication id.
pub trait RawProducer: Send + Sync + fmt::Debug + 'static {
    /// Hands a message to the broker (see [`Producer::send`](crate::Producer::send)).
    fn send(&self, message: OutboundMessage) -> impl Future<Output = Result<SendReceipt>> + Send;

    /// Hands several messages to the broker in order, one receipt each (see
    /// [`Producer::send_batch`](crate::Producer::send_batch)); the kit has checked every message
    /// as for `send`. The default sends one after the other; override it where the broker takes a
    /// batch in one request.
    fn send_batch(
        &self,
        messages: Vec<OutboundMessage>,
    ) -> impl Future<Output = Result<Vec<SendReceipt>>> + Send {
        async move {
            let mut receipts = Vec::with_capacity(messages.len());
            for message in messages {
                receipts.push(self.send(message).await?);
            }
            Ok(receipts)
        }
    }

    /// Waits until every message sent so far was accepted.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;

    /// Flushes and releases the producer; called once.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;

    /// Called when the producer is dropped without `close`: release it without awaiting if that
    /// is possible and return true; otherwise the kit runs `close` on the current tokio runtime.
    fn close_sync(&self) -> bool {
        false
    }
}

/// A consumer, before the kit's checks. The kit has checked that the consumer and its backend are
/// open, and that a message handed back was delivered by this consumer; a `receive` in progress
/// ends with [`ErrorKind::Closed`](crate::ErrorKind::Closed) as soon as either closes.
pub trait RawConsumer: Send + Sync + fmt::Debug + 'static {
    /// The next message (see [`Consumer::receive`](crate::Consumer::receive)).
    fn receive(&self, timeout: Duration) -> impl Future<Output = Result<Message>> + Send;

    /// Up to `max` (at least 1) messages: the first within `timeout`, then what is already
    /// there; an empty batch when none came (see
    /// [`Consumer::receive_batch`](crate::Consumer::receive_batch)). The default calls
    /// `receive`; override it where the broker hands out several messages per request.
    fn receive_batch(
        &self,
        max: usize,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send {
        crate::backend::collect_batch(max, timeout, move |wait| self.receive(wait))
    }

    /// Acknowledges a message this consumer delivered.
    fn acknowledge(&self, message: &Message) -> impl Future<Output = Result<()>> + Send;

    /// Acknowledges messages this consumer delivered (the kit checked each). The default
    /// acknowledges one after the other; override it where the broker takes a list.
    fn acknowledge_batch(&self, messages: &[Message]) -> impl Future<Output = Result<()>> + Send {
        async move {
            for message in messages {
                self.acknowledge(message).await?;
            }
            Ok(())
        }
    }

    /// Negatively acknowledges a message this consumer delivered.
    fn negative_acknowledge(&self, message: &Message) -> impl Future<Output = Result<()>> + Send;

    /// Negatively acknowledges messages this consumer delivered (the kit checked each).
    fn negative_acknowledge_batch(
        &self,
        messages: &[Message],
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            for message in messages {
                self.negative_acknowledge(message).await?;
            }
            Ok(())
        }
    }

    /// Deletes the subscription and releases the consumer; called once, instead of `close`.
    fn unsubscribe(&self) -> impl Future<Output = Result<()>> + Send;

    /// Releases the consumer (unacknowledged messages go back where the backend can); called once.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;

    /// Called when the consumer is dropped without `close`: release it without awaiting if that
    /// is possible and return true; otherwise the kit runs `close` on the current tokio runtime.
    fn close_sync(&self) -> bool {
        false
    }
}
