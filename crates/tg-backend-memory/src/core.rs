//! The state every clone of a memory backend shares: its configuration, lifecycle and topics.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tg_backend_api::kit::Lifecycle;
use tg_backend_api::Topic;

use crate::broker::{PublishLimits, TopicState};
use crate::config::MemoryConfig;

/// One in-process broker.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) config: MemoryConfig,
    pub(crate) limits: PublishLimits,
    pub(crate) life: Lifecycle,
    topics: Mutex<HashMap<Topic, Arc<TopicState>>>,
}

impl Core {
    pub(crate) fn new(config: MemoryConfig) -> Self {
        Self {
            limits: PublishLimits::new(&config),
            config,
            life: Lifecycle::new("memory backend"),
            topics: Mutex::default(),
        }
    }

    /// The topic's state, created on first use.
    pub(crate) fn topic(&self, topic: &Topic) -> Arc<TopicState> {
        self.topics
            .lock()
            .entry(topic.clone())
            .or_insert_with(|| Arc::new(TopicState::new(topic.clone())))
            .clone()
    }

    /// Forgets the topic's state: its messages and subscriptions. Producers and consumers still
    /// holding it keep what they hold; new ones start from an empty topic.
    pub(crate) fn remove_topic(&self, topic: &Topic) {
        if let Some(state) = self.topics.lock().remove(topic) {
            // producers waiting for room on the forgotten state must not wait forever
            state.wake_all();
        }
    }

    /// Wakes producers waiting for room, so they see the backend closed.
    pub(crate) fn wake_all(&self) {
        let topics: Vec<_> = self.topics.lock().values().cloned().collect();
        for topic in topics {
            topic.wake_all();
        }
    }
}
