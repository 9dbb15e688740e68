//! Producers: one `pulsar::Producer` per tg producer, batching by default.
//!
//! `send_batch` hands every message of the batch to the crate under one lock of the producer,
//! so they follow each other in the crate's batch (no other task's send between them) and
//! leave with it as `send` does (at `batch_size`, `batch_bytes` or `batch_delay`). Without
//! batching, one task waits for the receipts of the whole batch instead of one per message.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pulsar::producer::{Message as PulsarMessage, SendFuture};
use pulsar::{CommandSendReceipt, TokioExecutor};
use tg_backend_api::kit::RawProducer;
use tg_backend_api::{
    Error, ErrorKind, MessageId, OutboundMessage, ProducerOptions, Result, SendReceipt, Topic,
};
use tokio::sync::Notify;

use crate::core::Core;
use crate::error::{convert, kind_of};
use crate::message_id::message_id;
use crate::topic::pulsar_topic;

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

/// The Pulsar producer of one topic (as the kit sees it; applications get it as a
/// `Box<dyn Producer>`).
pub struct PulsarProducer {
    core: Arc<Core>,
    topic: Topic,
    pulsar_topic: String,
    /// The crate's producer needs `&mut`; `None` once closed.
    inner: tokio::sync::Mutex<Option<pulsar::Producer<TokioExecutor>>>,
    batching: bool,
    batch_bytes: usize,
    send_timeout: Duration,
    inflight: Arc<InFlight>,
}

impl PulsarProducer {
    pub(crate) async fn create(
        core: Arc<Core>,
        topic: Topic,
        options: &ProducerOptions,
    ) -> Result<Self> {
        let config = &core.config;
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
        let mut builder = core
            .client
            .producer()
            .with_topic(ptopic.clone())
            .with_options(pulsar_options);
        if let Some(name) = &options.name {
            builder = builder.with_name(name.clone());
        }
        let producer = core
            .bounded("cannot create a Pulsar producer", builder.build())
            .await
            .map_err(|e| e.with_context("topic", &topic))?;
        let send_timeout = options.send_timeout.unwrap_or(config.operation_timeout);
        let batch_bytes = config.batch_bytes;
        Ok(Self {
            core,
            topic,
            pulsar_topic: ptopic,
            inner: tokio::sync::Mutex::new(Some(producer)),
            batching,
            batch_bytes,
            send_timeout,
            inflight: Arc::default(),
        })
    }

    fn err(&self, e: pulsar::Error, what: &str) -> Error {
        self.core.err(e, what).with_context("topic", &self.topic)
    }

    fn closed(&self) -> Error {
        Error::closed("Pulsar producer").with_context("topic", &self.topic)
    }

    /// Writes out the current batch (batching); nothing to do without batching.
    async fn flush_batch(&self, producer: &mut pulsar::Producer<TokioExecutor>) -> Result<()> {
        if self.batching {
            self.core
                .bounded("flushing the batch", producer.send_batch())
                .await
                .map_err(|e| e.with_context("topic", &self.topic))?;
        }
        Ok(())
    }

    /// Waits until every unbatched send has its receipt.
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
}

impl fmt::Debug for PulsarProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PulsarProducer")
            .field("topic", &self.topic)
            .field("pulsar_topic", &self.pulsar_topic)
            .field("batching", &self.batching)
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

impl PulsarProducer {
    /// Hands one message to the crate (the caller holds the producer's lock).
    async fn hand_over(
        &self,
        producer: &mut pulsar::Producer<TokioExecutor>,
        message: OutboundMessage,
    ) -> Result<SendFuture> {
        let big = message.payload().len() >= self.batch_bytes;
        let (payload, properties, key) = message.into_parts();
        let msg = PulsarMessage {
            payload: Vec::from(payload),
            properties: properties.into_iter().collect::<HashMap<_, _>>(),
            partition_key: key,
            ..Default::default()
        };
        if self.batching && big {
            // send what is batched first, so that this message travels alone and the
            // batch stays under the broker's message size limit
            self.flush_batch(producer).await?;
        }
        // bounded by the crate itself: it fails a send after `operation_timeout`
        producer
            .send_non_blocking(msg)
            .await
            .map_err(|e| self.err(e, "cannot send to Pulsar"))
    }

    /// The bound of a receipt shorter than the crate's own, the server and the topic, for
    /// [`wait_receipt`].
    fn receipt_context(&self) -> (Option<Duration>, String, String) {
        let operation_timeout = self.core.config.operation_timeout;
        (
            (self.send_timeout < operation_timeout).then_some(self.send_timeout),
            self.core.server.clone(),
            self.pulsar_topic.clone(),
        )
    }
}

impl RawProducer for PulsarProducer {
    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        let fut = {
            let mut guard = self.inner.lock().await;
            let Some(producer) = guard.as_mut() else {
                return Err(self.closed());
            };
            self.hand_over(producer, message).await?
        };
        let (timeout, server, topic) = self.receipt_context();
        if self.batching {
            // the crate flushes its batch by itself, and `flush` flushes it now
            return Ok(SendReceipt::from_future(wait_receipt(
                fut, timeout, server, topic,
            )));
        }
        // not batching: a task owns the receipt so that `flush` can wait for it even if the
        // caller drops the SendReceipt
        let guard = InFlightGuard::new(&self.inflight);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let result = wait_receipt(fut, timeout, server, topic).await;
            drop(guard);
            let _ = tx.send(result);
        });
        Ok(SendReceipt::from_channel(rx))
    }

    async fn send_batch(&self, messages: Vec<OutboundMessage>) -> Result<Vec<SendReceipt>> {
        let mut futs = Vec::with_capacity(messages.len());
        {
            let mut guard = self.inner.lock().await;
            let Some(producer) = guard.as_mut() else {
                return Err(self.closed());
            };
            for message in messages {
                futs.push(self.hand_over(producer, message).await?);
            }
        }
        let (timeout, server, topic) = self.receipt_context();
        if self.batching {
            return Ok(futs
                .into_iter()
                .map(|fut| {
                    SendReceipt::from_future(wait_receipt(
                        fut,
                        timeout,
                        server.clone(),
                        topic.clone(),
                    ))
                })
                .collect());
        }
        // not batching: one task owns the receipts (for `flush`, as in `send`); the broker
        // answers them in order
        let guard = InFlightGuard::new(&self.inflight);
        let (senders, receipts): (Vec<_>, Vec<_>) = futs
            .iter()
            .map(|_| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (tx, SendReceipt::from_channel(rx))
            })
            .unzip();
        tokio::spawn(async move {
            for (fut, tx) in futs.into_iter().zip(senders) {
                let result = wait_receipt(fut, timeout, server.clone(), topic.clone()).await;
                let _ = tx.send(result);
            }
            drop(guard);
        });
        Ok(receipts)
    }

    async fn flush(&self) -> Result<()> {
        {
            let mut guard = self.inner.lock().await;
            if let Some(producer) = guard.as_mut() {
                self.flush_batch(producer).await?;
            }
        }
        self.wait_idle().await
    }

    async fn close(&self) -> Result<()> {
        let taken = self.inner.lock().await.take();
        let Some(mut producer) = taken else {
            return Ok(());
        };
        let flushed = self.flush_batch(&mut producer).await;
        let waited = self.wait_idle().await;
        let closed = match tokio::time::timeout(self.send_timeout, producer.close()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if kind_of(&e) == ErrorKind::Closed => Ok(()),
            Ok(Err(e)) => Err(self.err(e, "closing the producer")),
            Err(_) => Ok(()), // the broker is gone; nothing is left to flush
        };
        flushed.and(waited).and(closed)
    }
}
