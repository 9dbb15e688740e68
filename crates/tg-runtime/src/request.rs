//! Request/response over two topics, correlated by the `id` property.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tg_backend_api::{
    Backend, ConsumerOptions, Error, ErrorKind, Message, OutboundMessage, Properties, Result,
    Topic, TypedMessage, CORRELATION_ID_PROPERTY,
};
use tg_schema::{Codec, JsonCodec};
use tracing::Instrument;

use crate::{ProducerConfig, Recipient, RetryingProducer, Subscriber, SubscriberConfig};

/// The properties a responder puts on its reply to `request`: the request's `id` (the Python
/// framework's convention), so the requester's [`RequestResponse`] routes the reply back.
pub fn reply_properties(request: &Message) -> Properties {
    let mut p = Properties::new();
    if let Some(id) = request.property(CORRELATION_ID_PROPERTY) {
        p.insert(CORRELATION_ID_PROPERTY.to_owned(), id.to_owned());
    }
    p
}

/// Sends requests of type `Req` and awaits responses of type `Resp`.
///
/// Each request gets a property `id` = a fresh UUID (v4); responders copy it onto their responses
/// ([`reply_properties`]), which come back on the response topic. A [`Subscriber`] with its own
/// subscription (random name by default, so every requester instance sees all responses) routes
/// each response to the waiting request by that `id`. Responses to nobody (late, after a timeout)
/// are dropped and counted by the subscriber.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::{sync::Arc, time::Duration};
/// use tg_backend_api::{Backend, BackendExt, ConsumerOptions};
/// use tg_runtime::{reply_properties, RequestResponse};
///
/// let backend: Arc<dyn Backend> = Arc::new(tg_backend_memory::MemoryBackend::new());
/// let (req_t, resp_t) = (tg_topic::topic("echo-request")?, tg_topic::topic("echo-response")?);
/// // A responder.
/// let requests = backend.typed_consumer::<String>(&req_t, ConsumerOptions::new("echo")).await?;
/// let responses = backend.typed_producer::<String>(&resp_t).await?;
/// tokio::spawn(async move {
///     while let Ok(req) = requests.receive(Duration::from_secs(5)).await {
///         let reply = format!("echo: {}", req.value());
///         responses.send_with(&reply, reply_properties(req.message())).await.ok();
///         requests.acknowledge(&req).await.ok();
///     }
/// });
/// let client = RequestResponse::<String, String>::new(backend, req_t, resp_t).await?;
/// let resp = client.request(&"hi".to_owned(), Duration::from_secs(1)).await?;
/// assert_eq!(resp.value(), "echo: hi");
/// client.close().await
/// # }
/// ```
pub struct RequestResponse<Req, Resp: tg_schema::Message, C: Codec = JsonCodec> {
    producer: RetryingProducer,
    subscriber: Subscriber<Resp>,
    codec: C,
    _req: PhantomData<fn(&Req)>,
}

impl<Req, Resp> RequestResponse<Req, Resp, JsonCodec>
where
    Req: tg_schema::Message,
    Resp: tg_schema::Message + Clone,
{
    /// A client sending to `request_topic` and listening on `response_topic` with a fresh
    /// subscription `rr-<uuid>`.
    pub async fn new(
        backend: Arc<dyn Backend>,
        request_topic: Topic,
        response_topic: Topic,
    ) -> Result<Self> {
        let sub = format!("rr-{}", uuid::Uuid::new_v4().simple());
        Self::with_options(
            backend,
            request_topic,
            response_topic,
            ConsumerOptions::new(sub),
            SubscriberConfig::default(),
            ProducerConfig::default(),
            JsonCodec,
        )
        .await
    }
}

impl<Req, Resp, C> RequestResponse<Req, Resp, C>
where
    Req: tg_schema::Message,
    Resp: tg_schema::Message + Clone,
    C: Codec,
{
    /// A client with every option spelled out.
    pub async fn with_options(
        backend: Arc<dyn Backend>,
        request_topic: Topic,
        response_topic: Topic,
        response_subscription: ConsumerOptions,
        subscriber: SubscriberConfig,
        producer: ProducerConfig,
        codec: C,
    ) -> Result<Self> {
        let subscriber = Subscriber::start_with_codec(
            backend.clone(),
            response_topic,
            response_subscription,
            subscriber,
            codec.clone(),
        )
        .await?;
        Ok(Self {
            producer: RetryingProducer::new(backend, request_topic, producer),
            subscriber,
            codec,
            _req: PhantomData,
        })
    }

    async fn send(
        &self,
        request: &Req,
        properties: Properties,
    ) -> Result<(String, Recipient<Resp>)> {
        let id = uuid::Uuid::new_v4().to_string();
        // Register before sending, so a fast response cannot come before we listen.
        let recipient = self.subscriber.register(id.clone());
        let mut props = properties;
        props.insert(CORRELATION_ID_PROPERTY.to_owned(), id.clone());
        let payload = self.codec.encode(request)?;
        let span = tracing::debug_span!("tg.request", correlation_id = %id, topic = %self.producer.topic());
        self.producer
            .send(OutboundMessage::new(payload).with_properties(props))
            .instrument(span)
            .await?;
        Ok((id, recipient))
    }

    /// Sends `request` and waits at most `timeout` for its response.
    pub async fn request(&self, request: &Req, timeout: Duration) -> Result<TypedMessage<Resp>> {
        self.request_with(request, Properties::new(), timeout).await
    }

    /// Same, with extra properties on the request.
    pub async fn request_with(
        &self,
        request: &Req,
        properties: Properties,
        timeout: Duration,
    ) -> Result<TypedMessage<Resp>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (id, recipient) = self.send(request, properties).await?;
        match tokio::time::timeout_at(deadline, recipient.recv()).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Error::closed("request/response subscriber").with_context("id", id)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("no response within {timeout:?}"),
            )
            .with_context("id", id)
            .with_context("topic", self.producer.topic())),
        }
    }

    /// Sends `request` and returns the stream of its responses, which ends after the response for
    /// which `is_final` is true (e.g. `|r| r.end_of_stream`). `idle_timeout` bounds the wait for
    /// each response.
    pub async fn request_stream<F>(
        &self,
        request: &Req,
        idle_timeout: Duration,
        is_final: F,
    ) -> Result<ResponseStream<Resp, F>>
    where
        F: Fn(&Resp) -> bool,
    {
        let (id, recipient) = self.send(request, Properties::new()).await?;
        Ok(ResponseStream {
            id,
            recipient,
            idle_timeout,
            is_final,
            done: false,
        })
    }

    /// Stops listening and closes the producer.
    pub async fn close(&self) -> Result<()> {
        self.subscriber.shutdown().await?;
        self.producer.close().await
    }

    /// The subscriber (counters of unrouted and undecodable responses).
    pub fn subscriber(&self) -> &Subscriber<Resp> {
        &self.subscriber
    }
}

impl<Req, Resp: tg_schema::Message, C: Codec> fmt::Debug for RequestResponse<Req, Resp, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestResponse")
            .field("producer", &self.producer)
            .field("subscriber", &self.subscriber)
            .finish_non_exhaustive()
    }
}

/// The responses of one streaming request.
pub struct ResponseStream<Resp, F> {
    id: String,
    recipient: Recipient<Resp>,
    idle_timeout: Duration,
    is_final: F,
    done: bool,
}

impl<Resp, F: Fn(&Resp) -> bool> ResponseStream<Resp, F> {
    /// The request's `id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next response; `None` after the final one. Fails with [`ErrorKind::Timeout`] when none
    /// came within the idle timeout.
    pub async fn next(&mut self) -> Option<Result<TypedMessage<Resp>>> {
        if self.done {
            return None;
        }
        match self.recipient.recv_timeout(self.idle_timeout).await {
            Ok(m) => {
                if (self.is_final)(m.value()) {
                    self.done = true;
                }
                Some(Ok(m))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e.with_context("id", &self.id)))
            }
        }
    }

    /// Every response up to and including the final one.
    pub async fn collect(mut self) -> Result<Vec<TypedMessage<Resp>>> {
        let mut out = Vec::new();
        while let Some(r) = self.next().await {
            out.push(r?);
        }
        Ok(out)
    }
}

impl<Resp, F> fmt::Debug for ResponseStream<Resp, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseStream")
            .field("id", &self.id)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}
