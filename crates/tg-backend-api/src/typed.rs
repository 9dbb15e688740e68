//! Typed producers and consumers: application code sends and receives its own structs.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use async_trait::async_trait;
use tg_schema::{Codec, JsonCodec};
use tg_topic::Topic;

use crate::{
    Backend, Consumer, ConsumerOptions, Message, MessageId, OutboundMessage, Producer,
    ProducerOptions, Properties, Result, SendReceipt,
};

/// Sends values of type `T`, encoded with codec `C` (JSON by default).
pub struct TypedProducer<T, C = JsonCodec> {
    inner: Box<dyn Producer>,
    codec: C,
    _marker: PhantomData<fn(&T)>,
}

impl<T: tg_schema::Message, C: Codec + Default> TypedProducer<T, C> {
    /// Wraps a producer with the default codec.
    pub fn new(inner: Box<dyn Producer>) -> Self {
        Self::with_codec(inner, C::default())
    }
}

impl<T: tg_schema::Message, C: Codec> TypedProducer<T, C> {
    /// Wraps a producer with this codec.
    pub fn with_codec(inner: Box<dyn Producer>, codec: C) -> Self {
        Self {
            inner,
            codec,
            _marker: PhantomData,
        }
    }

    /// Encodes `value` into an outgoing message (fails with [`ErrorKind::Encode`](crate::ErrorKind)).
    pub fn encode(&self, value: &T) -> Result<OutboundMessage> {
        Ok(OutboundMessage::new(self.codec.encode(value)?))
    }

    /// Sends `value` and waits for the broker to accept it.
    pub async fn send(&self, value: &T) -> Result<MessageId> {
        self.inner.send(self.encode(value)?).await?.await
    }

    /// Sends `value` with properties and waits for the broker to accept it.
    pub async fn send_with(&self, value: &T, properties: Properties) -> Result<MessageId> {
        self.inner
            .send(self.encode(value)?.with_properties(properties))
            .await?
            .await
    }

    /// Sends every value in one call (see [`Producer::send_batch`]) and waits until the broker
    /// accepted them all; nothing is sent if one does not encode or is too large.
    pub async fn send_batch(&self, values: &[T]) -> Result<Vec<MessageId>> {
        let messages = values
            .iter()
            .map(|v| self.encode(v))
            .collect::<Result<Vec<_>>>()?;
        let mut ids = Vec::with_capacity(messages.len());
        for receipt in self.inner.send_batch(messages).await? {
            ids.push(receipt.await?);
        }
        Ok(ids)
    }

    /// Sends `value` with properties; the receipt resolves when the broker accepted it.
    pub async fn send_nowait(&self, value: &T, properties: Properties) -> Result<SendReceipt> {
        self.inner
            .send(self.encode(value)?.with_properties(properties))
            .await
    }

    /// Waits until everything sent was accepted.
    pub async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    /// Flushes and closes.
    pub async fn close(&self) -> Result<()> {
        self.inner.close().await
    }

    /// The topic.
    pub fn topic(&self) -> &Topic {
        self.inner.topic()
    }

    /// The untyped producer.
    pub fn inner(&self) -> &dyn Producer {
        &*self.inner
    }
}

impl<T, C: fmt::Debug> fmt::Debug for TypedProducer<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedProducer")
            .field("type", &std::any::type_name::<T>())
            .field("inner", &self.inner)
            .field("codec", &self.codec)
            .finish()
    }
}

/// A received, decoded message: the value and the raw message it came from.
#[derive(Clone)]
pub struct TypedMessage<T> {
    value: T,
    raw: Message,
}

impl<T> TypedMessage<T> {
    /// The decoded value.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// Takes the decoded value.
    pub fn into_value(self) -> T {
        self.value
    }

    /// The raw message (payload, properties, id, redelivery count).
    pub fn message(&self) -> &Message {
        &self.raw
    }

    /// One property of the message.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.raw.property(key)
    }

    /// Splits into value and raw message.
    pub fn into_parts(self) -> (T, Message) {
        (self.value, self.raw)
    }
}

impl<T> AsRef<Message> for TypedMessage<T> {
    fn as_ref(&self) -> &Message {
        &self.raw
    }
}

impl<T: fmt::Debug> fmt::Debug for TypedMessage<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedMessage")
            .field("value", &self.value)
            .field("raw", &self.raw)
            .finish()
    }
}

/// Receives values of type `T`, decoded with codec `C` (JSON by default).
///
/// A payload that does not decode gives an [`ErrorKind::Decode`](crate::ErrorKind) error that
/// names the type and field and carries the raw message
/// ([`Error::take_raw_message`](crate::Error::take_raw_message)) so the caller can acknowledge it
/// or send it to a dead-letter topic; the next `receive` goes on with the next message.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::time::Duration;
/// use tg_backend_api::{BackendExt, ConsumerOptions};
/// use tg_schema::trustgraph::Term;
///
/// let backend = tg_backend_memory::MemoryBackend::new();
/// let topic = tg_topic::topic("values")?;
/// let consumer = backend.typed_consumer::<Term>(&topic, ConsumerOptions::new("v")).await?;
/// let producer = backend.typed_producer::<Term>(&topic).await?;
/// producer.send(&Term { r#type: "i".into(), iri: "http://x".into(), ..Default::default() }).await?;
/// let msg = consumer.receive(Duration::from_secs(1)).await?;
/// assert_eq!(msg.value().iri, "http://x");
/// consumer.acknowledge(&msg).await
/// # }
/// ```
pub struct TypedConsumer<T, C = JsonCodec> {
    inner: Box<dyn Consumer>,
    codec: C,
    _marker: PhantomData<fn() -> T>,
}

impl<T: tg_schema::Message, C: Codec + Default> TypedConsumer<T, C> {
    /// Wraps a consumer with the default codec.
    pub fn new(inner: Box<dyn Consumer>) -> Self {
        Self::with_codec(inner, C::default())
    }
}

impl<T: tg_schema::Message, C: Codec> TypedConsumer<T, C> {
    /// Wraps a consumer with this codec.
    pub fn with_codec(inner: Box<dyn Consumer>, codec: C) -> Self {
        Self {
            inner,
            codec,
            _marker: PhantomData,
        }
    }

    /// Decodes a raw message.
    pub fn decode(&self, raw: Message) -> Result<TypedMessage<T>> {
        match self.codec.decode::<T>(raw.payload()) {
            Ok(value) => Ok(TypedMessage { value, raw }),
            Err(e) => Err(crate::Error::from(e)
                .with_context("message_id", raw.id())
                .with_raw_message(raw)),
        }
    }

    /// The next decoded message, waiting at most `timeout`.
    pub async fn receive(&self, timeout: Duration) -> Result<TypedMessage<T>> {
        self.decode(self.inner.receive(timeout).await?)
    }

    /// Up to `max` messages (see [`Consumer::receive_batch`]), each decoded on its own: one that
    /// does not decode is an `Err` in its place (carrying the raw message, as
    /// [`receive`](Self::receive) gives it), and the others are unaffected.
    pub async fn receive_batch(
        &self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Result<TypedMessage<T>>>> {
        Ok(self
            .inner
            .receive_batch(max, timeout)
            .await?
            .into_iter()
            .map(|raw| self.decode(raw))
            .collect())
    }

    /// The decoded messages as a stream (see [`ConsumerStreams::messages`](crate::ConsumerStreams)):
    /// a message that does not decode is an `Err` item carrying the raw message.
    pub fn messages(&self) -> futures::stream::BoxStream<'_, Result<TypedMessage<T>>>
    where
        C: Sync,
    {
        use futures::StreamExt;
        crate::ConsumerStreams::messages(&*self.inner)
            .map(move |raw| raw.and_then(|raw| self.decode(raw)))
            .boxed()
    }

    /// Acknowledges several messages (typed or raw) in one call.
    pub async fn acknowledge_batch<M: AsRef<Message> + Sync>(&self, messages: &[M]) -> Result<()> {
        let raw: Vec<Message> = messages.iter().map(|m| m.as_ref().clone()).collect();
        self.inner.acknowledge_batch(&raw).await
    }

    /// Negatively acknowledges several messages (typed or raw) in one call.
    pub async fn negative_acknowledge_batch<M: AsRef<Message> + Sync>(
        &self,
        messages: &[M],
    ) -> Result<()> {
        let raw: Vec<Message> = messages.iter().map(|m| m.as_ref().clone()).collect();
        self.inner.negative_acknowledge_batch(&raw).await
    }

    /// Acknowledges a message (typed or raw).
    pub async fn acknowledge(&self, message: &(impl AsRef<Message> + Sync)) -> Result<()> {
        self.inner.acknowledge(message.as_ref()).await
    }

    /// Negatively acknowledges a message (typed or raw).
    pub async fn negative_acknowledge(&self, message: &(impl AsRef<Message> + Sync)) -> Result<()> {
        self.inner.negative_acknowledge(message.as_ref()).await
    }

    /// Deletes the subscription and closes.
    pub async fn unsubscribe(&self) -> Result<()> {
        self.inner.unsubscribe().await
    }

    /// Closes.
    pub async fn close(&self) -> Result<()> {
        self.inner.close().await
    }

    /// The untyped consumer.
    pub fn inner(&self) -> &dyn Consumer {
        &*self.inner
    }
}

impl<T, C: fmt::Debug> fmt::Debug for TypedConsumer<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedConsumer")
            .field("type", &std::any::type_name::<T>())
            .field("inner", &self.inner)
            .field("codec", &self.codec)
            .finish()
    }
}

/// Typed producer and consumer constructors for any backend (JSON codec).
#[async_trait]
pub trait BackendExt {
    /// A producer of `T` values on `topic`, with default options.
    async fn typed_producer<T: tg_schema::Message>(
        &self,
        topic: &Topic,
    ) -> Result<TypedProducer<T>>;

    /// A producer of `T` values on `topic`.
    async fn typed_producer_with<T: tg_schema::Message>(
        &self,
        topic: &Topic,
        options: ProducerOptions,
    ) -> Result<TypedProducer<T>>;

    /// A consumer of `T` values on `topic`.
    async fn typed_consumer<T: tg_schema::Message>(
        &self,
        topic: &Topic,
        options: ConsumerOptions,
    ) -> Result<TypedConsumer<T>>;
}

#[async_trait]
impl<B: Backend + ?Sized> BackendExt for B {
    async fn typed_producer<T: tg_schema::Message>(
        &self,
        topic: &Topic,
    ) -> Result<TypedProducer<T>> {
        self.typed_producer_with(topic, ProducerOptions::default())
            .await
    }

    async fn typed_producer_with<T: tg_schema::Message>(
        &self,
        topic: &Topic,
        options: ProducerOptions,
    ) -> Result<TypedProducer<T>> {
        Ok(TypedProducer::new(
            self.create_producer(topic, options).await?,
        ))
    }

    async fn typed_consumer<T: tg_schema::Message>(
        &self,
        topic: &Topic,
        options: ConsumerOptions,
    ) -> Result<TypedConsumer<T>> {
        Ok(TypedConsumer::new(
            self.create_consumer(topic, options).await?,
        ))
    }
}
