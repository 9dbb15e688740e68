//! The session state of one consumer connection: its subscriptions, where incoming messages go
//! (the buffer its receivers empty), the messages it holds unacknowledged or refused, and the
//! acknowledgements on their way to the broker.
//!
//! The connection's event loop hands it every incoming PUBLISH and every written PUBACK /
//! PUBREC; the consumer's receivers take messages out and hand acknowledgements in. Neither
//! side ever waits for the other here: the event loop has to keep polling (writing
//! acknowledgements, pinging, noticing a dead connection) whatever the application does.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::v5::{Filter, PubAck, PubRec, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, EventLoop, Request};
use tg_backend_api::kit::properties_from_pairs_logged;
use tg_backend_api::{AckHandle, Message, MessageId, Properties, Qos, DEDUP_ID_PROPERTY};
use tokio::sync::mpsc;

/// User property counting deliveries before this one (set on messages handed back by nack/close).
pub(crate) const REDELIVERY_PROPERTY: &str = "tg-redelivery";
/// User property carrying [`OutboundMessage::key`](tg_backend_api::OutboundMessage::key).
pub(crate) const KEY_PROPERTY: &str = "tg-key";

/// A message delivered to the application and not yet acknowledged.
pub(crate) struct Held {
    pub(crate) publish: Publish,
    /// The broker's session still holds the message unacknowledged (false after it lost the
    /// session).
    pub(crate) live: bool,
    /// Deliveries before this one (its redelivery count).
    pub(crate) redeliveries: u32,
}

#[derive(Default)]
struct HeldState {
    next_seq: u64,
    unacked: HashMap<u64, Held>,
    by_pkid: HashMap<u16, u64>,
    /// Packet ids of QoS 1/2 messages not taken because the buffer was full (the broker sent
    /// more than Receive Maximum unacknowledged messages). They stay unacknowledged in the
    /// session, and the broker sends them again when the session is resumed.
    refused: HashSet<u16>,
    /// Messages refused since the last CONNACK: the session is resumed once the buffer has room.
    refused_since_connack: usize,
    /// A session resume was asked of the connection and its CONNACK has not come yet.
    resume_requested: bool,
}

/// Acknowledgements on their way to the broker.
#[derive(Default)]
struct Acks {
    /// Packet ids whose PUBACK / PUBREC was handed to rumqttc and not yet reported written.
    /// When the connection breaks, rumqttc drops the PUBACKs still in its request queue; these
    /// are queued again for the resumed session (and the broker's resend of such a message is
    /// not delivered again: the acknowledgement is on its way).
    unwritten: HashMap<u16, QoS>,
    /// Packet ids whose acknowledgement was written, with the connection it was written on.
    /// On a resumed session the broker sends what it holds unacknowledged again (DUP) right
    /// after its CONNACK: a resend crossing an acknowledgement written on the same connection is
    /// not a new delivery; one whose acknowledgement went out on an earlier connection means
    /// the broker never got it (the connection died first), and it is acknowledged again.
    /// Forgotten when the packet id comes with a new message (no DUP: the broker had the
    /// acknowledgement), after two reconnects, or when the session is lost; at most one entry
    /// per packet id.
    written: HashMap<u16, (u64, QoS)>,
    /// Connections (CONNACKs) so far.
    generation: u64,
    /// Acknowledgements rumqttc's request queue had no room for; the connection task moves
    /// them to rumqttc's pending queue. Bounded by the messages held.
    local: Vec<Request>,
}

struct Dedup {
    seen: HashSet<String>,
    order: VecDeque<String>,
    /// Most ids remembered (`dedup_capacity`); 0 remembers none.
    capacity: usize,
}

impl Dedup {
    /// Records `id`; false if it was already there.
    fn insert(&mut self, id: &str) -> bool {
        if self.capacity == 0 {
            return true;
        }
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }
}

/// One consumer connection's session state (see the module).
pub struct Session {
    id: u64,
    /// The tg topic (`q1/tenant/namespace/queue`), for log lines.
    topic_name: String,
    mqtt_topic: String,
    redeliver_topic: String,
    filters: Mutex<Vec<Filter>>,
    held: Mutex<HeldState>,
    acks: Mutex<Acks>,
    /// `acks.local` is not empty.
    local_acks: AtomicBool,
    tx: mpsc::Sender<Message>,
    dedup: Option<Mutex<Dedup>>,
    dropped_q0: AtomicU64,
    /// QoS 1/2 messages refused because the buffer was full (see [`HeldState::refused`]).
    refused_total: AtomicU64,
}

impl Session {
    /// The session of consumer `id` on a `qos` topic, subscribed to `mqtt_topic` and its
    /// `redeliver_topic`, delivering into `tx`.
    pub fn new(
        id: u64,
        qos: Qos,
        mqtt_topic: String,
        redeliver_topic: String,
        dedup_capacity: usize,
        tx: mpsc::Sender<Message>,
    ) -> Self {
        let dedup = (qos == Qos::Q2).then(|| {
            Mutex::new(Dedup {
                seen: HashSet::new(),
                order: VecDeque::new(),
                capacity: dedup_capacity,
            })
        });
        Self {
            id,
            topic_name: format!("{qos}/{mqtt_topic}"),
            mqtt_topic,
            redeliver_topic,
            filters: Mutex::new(Vec::new()),
            held: Mutex::new(HeldState::default()),
            acks: Mutex::new(Acks::default()),
            local_acks: AtomicBool::new(false),
            tx,
            dedup,
            dropped_q0: Default::default(),
            refused_total: Default::default(),
        }
    }

    /// The id of the consumer, in the [`AckHandle`]s of the messages it delivers.
    pub(crate) fn consumer_id(&self) -> u64 {
        self.id
    }

    /// The subscription's redelivery topic (nack and close hand messages back through it).
    pub(crate) fn redeliver_topic(&self) -> &str {
        &self.redeliver_topic
    }

    /// Messages in the buffer, not yet received by the application.
    fn buffered(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub(crate) fn filters(&self) -> Vec<Filter> {
        self.filters.lock().clone()
    }

    pub(crate) fn set_filters(&self, filters: Vec<Filter>) {
        *self.filters.lock() = filters;
    }

    /// A CONNACK arrived; when the broker has no session for us, what we hold is no longer
    /// acknowledgeable (it will not be redelivered by the broker either).
    pub(crate) fn session_resumed(&self, present: bool) {
        let mut held = self.held.lock();
        held.refused_since_connack = 0;
        held.resume_requested = false;
        if !present {
            held.by_pkid.clear();
            for h in held.unacked.values_mut() {
                h.live = false;
            }
            if !held.refused.is_empty() {
                tracing::warn!(
                    refused = held.refused.len(),
                    "the MQTT broker lost the session: messages this consumer refused when its \
                     buffer was full went with it"
                );
                held.refused.clear();
            }
            drop(held);
            // rumqttc cleared its pending acknowledgements; those of the old session are moot.
            let mut acks = self.acks.lock();
            acks.generation += 1;
            acks.unwritten.clear();
            acks.written.clear();
            acks.local.clear();
            self.local_acks.store(false, Ordering::Release);
        } else {
            drop(held);
            let mut acks = self.acks.lock();
            acks.generation += 1;
            let previous = acks.generation - 1;
            acks.written.retain(|_, (g, _)| *g >= previous);
        }
    }

    /// Hands the acknowledgement of `publish` to the connection without waiting: into rumqttc's
    /// request queue, or when that is full into a local one the connection task empties.
    pub(crate) fn queue_ack(&self, client: &AsyncClient, publish: &Publish) {
        let Some(request) = ack_request(publish) else {
            return;
        };
        // Under the lock: the connection task takes it to recover what rumqttc dropped.
        let mut acks = self.acks.lock();
        acks.unwritten.insert(publish.pkid, publish.qos);
        if client.try_ack(publish).is_err() {
            acks.local.push(request);
            self.local_acks.store(true, Ordering::Release);
        }
    }

    /// Records an acknowledgement the connection task puts in rumqttc's pending queue itself.
    pub(crate) fn record_ack(&self, request: &Request) {
        if let Request::PubAck(PubAck { pkid, .. }) | Request::PubRec(PubRec { pkid, .. }) = request
        {
            let qos = match request {
                Request::PubAck(_) => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            };
            self.acks.lock().unwritten.insert(*pkid, qos);
        }
    }

    /// rumqttc wrote the PUBACK / PUBREC of `pkid`.
    pub(crate) fn ack_written(&self, pkid: u16) {
        let mut acks = self.acks.lock();
        if let Some(qos) = acks.unwritten.remove(&pkid) {
            let generation = acks.generation;
            acks.written.insert(pkid, (generation, qos));
        }
    }

    /// Moves the acknowledgements rumqttc's request queue had no room for to its pending queue.
    pub(crate) fn flush_local_acks(&self, eventloop: &mut EventLoop) {
        if self.local_acks.swap(false, Ordering::AcqRel) {
            let local = std::mem::take(&mut self.acks.lock().local);
            eventloop.pending.extend(local);
        }
    }

    /// After the connection broke (rumqttc has cleaned up): drops the network for good, takes
    /// what is still in rumqttc's request queue, and queues again, for the resumed session, every
    /// acknowledgement rumqttc dropped before writing it. Nothing is queued twice: the lock keeps
    /// the application from handing over acknowledgements meanwhile.
    pub(crate) fn recover_acks(&self, eventloop: &mut EventLoop) {
        let mut acks = self.acks.lock();
        eventloop.clean();
        let queued: HashSet<u16> = eventloop
            .pending
            .iter()
            .chain(acks.local.iter())
            .filter_map(|r| match r {
                Request::PubAck(a) => Some(a.pkid),
                Request::PubRec(r) => Some(r.pkid),
                _ => None,
            })
            .collect();
        let lost: Vec<Request> = acks
            .unwritten
            .iter()
            .filter(|(pkid, _)| !queued.contains(pkid))
            .map(|(&pkid, &qos)| match qos {
                QoS::ExactlyOnce => Request::PubRec(PubRec::new(pkid, None)),
                _ => Request::PubAck(PubAck::new(pkid, None)),
            })
            .collect();
        if !lost.is_empty() {
            tracing::debug!(
                count = lost.len(),
                "acknowledgements the connection dropped queued again"
            );
        }
        eventloop.pending.extend(lost);
        let local = std::mem::take(&mut acks.local);
        eventloop.pending.extend(local);
        self.local_acks.store(false, Ordering::Release);
    }

    /// True (once per episode) when messages were refused because the buffer was full and the
    /// buffer has room again: time to resume the session so that the broker sends them again.
    pub(crate) fn resume_due(&self) -> bool {
        let mut held = self.held.lock();
        if held.refused_since_connack == 0
            || held.resume_requested
            || self.buffered() > self.tx.max_capacity() / 2
        {
            return false;
        }
        held.resume_requested = true;
        true
    }

    /// The resume could not be asked for now; the next receive asks again.
    pub(crate) fn resume_failed(&self) {
        self.held.lock().resume_requested = false;
    }

    /// Messages refused since the last CONNACK (for the log of a resume).
    pub(crate) fn refused_pending(&self) -> usize {
        self.held.lock().refused_since_connack
    }

    /// Turns an incoming PUBLISH into a message for the application. Returns an acknowledgement
    /// to send at once for a message that is dropped as a duplicate.
    pub fn deliver(&self, publish: Publish) -> Option<Request> {
        let via_redeliver = publish.topic.as_ref() == self.redeliver_topic.as_bytes();
        if !via_redeliver && publish.topic.as_ref() != self.mqtt_topic.as_bytes() {
            tracing::debug!(topic = %String::from_utf8_lossy(&publish.topic), "message on an unexpected topic ignored");
            return ack_request(&publish);
        }
        // A new consumer gets the retained message from a connection of its own
        // (`deliver_retained`); a broker that still sends it on the shared subscription (before
        // Mosquitto 2.0.13, and then again on every resubscribe) would hand it out twice.
        if publish.retain {
            return ack_request(&publish);
        }
        self.take_in(publish, via_redeliver)
    }

    /// Hands the topic's retained message, fetched for a new consumer on a connection of its own
    /// at QoS 0, to the application: at most once, with nothing to acknowledge.
    pub(crate) fn deliver_retained(&self, mut publish: Publish) {
        if publish.topic.as_ref() != self.mqtt_topic.as_bytes() {
            return;
        }
        // What `take_in` reads of the header: QoS 0 keeps nothing to acknowledge, and a message
        // the application never had is no redelivery.
        publish.qos = QoS::AtMostOnce;
        publish.dup = false;
        let _ = self.take_in(publish, false);
    }

    /// A message of the subscription's topic (or, `via_redeliver`, its redelivery topic) for the
    /// application.
    fn take_in(&self, publish: Publish, via_redeliver: bool) -> Option<Request> {
        // A repeated name: the last value wins and a warning names it (the rule of every
        // backend); that holds for the key and the redelivery count too.
        let mut properties = match &publish.properties {
            Some(p) => properties_from_pairs_logged(
                &self.topic_name,
                p.user_properties
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            ),
            None => Properties::new(),
        };
        let mut count = properties
            .remove(REDELIVERY_PROPERTY)
            .map_or(0, |v| v.parse().unwrap_or(1));
        let key = properties.remove(KEY_PROPERTY);
        let qos = publish.qos;
        if qos != QoS::AtMostOnce {
            let mut acks = self.acks.lock();
            if publish.dup {
                if acks.unwritten.contains_key(&publish.pkid) {
                    // Sent again after a reconnect; its acknowledgement is on its way.
                    return None;
                }
                if let Some((generation, _)) = acks.written.get(&publish.pkid).copied() {
                    if generation == acks.generation {
                        // Crossed the acknowledgement written on this connection.
                        return None;
                    }
                    // The acknowledgement went out on a connection that died before the broker
                    // read it: acknowledge again (nothing else for this packet id is pending).
                    acks.written.remove(&publish.pkid);
                    return ack_request(&publish);
                }
            } else {
                acks.written.remove(&publish.pkid);
            }
        }
        // Never waits for the application: the connection task has to keep polling (acks,
        // pings, disconnects), and the application's acknowledgements go through it.
        let mut held = self.held.lock();
        {
            if qos != QoS::AtMostOnce {
                if let Some(seq) = held.by_pkid.get(&publish.pkid).copied() {
                    let same = held.unacked.get(&seq).is_some_and(|h| {
                        publish.dup
                            && h.publish.topic == publish.topic
                            && h.publish.payload == publish.payload
                    });
                    if same {
                        // The broker sent again a message we still hold (reconnect, same session).
                        return None;
                    }
                    // The broker reuses the packet id for another message: what we hold under
                    // it can no longer be acknowledged by packet id.
                    tracing::debug!(pkid = publish.pkid, "packet id reused by the broker");
                    held.by_pkid.remove(&publish.pkid);
                    if let Some(h) = held.unacked.get_mut(&seq) {
                        h.live = false;
                    }
                }
            }
            let permit = match self.tx.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Closed(())) => return None,
                Err(mpsc::error::TrySendError::Full(())) if qos == QoS::AtMostOnce => {
                    // QoS 0 is at most once: when the application does not keep up, drop.
                    let n = self.dropped_q0.fetch_add(1, Ordering::Relaxed);
                    if n.is_power_of_two() {
                        tracing::warn!(
                            dropped = n + 1,
                            "q0 consumer buffer full: messages dropped"
                        );
                    }
                    return None;
                }
                Err(mpsc::error::TrySendError::Full(())) => {
                    // The broker sent far more unacknowledged messages than Receive Maximum
                    // (a broker keeping to it never fills a twentieth of the buffer). Neither
                    // taken nor acknowledged: the broker keeps it in the session and sends it
                    // again when the session is resumed, once the buffer has room.
                    held.refused.insert(publish.pkid);
                    held.refused_since_connack += 1;
                    let n = self.refused_total.fetch_add(1, Ordering::Relaxed);
                    if n == 0 {
                        tracing::warn!(
                            topic = %self.mqtt_topic,
                            buffer = self.tx.max_capacity(),
                            "the MQTT broker sends more unacknowledged messages than the \
                             consumer's Receive Maximum allows (Mosquitto before 2.0.13 does); \
                             those that do not fit the buffer are left with the broker and \
                             fetched again by resuming the session, which a large backlog can \
                             stall: use Mosquitto 2.0.13 or later"
                        );
                    }
                    return None;
                }
            };
            if !via_redeliver {
                if let (Some(dedup), Some(id)) = (&self.dedup, properties.get(DEDUP_ID_PROPERTY)) {
                    if !dedup.lock().insert(id) {
                        tracing::debug!(dedup_id = %id, "duplicate q2 message dropped");
                        return ack_request(&publish);
                    }
                }
            }
            // A message refused earlier never reached the application: not a redelivery.
            let was_refused = qos != QoS::AtMostOnce && held.refused.remove(&publish.pkid);
            if !via_redeliver {
                count = u32::from(publish.dup && !was_refused);
            }
            held.next_seq += 1;
            let seq = held.next_seq;
            let message = Message::new(
                publish.payload.clone(),
                properties,
                MessageId::from_u64(seq),
                AckHandle::new(self.id, seq),
            )
            .with_redelivery_count(count)
            .with_key(key);
            if qos != QoS::AtMostOnce {
                held.by_pkid.insert(publish.pkid, seq);
                held.unacked.insert(
                    seq,
                    Held {
                        publish,
                        live: true,
                        redeliveries: count,
                    },
                );
            }
            permit.send(message);
        }
        None
    }

    pub(crate) fn take(&self, seq: u64) -> Option<Held> {
        let mut held = self.held.lock();
        let h = held.unacked.remove(&seq)?;
        if h.live && held.by_pkid.get(&h.publish.pkid) == Some(&seq) {
            held.by_pkid.remove(&h.publish.pkid);
        }
        Some(h)
    }

    pub(crate) fn put_back(&self, seq: u64, h: Held) {
        let mut held = self.held.lock();
        if h.live {
            held.by_pkid.insert(h.publish.pkid, seq);
        }
        held.unacked.insert(seq, h);
    }

    pub(crate) fn take_all(&self) -> Vec<Held> {
        let mut held = self.held.lock();
        held.by_pkid.clear();
        let mut all: Vec<(u64, Held)> = held.unacked.drain().collect();
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, h)| h).collect()
    }
}

fn ack_request(publish: &Publish) -> Option<Request> {
    match publish.qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => Some(Request::PubAck(PubAck::new(publish.pkid, None))),
        QoS::ExactlyOnce => Some(Request::PubRec(PubRec::new(publish.pkid, None))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_capacity_forgets_oldest() {
        let mut d = Dedup {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: 2,
        };
        assert!(d.insert("a") && d.insert("b"));
        assert!(!d.insert("a"));
        assert!(d.insert("c"));
        assert!(d.insert("a"), "a was forgotten: two ids at most");
    }

    fn incoming(pkid: u16, dup: bool, payload: &'static str) -> Publish {
        let mut p = Publish::new("t/n/q", QoS::AtLeastOnce, payload, None);
        p.pkid = pkid;
        p.dup = dup;
        p
    }

    fn session(buffer: usize) -> (Session, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(buffer);
        let session = Session::new(
            1,
            Qos::Q1,
            "t/n/q".into(),
            "tg-redeliver/s/t/n/q".into(),
            0,
            tx,
        );
        session.session_resumed(true);
        (session, rx)
    }

    /// The connection task never waits for the application: with the buffer full, a message
    /// the broker should not have sent (beyond Receive Maximum) is left unacknowledged with the
    /// broker, and a session resume, once the buffer has room, brings it back.
    #[test]
    fn a_full_buffer_refuses_at_once_and_a_resume_brings_the_message_back() {
        let (session, mut rx) = session(2);
        assert!(session.deliver(incoming(1, false, "a")).is_none());
        assert!(session.deliver(incoming(2, false, "b")).is_none());
        assert!(
            session.deliver(incoming(3, false, "c")).is_none(),
            "refused, not acknowledged"
        );
        assert!(!session.resume_due(), "no room yet");
        let a = rx.try_recv().unwrap();
        assert_eq!(a.payload().as_ref(), b"a");
        assert!(session.resume_due());
        assert!(!session.resume_due(), "asked for once");
        // The resumed session: the broker sends again all it holds unacknowledged.
        session.session_resumed(true);
        assert!(session.deliver(incoming(1, true, "a")).is_none());
        assert!(session.deliver(incoming(2, true, "b")).is_none());
        assert!(session.deliver(incoming(3, true, "c")).is_none());
        assert_eq!(rx.try_recv().unwrap().payload().as_ref(), b"b");
        let c = rx.try_recv().unwrap();
        assert_eq!(c.payload().as_ref(), b"c");
        assert_eq!(c.redelivery_count(), 0, "the application never had it");
        assert!(
            rx.try_recv().is_err(),
            "held messages are not handed out twice"
        );
        assert!(!session.resume_due());
    }

    /// The retained message is delivered as fetched for the new consumer, at most once; one the
    /// broker sends on the shared subscription is acknowledged and dropped.
    #[test]
    fn retained_messages_come_from_the_fetch_only() {
        let (session, mut rx) = session(10);
        let mut fetched = incoming(0, false, "state");
        fetched.qos = QoS::AtMostOnce;
        fetched.retain = true;
        session.deliver_retained(fetched);
        let mut shared_retained = incoming(3, false, "state");
        shared_retained.retain = true;
        match session.deliver(shared_retained) {
            Some(Request::PubAck(a)) => assert_eq!(a.pkid, 3),
            other => panic!("{other:?}"),
        }
        assert!(session.deliver(incoming(4, false, "live")).is_none());
        let state = rx.try_recv().unwrap();
        assert_eq!(state.payload().as_ref(), b"state");
        assert!(
            session.take(state.ack_handle().seq()).is_none(),
            "nothing to acknowledge"
        );
        assert_eq!(rx.try_recv().unwrap().payload().as_ref(), b"live");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn resends_crossing_an_acknowledgement_are_not_delivered_again() {
        let (client, _eventloop) =
            AsyncClient::new(rumqttc::v5::MqttOptions::new("t", "127.0.0.1", 1), 10);
        let (session, mut rx) = session(10);
        assert!(session.deliver(incoming(7, false, "x")).is_none());
        let m = rx.try_recv().unwrap();
        let held = session.take(m.ack_handle().seq()).unwrap();
        session.queue_ack(&client, &held.publish);
        // Reconnected before rumqttc wrote the acknowledgement: the resend is not delivered.
        session.session_resumed(true);
        assert!(session.deliver(incoming(7, true, "x")).is_none());
        // Written on this connection: a resend crossing it is not delivered either.
        session.ack_written(7);
        assert!(session.deliver(incoming(7, true, "x")).is_none());
        assert!(rx.try_recv().is_err());
        // Sent again on the next connection: the broker never got the acknowledgement (the
        // connection died first); acknowledged again, not delivered.
        session.session_resumed(true);
        match session.deliver(incoming(7, true, "x")) {
            Some(Request::PubAck(a)) => assert_eq!(a.pkid, 7),
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err());
        // The packet id with a new message: delivered.
        assert!(session.deliver(incoming(7, false, "y")).is_none());
        assert_eq!(rx.try_recv().unwrap().payload().as_ref(), b"y");
    }
}
