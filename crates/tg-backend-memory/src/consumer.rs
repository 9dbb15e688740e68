//! The in-memory consumer.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tg_backend_api::kit::RawConsumer;
use tg_backend_api::{receive_timeout, ErrorKind, Message, Result};
use tokio::time::Instant;

use crate::broker::{Subscription, Take, TopicState};

/// Times `receive` yields to the scheduler and looks again before it parks.
const SPIN_YIELDS: usize = 4;

/// The in-memory consumer (as the kit sees it; applications get it as a `Box<dyn Consumer>`).
pub struct MemoryConsumer {
    id: u64,
    topic: Arc<TopicState>,
    sub: Arc<Subscription>,
    /// Whether this consumer left its subscription (what it held went back). Subscription state,
    /// not the consumer's lifecycle, which the kit keeps.
    detached: AtomicBool,
}

impl MemoryConsumer {
    pub(crate) fn new(id: u64, topic: Arc<TopicState>, sub: Arc<Subscription>) -> Self {
        Self {
            id,
            topic,
            sub,
            detached: AtomicBool::new(false),
        }
    }

    fn try_take(&self) -> Result<Option<Message>> {
        Ok(match self.sub.try_take(self.id)? {
            Take::Message(m) => Some(m),
            Take::Empty => None,
        })
    }

    /// Leaves the subscription once: what this consumer held goes back, and a non-durable
    /// subscription without consumers goes away.
    fn detach(&self) {
        if !self.detached.swap(true, Ordering::AcqRel) && self.sub.detach(self.id) {
            self.topic.remove_subscription(&self.sub);
        }
    }
}

impl RawConsumer for MemoryConsumer {
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

    async fn receive_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        let first = match self.receive(timeout).await {
            Ok(first) => first,
            Err(e) if e.kind() == ErrorKind::Timeout => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut batch = Vec::with_capacity(max.min(1024));
        batch.push(first);
        self.sub.try_take_many(self.id, max - 1, &mut batch)?;
        Ok(batch)
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        self.sub.ack(message.ack_handle().seq());
        Ok(())
    }

    async fn acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        self.sub
            .ack_many(messages.iter().map(|m| m.ack_handle().seq()));
        Ok(())
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        self.sub.nack(message.ack_handle().seq());
        Ok(())
    }

    async fn unsubscribe(&self) -> Result<()> {
        self.topic.remove_subscription(&self.sub);
        self.detach();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.detach();
        Ok(())
    }

    fn close_sync(&self) -> bool {
        self.detach();
        true
    }
}

impl fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("id", &self.id)
            .field("topic", self.topic.topic())
            .field("subscription", &self.sub.name())
            .finish()
    }
}
