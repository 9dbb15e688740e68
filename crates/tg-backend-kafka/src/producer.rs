//! The Kafka producer: a topic on one of the backend's shared librdkafka producer clients.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use tg_backend_api::kit::RawProducer;
use tg_backend_api::{Error, ErrorKind, OutboundMessage, Result, SendReceipt, Topic};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::delivery::{Client, InFlight, Pending};
use crate::error::from_kafka;

/// How long a send waits before it looks again when librdkafka's queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(1);

/// The Kafka producer (as the kit sees it; applications get it as a `Box<dyn Producer>`).
pub struct KafkaProducer {
    client: Arc<Client>,
    topic: Topic,
    kafka_topic: String,
    in_flight: Arc<InFlight>,
    /// How long a send may wait for room in librdkafka's queue.
    send_timeout: Duration,
}

impl KafkaProducer {
    pub(crate) fn new(
        client: Arc<Client>,
        topic: Topic,
        kafka_topic: String,
        send_timeout: Duration,
    ) -> Self {
        Self {
            client,
            topic,
            kafka_topic,
            in_flight: Arc::default(),
            send_timeout,
        }
    }
}

impl RawProducer for KafkaProducer {
    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        let (payload, properties, key) = message.into_parts();
        let (tx, rx) = oneshot::channel();
        self.in_flight.started();
        let pending = Box::new(Pending {
            receipt: tx,
            in_flight: self.in_flight.clone(),
        });
        let mut record: BaseRecord<'_, [u8], [u8], Box<Pending>> =
            BaseRecord::with_opaque_to(&self.kafka_topic, pending).payload(payload.as_ref());
        if !properties.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(properties.len());
            for (k, v) in &properties {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_str()),
                });
            }
            record = record.headers(headers);
        }
        if let Some(key) = &key {
            record = record.key(key.as_bytes());
        }
        let deadline = Instant::now() + self.send_timeout;
        loop {
            match self.client.send(record) {
                Ok(()) => return Ok(SendReceipt::from_channel(rx)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    // the broker is slower than the application: wait for room, as long as a
                    // send may take
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((e, _)) => {
                    self.in_flight.finished();
                    let err = match e {
                        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => Error::new(
                            ErrorKind::QueueFull,
                            format!(
                                "librdkafka's send queue stayed full for {:?} (send_timeout)",
                                self.send_timeout
                            ),
                        ),
                        e => from_kafka("sending to Kafka", e),
                    };
                    return Err(err.with_context("topic", &self.topic));
                }
            }
        }
    }

    async fn flush(&self) -> Result<()> {
        self.in_flight.idle().await;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.in_flight.idle().await;
        Ok(())
    }

    fn close_sync(&self) -> bool {
        // the shared client delivers what is in flight; nothing is this producer's to release
        true
    }
}

impl fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("topic", &self.topic)
            .field("kafka_topic", &self.kafka_topic)
            .finish_non_exhaustive()
    }
}
