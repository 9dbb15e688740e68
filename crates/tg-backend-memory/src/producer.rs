//! The in-memory producer.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tg_backend_api::{
    Error, ErrorKind, OutboundMessage, Producer, Qos, Result, SendReceipt, Topic, DEDUP_ID_PROPERTY,
};

use crate::topic::{Broker, PublishLimits, TopicState, Unpublished};

pub(crate) struct MemoryProducer {
    broker: Arc<Broker>,
    topic: Arc<TopicState>,
    limits: PublishLimits,
    closed: AtomicBool,
}

impl MemoryProducer {
    pub(crate) fn new(broker: Arc<Broker>, topic: Arc<TopicState>) -> Self {
        let limits = PublishLimits {
            capacity: broker.config.subscription_capacity,
            retention: broker.config.retention,
            dedup_window: broker.config.dedup_window,
        };
        Self {
            broker,
            topic,
            limits,
            closed: AtomicBool::new(false),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("producer").with_context("topic", self.topic.topic()));
        }
        self.broker.check_open()
    }
}

#[async_trait]
impl Producer for MemoryProducer {
    fn topic(&self) -> &Topic {
        self.topic.topic()
    }

    async fn send(&self, mut message: OutboundMessage) -> Result<SendReceipt> {
        self.check_open()?;
        let max = self.broker.config.max_payload;
        if message.payload().len() > max {
            return Err(Error::payload_too_large(message.payload().len(), max)
                .with_context("topic", self.topic.topic()));
        }
        if message.is_retained() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the memory backend keeps no retained messages; use a q1 topic and Earliest",
            ));
        }
        let dedup_id = if self.topic.topic().qos() == Qos::Q2 {
            Some(message.ensure_dedup_id().to_owned())
        } else {
            None
        };
        let (payload, properties, key) = message.into_parts();
        debug_assert!(dedup_id.is_none() || properties.contains_key(DEDUP_ID_PROPERTY));
        let mut unpublished = Unpublished {
            payload,
            properties,
            key,
            dedup_id,
        };
        loop {
            match self.topic.try_publish(unpublished, &self.limits) {
                Ok(id) => return Ok(SendReceipt::ready(id)),
                Err((back, full)) => {
                    full.wait_for_room(&self.broker).await?;
                    unpublished = back;
                }
            }
        }
    }

    async fn flush(&self) -> Result<()> {
        self.check_open()
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

impl fmt::Debug for MemoryProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryProducer")
            .field("topic", self.topic.topic())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}
