//! The librdkafka producer a backend's producers share, and what happens when the broker answers
//! for a message: its receipt resolves with `partition:offset` (or the error), and the count of
//! its producer's messages in flight goes down, which is what `flush` waits for.
//!
//! librdkafka pipelines: `send` hands the message to its queue and returns; the producer's own
//! thread (`ThreadedProducer`) serves the acknowledgements and calls [`Context::delivery`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message as _;
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use tg_backend_api::{MessageId, Result};
use tokio::sync::{oneshot, Notify};

use crate::error::from_kafka;
use crate::offsets;

/// One tg producer's messages the broker has not answered for yet.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    pub(crate) fn started(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn finished(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Waits until nothing is in flight.
    pub(crate) async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// What travels with a message through librdkafka: where its answer goes.
pub(crate) struct Pending {
    pub(crate) receipt: oneshot::Sender<Result<MessageId>>,
    pub(crate) in_flight: Arc<InFlight>,
}

/// The producer's context: answers go to the pending messages' receipts.
pub(crate) struct Context;

impl ClientContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        let outcome = match result {
            Ok(m) => Ok(offsets::message_id(m.partition(), m.offset())),
            Err((e, _)) => {
                let unknown = e.rdkafka_error_code() == Some(RDKafkaErrorCode::Unknown);
                let err = from_kafka("sending to Kafka", e.clone());
                // the broker failed to handle the request without saying why (tansu does so
                // while it shuts down): sending the message again may well work
                Err(if unknown {
                    err.set_temporary(true)
                } else {
                    err
                })
            }
        };
        let _ = pending.receipt.send(outcome);
        pending.in_flight.finished();
    }
}

/// A librdkafka producer and its polling thread.
pub(crate) type Client = ThreadedProducer<Context>;

/// How a producer client acknowledges and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Kind {
    /// `acks=all` (and idempotence, when on); otherwise `acks=1`, the framework's for its
    /// non-durable classes.
    pub(crate) all_replicas: bool,
    pub(crate) idempotent: bool,
    /// `message.timeout.ms`.
    pub(crate) timeout: Duration,
    /// `linger.ms`: how long a batch waits for more messages (zero: no batching).
    pub(crate) linger: Duration,
}

/// A producer client of `kind` with the backend's common settings `base`.
pub(crate) fn client(mut base: ClientConfig, kind: Kind) -> Result<Client> {
    base.set("acks", if kind.all_replicas { "all" } else { "1" })
        .set("enable.idempotence", kind.idempotent.to_string())
        .set("linger.ms", kind.linger.as_millis().to_string())
        .set("message.timeout.ms", kind.timeout.as_millis().to_string());
    base.create_with_context(Context)
        .map_err(|e| from_kafka("creating the Kafka producer", e))
}
