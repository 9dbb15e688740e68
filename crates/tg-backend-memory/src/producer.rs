//! The in-memory producer.

use std::fmt;
use std::sync::Arc;

use tg_backend_api::kit::RawProducer;
use tg_backend_api::{OutboundMessage, Qos, Result, SendReceipt, DEDUP_ID_PROPERTY};

use crate::broker::{TopicState, Unpublished};
use crate::core::Core;

/// The in-memory producer (as the kit sees it; applications get it as a `Box<dyn Producer>`).
pub struct MemoryProducer {
    core: Arc<Core>,
    topic: Arc<TopicState>,
}

impl MemoryProducer {
    pub(crate) fn new(core: Arc<Core>, topic: Arc<TopicState>) -> Self {
        Self { core, topic }
    }
}

impl RawProducer for MemoryProducer {
    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        let (payload, properties, key) = message.into_parts();
        // q2 messages carry their id: the kit set it before the producer sees them
        let dedup_id = if self.topic.topic().qos() == Qos::Q2 {
            properties.get(DEDUP_ID_PROPERTY).cloned()
        } else {
            None
        };
        let mut unpublished = Unpublished {
            payload,
            properties,
            key,
            dedup_id,
        };
        let limits = &self.core.limits;
        loop {
            match self.topic.try_publish(unpublished, limits) {
                Ok(id) => return Ok(SendReceipt::ready(id)),
                Err((back, full)) => {
                    full.wait_for_room(limits, &self.core.life).await?;
                    unpublished = back;
                }
            }
        }
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    fn close_sync(&self) -> bool {
        true
    }
}

impl fmt::Debug for MemoryProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryProducer")
            .field("topic", self.topic.topic())
            .finish()
    }
}
