//! Producers: one `pulsar::Producer` per tg producer, batching by default.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pulsar::producer::{Message as PulsarMessage, SendFuture};
use pulsar::{CommandSendReceipt, TokioExecutor};
use tg_backend_api::{
    Error, ErrorKind, MessageId, OutboundMessage, Producer, ProducerOptions, Qos, Result,
    SendReceipt, Topic,
};
use tokio::sync::Notify;

use crate::backend::Shared;
use crate::error::convert;
use crate::topic::{message_id, pulsar_topic};

/// Counts the sends of a non-batching producer whose receipt has not come yet, for `flush`.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(inflight: &Arc<InFlight>) -> Self {
        inflight.count.fetch_add(1, Ordering::AcqRel);
        Self(inflight.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The part of a producer the backend keeps to close it.
pub(crate) struct ProducerCore {
    shared: Arc<Shared>,
    topic: Topic,
    pulsar_topic: String,
    inner: tokio::sync::Mutex<Option<pulsar::Producer<TokioExecutor>>>,
    closed: AtomicBool,
    batching: bool,
    batch_bytes: usize,
    send_timeout: Duration,
    inflight: Arc<InFlight>,
}

impl ProducerCore {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) || self.shared.is_closed() {
            Err(Error::closed("pulsar producer").with_context("topic", &self.topic))
        } else {
            Ok(())
        }
    }

    fn err(&self, e: pulsar::Error, what: &str) -> Error {
        convert(e, what, &self.shared.server).with_context("topic", &self.topic)
    }

    /// Writes out the current batch (batching) or waits for every receipt (not batching).
    async fn flush_inner(&self, producer: &mut pulsar::Producer<TokioExecutor>) -> Result<()> {
        if self.batching {
            self.shared
                .bounded("flushing the batch", producer.send_batch())
                .await
                .map_err(|e| e.with_context("topic", &self.topic))?;
        }
        Ok(())
    }

    async fn wait_idle(&self) -> Result<()> {
        let wait = async {
            loop {
                let idle = self.inflight.idle.notified();
                if self.inflight.count.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(self.send_timeout, wait)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "flush: messages still unconfirmed after {:?}",
                        self.send_timeout
                    ),
                )
                .with_context("topic", &self.topic)
            })
    }

    /// Flushes and closes (idempotent).
    pub(crate) async fn shutdown(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let taken = self.inner.lock().await.take();
        let Some(mut producer) = taken else {
            return Ok(());
        };
        let flushed = self.flush_inner(&mut producer).await;
        let waited = self.wait_idle().await;
        let closed = match tokio::time::timeout(self.send_timeout, producer.close()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if crate::error::kind_of(&e) == ErrorKind::Closed => Ok(()),
            Ok(Err(e)) => Err(self.err(e, "closing the producer")),
            Err(_) => Ok(()), // the broker is gone; nothing is left to flush
        };
        flushed.and(waited).and(closed)
    }
}

/// A producer of one topic.
pub(crate) struct PulsarProducer {
    core: Arc<ProducerCore>,
}

impl PulsarProducer {
    pub(crate) async fn create(
        shared: Arc<Shared>,
        topic: Topic,
        options: ProducerOptions,
    ) -> Result<Self> {
        let config = &shared.config;
        let batching = options.batching.unwrap_or(config.batching) && config.batch_size > 1;
        let pulsar_options = pulsar::ProducerOptions {
            batch_size: batching.then_some(config.batch_size),
            batch_byte_size: batching.then_some(config.batch_bytes),
            batch_timeout: batching.then_some(config.batch_delay),
            // wait (instead of failing with SlowDown) while the connection's queue is full
            block_queue_if_full: true,
            ..Default::default()
        };
        let ptopic = pulsar_topic(&topic);
        let mut builder = shared
            .client
            .producer()
            .with_topic(ptopic.clone())
            .with_options(pulsar_options);
        if let Some(name) = &options.name {
            builder = builder.with_name(name.clone());
        }
        let producer = shared
            .bounded("cannot create a Pulsar producer", builder.build())
            .await
            .map_err(|e| e.with_context("topic", &topic))?;
        let send_timeout = options.send_timeout.unwrap_or(config.operation_timeout);
        let batch_bytes = config.batch_bytes;
        Ok(Self {
            core: Arc::new(ProducerCore {
                shared,
                topic,
                pulsar_topic: ptopic,
                inner: tokio::sync::Mutex::new(Some(producer)),
                closed: AtomicBool::new(false),
                batching,
                batch_bytes,
                send_timeout,
                inflight: Arc::default(),
            }),
        })
    }

    pub(crate) fn core(&self) -> &Arc<ProducerCore> {
        &self.core
    }
}

impl fmt::Debug for PulsarProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PulsarProducer")
            .field("topic", &self.core.topic)
            .field("pulsar_topic", &self.core.pulsar_topic)
            .field("batching", &self.core.batching)
            .finish_non_exhaustive()
    }
}

fn receipt_id(receipt: CommandSendReceipt) -> MessageId {
    match receipt.message_id {
        Some(id) => message_id(&id),
        None => MessageId::from_u64(receipt.sequence_id),
    }
}

/// Waits for the broker's receipt of one message.
///
/// The crate fails a receipt itself once `operation_timeout` passed since the first send; a
/// shorter `send_timeout` of the producer is enforced here.
async fn wait_receipt(
    fut: SendFuture,
    timeout: Option<Duration>,
    server: String,
    topic: String,
) -> Result<MessageId> {
    let outcome = match timeout {
        None => Ok(fut.await),
        Some(t) => tokio::time::timeout(t, fut).await,
    };
    let timeout = timeout.unwrap_or_default();
    match outcome {
        Ok(Ok(receipt)) => Ok(receipt_id(receipt)),
        Ok(Err(e)) => Err(convert(e, "the broker did not accept the message", &server)
            .with_context("topic", topic)),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!("no receipt from the broker within {timeout:?}"),
        )
        .with_context("server", server)
        .with_context("topic", topic)),
    }
}

#[async_trait]
impl Producer for PulsarProducer {
    fn topic(&self) -> &Topic {
        &self.core.topic
    }

    async fn send(&self, mut message: OutboundMessage) -> Result<SendReceipt> {
        let core = &self.core;
        core.check_open()?;
        if message.is_retained() {
            return Err(Error::unsupported(
                "Pulsar has no retained messages; a consumer that needs the last value can \
                 subscribe with InitialPosition::Earliest on a q1 topic",
            )
            .with_context("topic", &core.topic));
        }
        let max = core.shared.config.max_payload;
        if message.payload().len() > max {
            return Err(Error::payload_too_large(message.payload().len(), max)
                .with_context("topic", &core.topic));
        }
        if core.topic.qos() == Qos::Q2 {
            message.ensure_dedup_id();
        }
        let big = message.payload().len() >= core.batch_bytes;
        let (payload, properties, key) = message.into_parts();
        let msg = PulsarMessage {
            payload: Vec::from(payload),
            properties: properties.into_iter().collect::<HashMap<_, _>>(),
            partition_key: key,
            ..Default::default()
        };
        let fut = {
            let mut guard = core.inner.lock().await;
            let Some(producer) = guard.as_mut() else {
                return Err(Error::closed("pulsar producer").with_context("topic", &core.topic));
            };
            if core.batching && big {
                // send what is batched first, so that this message travels alone and the
                // batch stays under the broker's message size limit
                core.flush_inner(producer).await?;
            }
            // bounded by the crate itself: it fails a send after `operation_timeout`
            producer
                .send_non_blocking(msg)
                .await
                .map_err(|e| core.err(e, "cannot send to Pulsar"))?
        };
        let (timeout, server, topic) = (
            (core.send_timeout < core.shared.config.operation_timeout).then_some(core.send_timeout),
            core.shared.server.clone(),
            core.pulsar_topic.clone(),
        );
        if core.batching {
            // the batch's own flush and `send_batch` cover `flush`
            return Ok(SendReceipt::from_future(wait_receipt(
                fut, timeout, server, topic,
            )));
        }
        // not batching: a task owns the receipt so that `flush` can wait for it even if the
        // caller drops the SendReceipt
        let guard = InFlightGuard::new(&core.inflight);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let result = wait_receipt(fut, timeout, server, topic).await;
            drop(guard);
            let _ = tx.send(result);
        });
        Ok(SendReceipt::from_channel(rx))
    }

    async fn flush(&self) -> Result<()> {
        let core = &self.core;
        core.check_open()?;
        {
            let mut guard = core.inner.lock().await;
            if let Some(producer) = guard.as_mut() {
                core.flush_inner(producer).await?;
            }
        }
        core.wait_idle().await
    }

    async fn close(&self) -> Result<()> {
        self.core.shutdown().await
    }
}

impl Drop for PulsarProducer {
    fn drop(&mut self) {
        // a producer dropped without close: flush and close it in the background, like the
        // pulsar crate's own drop does
        if !self.core.closed.load(Ordering::Acquire) {
            let core = self.core.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = core.shutdown().await;
                });
            }
        }
    }
}
