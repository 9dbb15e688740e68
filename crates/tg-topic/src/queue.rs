//! The Python framework's queue ids, `class:topicspace:topic`, and their generic topics.
//!
//! A framework service names its queues `flow:tg:text-completion-request`,
//! `request:tg:config`, `notify:tg:config`: a class, the topicspace (deployment prefix) and the
//! topic, which may itself contain colons. Each class has fixed semantics, which the generic
//! topic carries:
//!
//! | class | persistence | consumers | generic topic |
//! |---|---|---|---|
//! | `flow` | persistent | compete on one subscription | `q1/{topicspace}/flow/{topic}` |
//! | `request` | not persistent | compete on one subscription | `q0/{topicspace}/request/{topic}` |
//! | `response` | not persistent | each consumer its own subscription | `q0/{topicspace}/response/{topic}` |
//! | `notify` | not persistent | each consumer its own subscription | `q0/{topicspace}/notify/{topic}` |
//!
//! Every backend maps such a topic to the native names the framework's own backend uses for the
//! queue id, so a Rust service and a Python one meet on the same broker objects.
//!
//! ```
//! use tg_topic::{QueueClass, QueueId};
//!
//! let id: QueueId = "flow:tg:text-completion-request".parse()?;
//! assert_eq!(id.class(), QueueClass::Flow);
//! assert_eq!(id.to_topic().to_string(), "q1/tg/flow/text-completion-request");
//!
//! let back = QueueId::from_topic(&tg_topic::Topic::parse("q0/tg/request/config")?)?;
//! assert_eq!(back.to_string(), "request:tg:config");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

use crate::{Qos, Topic, TopicError};

/// The class of a framework queue: what its messages and consumers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueClass {
    /// A persistent work queue: consumers of one subscription compete.
    Flow,
    /// A non-persistent request queue: consumers of one subscription compete.
    Request,
    /// A non-persistent response queue: every consumer gets its own copy.
    Response,
    /// A non-persistent broadcast: every consumer gets its own copy.
    Notify,
}

impl QueueClass {
    /// Every class, in the order the framework documents them.
    pub const ALL: [QueueClass; 4] = [Self::Flow, Self::Request, Self::Response, Self::Notify];

    /// The class as queue ids spell it (`flow`, `request`, `response`, `notify`); also the
    /// namespace of its generic topics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Flow => "flow",
            Self::Request => "request",
            Self::Response => "response",
            Self::Notify => "notify",
        }
    }

    /// The quality of service of the class's generic topics: `q1` for `flow`, `q0` otherwise.
    pub const fn qos(self) -> Qos {
        match self {
            Self::Flow => Qos::Q1,
            _ => Qos::Q0,
        }
    }

    /// Whether the broker keeps the class's messages when no consumer is connected.
    pub const fn is_persistent(self) -> bool {
        matches!(self, Self::Flow)
    }

    /// Whether the consumers of one subscription compete for messages (`flow`, `request`), rather
    /// than each consumer getting its own copy (`response`, `notify`).
    pub const fn is_competing(self) -> bool {
        matches!(self, Self::Flow | Self::Request)
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for QueueClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A framework queue id `class:topicspace:topic` (see the [module docs](self)).
///
/// The topicspace follows the rules of a topic's tenant and the topic those of its queue (so it
/// may contain colons); both are checked when the id is made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueId {
    class: QueueClass,
    topic: Topic,
}

impl QueueId {
    /// The id `class:topicspace:topic`.
    ///
    /// # Errors
    ///
    /// A [`QueueIdError`] naming the topicspace or topic that is not valid.
    pub fn new(class: QueueClass, topicspace: &str, topic: &str) -> Result<Self, QueueIdError> {
        let topic = Topic::new(class.qos(), topicspace, class.as_str(), topic)
            .map_err(|e| QueueIdError::Invalid(e.to_string()))?;
        Ok(Self { class, topic })
    }

    /// The id of `topic` in the framework's default topicspace `tg` with class `flow` — what the
    /// framework's `queue(topic)` returns.
    ///
    /// # Errors
    ///
    /// A [`QueueIdError`] if `topic` is not a valid queue name.
    pub fn flow(topic: &str) -> Result<Self, QueueIdError> {
        Self::new(QueueClass::Flow, crate::DEFAULT_TENANT, topic)
    }

    /// Parses `class:topicspace:topic`.
    ///
    /// # Errors
    ///
    /// A [`QueueIdError`] naming the part that is missing or not valid.
    pub fn parse(id: &str) -> Result<Self, QueueIdError> {
        let mut parts = id.splitn(3, ':');
        let (Some(class), Some(topicspace), Some(topic)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(QueueIdError::Shape(id.to_owned()));
        };
        let class = QueueClass::from_name(class).ok_or_else(|| QueueIdError::Class {
            id: id.to_owned(),
            class: class.to_owned(),
        })?;
        Self::new(class, topicspace, topic).map_err(|e| match e {
            QueueIdError::Invalid(why) => QueueIdError::Invalid(format!("{id:?}: {why}")),
            other => other,
        })
    }

    /// The queue id a generic topic stands for: namespace `flow` at q1 or q2 is class `flow`;
    /// namespace `request`, `response` or `notify` at q0 is that class.
    ///
    /// # Errors
    ///
    /// [`QueueIdError::NotAQueue`] when the namespace is no class or does not go with the topic's
    /// quality of service.
    pub fn from_topic(topic: &Topic) -> Result<Self, QueueIdError> {
        let class = QueueClass::from_name(topic.namespace())
            .filter(|class| match class {
                QueueClass::Flow => topic.qos() != Qos::Q0,
                _ => topic.qos() == Qos::Q0,
            })
            .ok_or_else(|| QueueIdError::NotAQueue(topic.to_string()))?;
        Ok(Self {
            class,
            topic: topic.with_qos(class.qos()),
        })
    }

    /// The class.
    pub fn class(&self) -> QueueClass {
        self.class
    }

    /// The topicspace (the generic topic's tenant).
    pub fn topicspace(&self) -> &str {
        self.topic.tenant()
    }

    /// The topic part (the generic topic's queue).
    pub fn topic(&self) -> &str {
        self.topic.queue()
    }

    /// The generic topic of this queue id (see the [module docs](self)).
    pub fn to_topic(&self) -> Topic {
        self.topic.clone()
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.class, self.topicspace(), self.topic())
    }
}

impl FromStr for QueueId {
    type Err = QueueIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<QueueId> for Topic {
    fn from(id: QueueId) -> Topic {
        id.topic
    }
}

impl TryFrom<&Topic> for QueueId {
    type Error = QueueIdError;

    fn try_from(topic: &Topic) -> Result<Self, Self::Error> {
        Self::from_topic(topic)
    }
}

/// Why a queue id or topic is not a framework queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueIdError {
    /// The id is not `class:topicspace:topic`.
    Shape(String),
    /// The class is not `flow`, `request`, `response` or `notify`.
    Class {
        /// The whole id.
        id: String,
        /// The class it gave.
        class: String,
    },
    /// The topicspace or topic breaks the rules of a topic's tenant or queue (the text says which).
    Invalid(String),
    /// A generic topic whose namespace and quality of service are no queue class.
    NotAQueue(String),
}

impl fmt::Display for QueueIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shape(id) => write!(
                f,
                "invalid queue id {id:?}: expected class:topicspace:topic"
            ),
            Self::Class { id, class } => write!(
                f,
                "invalid queue id {id:?}: class {class:?} is not one of flow, request, response, notify"
            ),
            Self::Invalid(why) => write!(f, "invalid queue id {why}"),
            Self::NotAQueue(topic) => write!(
                f,
                "topic {topic:?} is no framework queue: its namespace must be flow (at q1 or q2) or request, response, notify (at q0)"
            ),
        }
    }
}

impl std::error::Error for QueueIdError {}

impl From<TopicError> for QueueIdError {
    fn from(e: TopicError) -> Self {
        Self::Invalid(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text_and_topics() {
        for (id, topic) in [
            (
                "flow:tg:text-completion-request",
                "q1/tg/flow/text-completion-request",
            ),
            ("request:tg:config", "q0/tg/request/config"),
            ("response:tg:config", "q0/tg/response/config"),
            ("notify:ws1:config", "q0/ws1/notify/config"),
            // the framework's flow queues carry more colons in the topic part
            (
                "flow:tg:document-load:default:embeddings",
                "q1/tg/flow/document-load:default:embeddings",
            ),
        ] {
            let parsed = QueueId::parse(id).unwrap();
            assert_eq!(parsed.to_string(), id);
            assert_eq!(parsed.to_topic().to_string(), topic);
            let back = QueueId::from_topic(&Topic::parse(topic).unwrap()).unwrap();
            assert_eq!(back, parsed);
        }
    }

    #[test]
    fn flow_at_q2_is_still_a_flow_queue() {
        let id = QueueId::from_topic(&Topic::parse("q2/tg/flow/x").unwrap()).unwrap();
        assert_eq!(id.to_string(), "flow:tg:x");
    }

    #[test]
    fn errors_name_the_bad_part() {
        let err = QueueIdError::to_string;
        assert_eq!(
            err(&QueueId::parse("flow:tg").unwrap_err()),
            "invalid queue id \"flow:tg\": expected class:topicspace:topic"
        );
        assert_eq!(
            err(&QueueId::parse("stream:tg:x").unwrap_err()),
            "invalid queue id \"stream:tg:x\": class \"stream\" is not one of flow, request, response, notify"
        );
        let bad_space = err(&QueueId::parse("flow:t g:x").unwrap_err());
        assert!(bad_space.contains("tenant segment"), "{bad_space}");
        let bad_topic = err(&QueueId::parse("flow:tg:a/b").unwrap_err());
        assert!(bad_topic.contains("queue segment"), "{bad_topic}");
        let not_a_queue =
            err(&QueueId::from_topic(&Topic::parse("q1/tg/request/x").unwrap()).unwrap_err());
        assert!(not_a_queue.contains("no framework queue"), "{not_a_queue}");
        assert!(QueueId::from_topic(&Topic::parse("q0/tg/other/x").unwrap()).is_err());
    }

    #[test]
    fn class_semantics() {
        assert!(QueueClass::Flow.is_persistent() && QueueClass::Flow.is_competing());
        assert!(!QueueClass::Request.is_persistent() && QueueClass::Request.is_competing());
        assert!(!QueueClass::Response.is_competing() && !QueueClass::Notify.is_competing());
        assert_eq!(QueueId::flow("x").unwrap().to_string(), "flow:tg:x");
    }
}
