//! The backend, producer and consumer traits.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use tg_topic::{Qos, Topic};
use tokio::sync::oneshot;

use crate::{
    Capabilities, ConsumerOptions, Error, ErrorKind, Message, MessageId, OutboundMessage,
    ProducerOptions, Properties, Result,
};

/// A connection to one broker (or the in-process broker), able to create producers and consumers
/// for [`Topic`]s. Backends are chosen at run time and used as `Arc<dyn Backend>`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::time::Duration;
/// use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage};
///
/// let backend: std::sync::Arc<dyn Backend> = std::sync::Arc::new(tg_backend_memory::MemoryBackend::new());
/// let topic = tg_topic::topic("greetings")?;
/// let consumer = backend.create_consumer(&topic, ConsumerOptions::new("reader")).await?;
/// let producer = backend.create_producer(&topic, Default::default()).await?;
///
/// producer.send(OutboundMessage::new("hello").property("lang", "en")).await?.await?;
/// let msg = consumer.receive(Duration::from_secs(1)).await?;
/// assert_eq!(msg.payload().as_ref(), b"hello");
/// assert_eq!(msg.property("lang"), Some("en"));
/// consumer.acknowledge(&msg).await?;
/// backend.close().await
/// # }
/// ```
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// The backend's name as `PUBSUB_BACKEND` spells it (`memory`, `redis`, …).
    fn name(&self) -> &'static str;

    /// What the backend guarantees for topics of this quality of service.
    fn capabilities(&self, qos: Qos) -> Capabilities;

    /// Creates a producer for `topic`.
    async fn create_producer(
        &self,
        topic: &Topic,
        options: ProducerOptions,
    ) -> Result<Box<dyn Producer>>;

    /// Creates a consumer of `topic` in subscription `options.subscription`, creating the
    /// subscription at `options.initial_position` if it does not exist. When this returns, the
    /// subscription exists: every message sent afterwards reaches it.
    ///
    /// Fails with [`ErrorKind::ConsumerBusy`] for a second exclusive consumer,
    /// [`ErrorKind::Unsupported`] for a consumer type the backend lacks, and
    /// [`ErrorKind::ConfigInvalid`] for an invalid subscription name.
    async fn create_consumer(
        &self,
        topic: &Topic,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>>;

    /// Checks that the broker answers.
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    /// Removes `topic` from the broker with everything the broker keeps for it: its messages and
    /// every subscription's state (streams and consumer groups, rows, queues, topics), for tools
    /// and tests that made a topic of their own and must leave nothing behind (the CLI bench).
    /// Close the topic's producers and consumers first: what becomes of live ones is the
    /// broker's (each backend's page says). Deleting a topic that does not exist succeeds.
    ///
    /// Fails with [`ErrorKind::Unsupported`] (and the reason) where the broker's client protocol
    /// cannot delete topics.
    async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("the {} backend cannot delete topic {topic}", self.name()),
        ))
    }

    /// Closes the backend; producers and consumers created from it fail with
    /// [`ErrorKind::Closed`] afterwards.
    async fn close(&self) -> Result<()>;
}

/// Sends messages to one topic. Shareable between tasks (`&self` methods).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use tg_backend_api::{Backend, OutboundMessage, Producer};
/// let backend = tg_backend_memory::MemoryBackend::new();
/// let producer = backend.create_producer(&tg_topic::topic("events")?, Default::default()).await?;
/// // Fire now, confirm later: many sends can be in flight.
/// let receipt = producer.send(OutboundMessage::new("a")).await?;
/// let id = receipt.await?;
/// // Or both at once:
/// let id2 = producer.send_and_wait(bytes::Bytes::from_static(b"b"), Default::default()).await?;
/// assert_ne!(id, id2);
/// producer.flush().await?;
/// producer.close().await
/// # }
/// ```
#[async_trait]
pub trait Producer: Send + Sync + fmt::Debug {
    /// The topic this producer sends to.
    fn topic(&self) -> &Topic;

    /// Hands a message to the backend, waiting while its bounded buffer is full. Fails at once
    /// with [`ErrorKind::PayloadTooLarge`] when the payload exceeds the backend's limit (nothing
    /// is sent). The returned [`SendReceipt`] resolves when the broker has accepted the message.
    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt>;

    /// Sends and waits for the broker to accept the message.
    async fn send_and_wait(&self, payload: Bytes, properties: Properties) -> Result<MessageId> {
        self.send(OutboundMessage::new(payload).with_properties(properties))
            .await?
            .await
    }

    /// Hands several messages to the backend in one call, in order, and returns one receipt per
    /// message. Every payload is checked against the backend's limit before anything is sent,
    /// so a too-large message fails the call with nothing sent. Backends whose broker takes a
    /// batch in one request (a Redis pipeline, a multi-row insert) send it so; the others send
    /// one message after the other.
    async fn send_batch(&self, messages: Vec<OutboundMessage>) -> Result<Vec<SendReceipt>> {
        let mut receipts = Vec::with_capacity(messages.len());
        for message in messages {
            receipts.push(self.send(message).await?);
        }
        Ok(receipts)
    }

    /// Waits until every message sent so far has been accepted by the broker.
    async fn flush(&self) -> Result<()>;

    /// Flushes and closes the producer.
    async fn close(&self) -> Result<()>;
}

/// Receives messages of one subscription. Shareable between tasks (`&self` methods), so handlers
/// can acknowledge while another task receives.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::time::Duration;
/// use tg_backend_api::{Backend, ConsumerOptions, ErrorKind};
/// let backend = tg_backend_memory::MemoryBackend::new();
/// let consumer = backend.create_consumer(&tg_topic::topic("jobs")?, ConsumerOptions::new("w")).await?;
/// let err = consumer.receive(Duration::from_millis(10)).await.unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Timeout);
/// consumer.close().await
/// # }
/// ```
#[async_trait]
pub trait Consumer: Send + Sync + fmt::Debug {
    /// The topic consumed.
    fn topic(&self) -> &Topic;

    /// The subscription name.
    fn subscription(&self) -> &str;

    /// The next message, waiting at most `timeout`; fails with [`ErrorKind::Timeout`] when none
    /// came (`Duration::ZERO` only takes what is already there).
    async fn receive(&self, timeout: Duration) -> Result<Message>;

    /// Up to `max` messages: waits at most `timeout` for the first, then takes what is already
    /// there without waiting more. An empty batch means none came within `timeout`; `max` 0 is
    /// an [`ErrorKind::InvalidInput`] error. Messages come in the order `receive` would give them.
    async fn receive_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        check_batch_max(max)?;
        collect_batch(max, timeout, |wait| self.receive(wait)).await
    }

    /// Marks the message as processed: it is not delivered to this subscription again.
    /// Acknowledging twice is not an error.
    async fn acknowledge(&self, message: &Message) -> Result<()>;

    /// Acknowledges several messages in one call (one broker request where the broker allows).
    /// Every message must come from this consumer; if one does not, nothing is acknowledged.
    async fn acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        for message in messages {
            self.acknowledge(message).await?;
        }
        Ok(())
    }

    /// Negatively acknowledges several messages in one call (see
    /// [`negative_acknowledge`](Consumer::negative_acknowledge)).
    async fn negative_acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        for message in messages {
            self.negative_acknowledge(message).await?;
        }
        Ok(())
    }

    /// Marks the message as failed: it becomes deliverable again with a higher redelivery count
    /// (where [`Capabilities::nack_redelivery`] holds; see the backend's docs otherwise).
    async fn negative_acknowledge(&self, message: &Message) -> Result<()>;

    /// Deletes the subscription with everything it still holds, and closes this consumer.
    async fn unsubscribe(&self) -> Result<()>;

    /// Closes the consumer. Messages it held unacknowledged go back to the subscription
    /// (where [`Capabilities::redeliver_unacked_on_close`] holds).
    async fn close(&self) -> Result<()>;
}

/// Resolves when the broker has accepted a sent message, to its [`MessageId`].
///
/// Dropping a receipt does not cancel the send.
#[must_use = "a receipt tells whether the broker accepted the message"]
pub struct SendReceipt(Receipt);

enum Receipt {
    Ready(Option<Result<MessageId>>),
    Channel(oneshot::Receiver<Result<MessageId>>),
    Future(BoxFuture<'static, Result<MessageId>>),
}

impl SendReceipt {
    /// A receipt for a message the broker has already accepted.
    pub fn ready(id: MessageId) -> Self {
        Self(Receipt::Ready(Some(Ok(id))))
    }

    /// A receipt for a send that already failed.
    pub fn failed(error: Error) -> Self {
        Self(Receipt::Ready(Some(Err(error))))
    }

    /// A receipt completed through a channel by the backend's writer task. If the sender is
    /// dropped unanswered, the receipt fails with [`ErrorKind::Closed`].
    pub fn from_channel(rx: oneshot::Receiver<Result<MessageId>>) -> Self {
        Self(Receipt::Channel(rx))
    }

    /// A receipt completed by any future (e.g. the client crate's own send future).
    pub fn from_future(fut: impl Future<Output = Result<MessageId>> + Send + 'static) -> Self {
        Self(Receipt::Future(Box::pin(fut)))
    }
}

impl Future for SendReceipt {
    type Output = Result<MessageId>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Receipt::Ready(r) => Poll::Ready(r.take().unwrap_or_else(|| {
                Err(Error::new(
                    ErrorKind::InvalidInput,
                    "send receipt polled after completion",
                ))
            })),
            Receipt::Channel(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Closed,
                        "the producer closed before the broker confirmed the message; \
                         it may or may not have been delivered",
                    ))
                })
            }),
            Receipt::Future(f) => f.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for SendReceipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.0 {
            Receipt::Ready(_) => "ready",
            Receipt::Channel(_) | Receipt::Future(_) => "pending",
        };
        f.debug_tuple("SendReceipt").field(&state).finish()
    }
}

/// A batch out of single receives, the way every backend without a batch request of its own
/// makes one: the first message within `timeout` (none: an empty batch), then what `receive`
/// hands out without waiting, up to `max`. An error after the first message ends the batch; what
/// was taken is handed out and the error shows at the next call.
pub(crate) async fn collect_batch<F, Fut>(
    max: usize,
    timeout: Duration,
    mut receive: F,
) -> Result<Vec<Message>>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<Message>>,
{
    let mut batch = Vec::new();
    match receive(timeout).await {
        Ok(first) => batch.push(first),
        Err(e) if e.kind() == ErrorKind::Timeout => return Ok(batch),
        Err(e) => return Err(e),
    }
    while batch.len() < max {
        match receive(Duration::ZERO).await {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    Ok(batch)
}

/// `Ok` for a batch size of at least 1; the [`ErrorKind::InvalidInput`] error otherwise.
pub fn check_batch_max(max: usize) -> Result<()> {
    if max == 0 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "a batch must allow at least one message (max 0)",
        ));
    }
    Ok(())
}

/// The [`ErrorKind::Timeout`] error `receive` returns when no message came in `timeout`.
pub fn receive_timeout(timeout: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("no message received within {timeout:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn receipts_resolve() {
        assert_eq!(
            SendReceipt::ready(MessageId::from_u64(1)).await.unwrap(),
            MessageId::from_u64(1)
        );
        let (tx, rx) = oneshot::channel();
        tx.send(Ok(MessageId::from_text("1-0"))).unwrap();
        assert_eq!(
            SendReceipt::from_channel(rx).await.unwrap().to_string(),
            "1-0"
        );
        let (tx, rx) = oneshot::channel::<Result<MessageId>>();
        drop(tx);
        assert_eq!(
            SendReceipt::from_channel(rx).await.unwrap_err().kind(),
            ErrorKind::Closed
        );
        let fut = SendReceipt::from_future(async { Err(Error::connection("gone")) });
        assert_eq!(fut.await.unwrap_err().kind(), ErrorKind::Connection);
    }
}
