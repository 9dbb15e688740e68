//! The in-memory consumer.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tg_backend_api::{receive_timeout, Consumer, Error, ErrorKind, Message, Result, Topic};
use tokio::time::Instant;

use crate::topic::{Broker, Subscription, Take, TopicState};

/// Times `receive` yields to the scheduler and looks again before it parks.
const SPIN_YIELDS: usize = 4;

pub(crate) struct MemoryConsumer {
    id: u64,
    broker: Arc<Broker>,
    topic: Arc<TopicState>,
    sub: Arc<Subscription>,
    closed: AtomicBool,
}

impl MemoryConsumer {
    pub(crate) fn new(
        id: u64,
        broker: Arc<Broker>,
        topic: Arc<TopicState>,
        sub: Arc<Subscription>,
    ) -> Self {
        Self {
            id,
            broker,
            topic,
            sub,
            closed: AtomicBool::new(false),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("consumer")
                .with_context("topic", self.topic.topic())
                .with_context("subscription", self.sub.name()));
        }
        self.broker.check_open()
    }

    fn try_take(&self) -> Result<Option<Message>> {
        self.check_open()?;
        Ok(match self.sub.try_take(self.id)? {
            Take::Message(m) => Some(m),
            Take::Empty => None,
        })
    }

    fn own_seq(&self, message: &Message) -> Result<u64> {
        let handle = message.ack_handle();
        if handle.consumer() != self.id {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the message was received by another consumer; acknowledge it there",
            )
            .with_context("message_id", message.id()));
        }
        Ok(handle.seq())
    }

    /// Detaches from the subscription once; later calls do nothing.
    fn detach(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) && self.sub.detach(self.id) {
            self.topic.remove_subscription(&self.sub);
        }
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    fn topic(&self) -> &Topic {
        self.topic.topic()
    }

    fn subscription(&self) -> &str {
        self.sub.name()
    }

    async fn receive(&self, timeout: Duration) -> Result<Message> {
        if let Some(m) = self.try_take()? {
            return Ok(m);
        }
        // A producer on another thread is often about to push: look again a few times before
        // parking, which saves a sleep and a wake-up per message when both run neck and neck.
        if !timeout.is_zero() {
            for _ in 0..SPIN_YIELDS {
                tokio::task::yield_now().await;
                if let Some(m) = self.try_take()? {
                    return Ok(m);
                }
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.sub.readable().notified();
            tokio::pin!(notified);
            let _guard = self.sub.reader_guard();
            notified.as_mut().enable();
            if let Some(m) = self.try_take()? {
                return Ok(m);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return match self.try_take()? {
                    Some(m) => Ok(m),
                    None => Err(receive_timeout(timeout)),
                };
            }
        }
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        let seq = self.own_seq(message)?;
        self.check_open()?;
        self.sub.ack(seq);
        Ok(())
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        let seq = self.own_seq(message)?;
        self.check_open()?;
        self.sub.nack(seq);
        Ok(())
    }

    async fn unsubscribe(&self) -> Result<()> {
        self.check_open()?;
        self.topic.remove_subscription(&self.sub);
        self.detach();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.detach();
        Ok(())
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        self.detach();
    }
}

impl fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("id", &self.id)
            .field("topic", self.topic.topic())
            .field("subscription", &self.sub.name())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}
