//! Outgoing and received messages, message ids and acknowledgement handles.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

/// Message properties: string keys to string values, carried natively by every backend
/// (Pulsar properties, MQTT 5 user properties, Redis stream fields, PostgreSQL `jsonb`).
///
/// Keys starting with `tg-` are reserved for tg-pubsub itself.
pub type Properties = BTreeMap<String, String>;

/// Property holding the producer-assigned id that q2 topics de-duplicate on. A q2 producer sets it
/// (a UUID) when the caller did not; set it yourself to make retries of the same logical message
/// collapse into one delivery.
pub const DEDUP_ID_PROPERTY: &str = "tg-dedup-id";

/// Property the Python framework and the request/response runtime correlate on.
pub const CORRELATION_ID_PROPERTY: &str = "id";

/// A message to send: payload bytes, properties, and an optional key.
///
/// ```
/// use tg_backend_api::OutboundMessage;
///
/// let msg = OutboundMessage::new("hello").property("id", "42").key("user-7");
/// assert_eq!(msg.payload(), "hello".as_bytes());
/// assert_eq!(msg.properties().get("id").map(String::as_str), Some("42"));
/// assert_eq!(msg.key_str(), Some("user-7"));
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct OutboundMessage {
    payload: Bytes,
    properties: Properties,
    key: Option<String>,
    retain: bool,
}

impl OutboundMessage {
    /// A message with this payload and no properties.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// Adds one property.
    #[must_use]
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Replaces all properties.
    #[must_use]
    pub fn with_properties(mut self, properties: Properties) -> Self {
        self.properties = properties;
        self
    }

    /// Sets the ordering/partition key (Pulsar key, per-key ordering in the runtime).
    #[must_use]
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Asks the broker to keep this message as the topic's last value for future subscribers
    /// (MQTT retained flag). Only backends whose [`Capabilities::retained`](crate::Capabilities)
    /// is true accept it; the others refuse with [`ErrorKind::Unsupported`](crate::ErrorKind).
    #[must_use]
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The properties.
    pub fn properties(&self) -> &Properties {
        &self.properties
    }

    /// The properties, mutably.
    pub fn properties_mut(&mut self) -> &mut Properties {
        &mut self.properties
    }

    /// The key, if any.
    pub fn key_str(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Whether the retained flag is set.
    pub fn is_retained(&self) -> bool {
        self.retain
    }

    /// The de-duplication id, setting a fresh UUID first if there is none. q2 producers call this.
    pub fn ensure_dedup_id(&mut self) -> &str {
        self.properties
            .entry(DEDUP_ID_PROPERTY.to_owned())
            .or_insert_with(|| uuid::Uuid::new_v4().to_string())
    }

    /// Splits the message into payload, properties and key.
    pub fn into_parts(self) -> (Bytes, Properties, Option<String>) {
        (self.payload, self.properties, self.key)
    }
}

impl fmt::Debug for OutboundMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundMessage")
            .field("payload_len", &self.payload.len())
            .field("properties", &self.properties)
            .field("key", &self.key)
            .field("retain", &self.retain)
            .finish()
    }
}

/// The broker's id of a message: a sequence number or the backend's own text form
/// (a Redis stream id, a Pulsar `ledger:entry:partition:batch`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(IdRepr);

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum IdRepr {
    Seq(u64),
    Text(Arc<str>),
}

impl MessageId {
    /// An id that is a sequence number.
    pub const fn from_u64(seq: u64) -> Self {
        Self(IdRepr::Seq(seq))
    }

    /// An id in the backend's own text form.
    pub fn from_text(text: impl Into<Arc<str>>) -> Self {
        Self(IdRepr::Text(text.into()))
    }

    /// The sequence number, if this id is one.
    pub fn as_u64(&self) -> Option<u64> {
        match &self.0 {
            IdRepr::Seq(n) => Some(*n),
            IdRepr::Text(_) => None,
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            IdRepr::Seq(n) => write!(f, "{n}"),
            IdRepr::Text(t) => f.write_str(t),
        }
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// Returns a process-wide unique id for a new consumer; backends put it in the
/// [`AckHandle`]s they hand out so a message acknowledged on the wrong consumer is detected.
pub fn next_consumer_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// What a backend needs to acknowledge a message it delivered: the id of the consumer that
/// received it, a backend-chosen number, and optionally any backend-specific value.
#[derive(Clone)]
pub struct AckHandle {
    consumer: u64,
    seq: u64,
    extra: Option<Arc<dyn Any + Send + Sync>>,
}

impl AckHandle {
    /// A handle for message `seq` received by consumer `consumer` (see [`next_consumer_id`]).
    pub fn new(consumer: u64, seq: u64) -> Self {
        Self {
            consumer,
            seq,
            extra: None,
        }
    }

    /// Attaches a backend-specific value (e.g. the client's own message handle).
    #[must_use]
    pub fn with_extra<T: Any + Send + Sync>(mut self, extra: T) -> Self {
        self.extra = Some(Arc::new(extra));
        self
    }

    /// The consumer that received the message.
    pub fn consumer(&self) -> u64 {
        self.consumer
    }

    /// The backend-chosen number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The backend-specific value, if it is a `T`.
    pub fn extra<T: Any>(&self) -> Option<&T> {
        self.extra.as_deref().and_then(|e| e.downcast_ref::<T>())
    }
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckHandle")
            .field("consumer", &self.consumer)
            .field("seq", &self.seq)
            .finish()
    }
}

/// A received message.
///
/// Backends build it with [`Message::new`] and the `with_*` setters; applications read it and
/// hand it back to the consumer's `acknowledge` / `negative_acknowledge`.
#[derive(Clone)]
pub struct Message {
    payload: Bytes,
    properties: Properties,
    id: MessageId,
    redelivery_count: u32,
    key: Option<String>,
    publish_time: Option<SystemTime>,
    ack: AckHandle,
}

impl Message {
    /// A received message (for backend implementations).
    pub fn new(payload: Bytes, properties: Properties, id: MessageId, ack: AckHandle) -> Self {
        Self {
            payload,
            properties,
            id,
            redelivery_count: 0,
            key: None,
            publish_time: None,
            ack,
        }
    }

    /// Sets how many times this message was delivered before.
    #[must_use]
    pub fn with_redelivery_count(mut self, count: u32) -> Self {
        self.redelivery_count = count;
        self
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: Option<String>) -> Self {
        self.key = key;
        self
    }

    /// Sets the time the broker accepted the message.
    #[must_use]
    pub fn with_publish_time(mut self, time: SystemTime) -> Self {
        self.publish_time = Some(time);
        self
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Takes the payload.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// The properties.
    pub fn properties(&self) -> &Properties {
        &self.properties
    }

    /// One property.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }

    /// The broker's id of the message.
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// How many times the message was delivered before this delivery (0 on first delivery).
    /// Backends whose [`Capabilities::redelivery_count`](crate::Capabilities) is false leave it 0.
    pub fn redelivery_count(&self) -> u32 {
        self.redelivery_count
    }

    /// The key, if the producer set one.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// When the broker accepted the message, if the backend knows.
    pub fn publish_time(&self) -> Option<SystemTime> {
        self.publish_time
    }

    /// The acknowledgement handle (for backend implementations).
    pub fn ack_handle(&self) -> &AckHandle {
        &self.ack
    }
}

impl AsRef<Message> for Message {
    fn as_ref(&self) -> &Message {
        self
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("payload_len", &self.payload.len())
            .field("properties", &self.properties)
            .field("redelivery_count", &self.redelivery_count)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_id_is_set_once() {
        let mut msg = OutboundMessage::new("x");
        let first = msg.ensure_dedup_id().to_owned();
        assert_eq!(first.len(), 36);
        assert_eq!(msg.ensure_dedup_id(), first);
        let mut own = OutboundMessage::new("x").property(DEDUP_ID_PROPERTY, "mine");
        assert_eq!(own.ensure_dedup_id(), "mine");
    }

    #[test]
    fn ack_handle_extra_downcasts() {
        let h = AckHandle::new(3, 9).with_extra(String::from("1-0"));
        assert_eq!(h.extra::<String>().map(String::as_str), Some("1-0"));
        assert!(h.extra::<u32>().is_none());
        assert_eq!((h.consumer(), h.seq()), (3, 9));
    }

    #[test]
    fn message_id_forms() {
        assert_eq!(MessageId::from_u64(7).to_string(), "7");
        assert_eq!(MessageId::from_text("1700-0").to_string(), "1700-0");
        assert_eq!(MessageId::from_u64(7).as_u64(), Some(7));
        assert!(next_consumer_id() < next_consumer_id());
    }

    #[test]
    fn debug_hides_payload_bytes() {
        let msg = OutboundMessage::new("secret-token");
        assert!(!format!("{msg:?}").contains("secret"));
    }
}
