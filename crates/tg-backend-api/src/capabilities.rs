//! What a backend can do, per quality of service.

/// What a backend guarantees for topics of one [`Qos`](tg_topic::Qos). The conformance suite runs
/// the tests these flags allow, and documentation of each backend explains them.
///
/// Build one from [`Capabilities::NONE`] and set fields:
///
/// ```
/// use tg_backend_api::Capabilities;
/// let mut caps = Capabilities::NONE;
/// caps.shared = true;
/// caps.max_payload = 1 << 20;
/// assert!(caps.shared && !caps.exclusive);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Messages survive a broker restart.
    pub persistent: bool,
    /// A subscription keeps collecting messages while none of its consumers is connected, and
    /// acknowledged state outlives its consumers.
    pub durable_subscriptions: bool,
    /// Messages of one producer reach one consumer in the order they were sent (absent nacks).
    pub ordered: bool,
    /// Several consumers of one subscription compete for its messages
    /// ([`ConsumerType::Shared`](crate::ConsumerType::Shared)). Where false, a subscription takes
    /// one consumer (of the default type) and a second is refused with
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) saying why.
    pub shared: bool,
    /// [`ConsumerType::Exclusive`](crate::ConsumerType::Exclusive) is available and enforced.
    pub exclusive: bool,
    /// [`ConsumerType::Failover`](crate::ConsumerType::Failover) is available.
    pub failover: bool,
    /// [`InitialPosition::Earliest`](crate::InitialPosition::Earliest) replays retained messages.
    /// Where false, earliest behaves as latest (and the backend says so in a log line).
    pub earliest: bool,
    /// `negative_acknowledge` makes the message deliverable again.
    pub nack_redelivery: bool,
    /// [`Message::redelivery_count`](crate::Message::redelivery_count) counts redeliveries.
    pub redelivery_count: bool,
    /// Messages a consumer held unacknowledged when it closed go back to the subscription.
    pub redeliver_unacked_on_close: bool,
    /// Messages with the same [`DEDUP_ID_PROPERTY`](crate::DEDUP_ID_PROPERTY) are delivered once
    /// within the backend's documented window.
    pub deduplication: bool,
    /// The retained flag of [`OutboundMessage::retain`](crate::OutboundMessage::retain) is honoured.
    pub retained: bool,
    /// Acknowledging is meaningful (false for fire-and-forget transports where ack is a no-op).
    pub acknowledgement: bool,
    /// The largest payload, in bytes, a message may carry; larger ones fail with
    /// [`ErrorKind::PayloadTooLarge`](crate::ErrorKind::PayloadTooLarge) before sending.
    pub max_payload: usize,
}

impl Capabilities {
    /// Nothing supported, `max_payload` 0.
    pub const NONE: Capabilities = Capabilities {
        persistent: false,
        durable_subscriptions: false,
        ordered: false,
        shared: false,
        exclusive: false,
        failover: false,
        earliest: false,
        nack_redelivery: false,
        redelivery_count: false,
        redeliver_unacked_on_close: false,
        deduplication: false,
        retained: false,
        acknowledgement: false,
        max_payload: 0,
    };

    /// Whether consumers of this type can be created.
    pub fn supports(&self, consumer_type: crate::ConsumerType) -> bool {
        match consumer_type {
            crate::ConsumerType::Shared => self.shared,
            crate::ConsumerType::Exclusive => self.exclusive,
            crate::ConsumerType::Failover => self.failover,
        }
    }
}
