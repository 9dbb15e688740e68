//! The session state of one consumer connection: its subscriptions, where incoming messages go
//! (the buffer its receivers empty), the messages it holds unacknowledged or refused, and the
//! acknowledgements on their way to the broker.
//!
//! The connection's event loop hands it every incoming PUBLISH and every written PUBACK /
//! PUBREC; the consumer's receivers take messages out and hand acknowledgements in. Neither
//! side ever waits for the other here: the event loop has to keep polling (writing
//! acknowledgements, pinging, noticing a dead connection) whatever the application does.
//!
//! Acknowledgements go out through a [`Gate`], which against a broker that exceeds Receive
//! Maximum holds some back until the buffer has room for what they release. What has to reach
//! the broker without the application's help — acknowledgements rumqttc's request queue had no
//! room for, those the gate held back, and the session resume that fetches refused messages — is
//! sent by the connection task, which the receivers wake through [`Session::wake`] (see
//! `connection::run`): an idle link must not hold any of it back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::v5::{Filter, PubAck, PubRec, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, EventLoop, Request};
use tg_backend_api::kit::{properties_from_pairs, warn_repeated};
use tg_backend_api::{AckHandle, Message, MessageId, Qos, Topic, DEDUP_ID_PROPERTY};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::gate::Gate;

/// What the session's queues and maps are shrunk back to once a burst (a backlog) is over:
/// memory follows the buffer, not the largest burst ever seen.
const SHRINK_TO: usize = 256;

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

struct HeldState {
    /// Which acknowledgements go out when (see [`Gate`]).
    gate: Gate,
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
    /// after its CONNACK: a resend (same content) crossing an acknowledgement written on the
    /// same connection is not a new delivery; one whose acknowledgement went out on an earlier
    /// connection means the broker never got it (the connection died first), and it is
    /// acknowledged again. Forgotten when the packet id comes with a new message (no DUP: the
    /// broker had the acknowledgement) or with other content, or when the session is lost; at
    /// most one entry per packet id.
    written: HashMap<u16, (u64, QoS)>,
    /// What the message acknowledged under each packet id was (a hash of its topic, payload and
    /// user properties), from the application's acknowledgement until the id comes with a new
    /// message. A packet id alone does not tell a resend from
    /// another message the broker sent under the id after reading the acknowledgement: a resend
    /// crossing or missing an acknowledgement has the content of the acknowledged message.
    content: HashMap<u16, u64>,
    /// Connections (CONNACKs) so far.
    generation: u64,
    /// Acknowledgements (packet id, QoS) waiting for room in rumqttc's request queue, in order;
    /// the connection task moves them on ([`Session::pump_acks`]). Bounded by the messages held
    /// (one entry per packet id in `unwritten`).
    ///
    /// Not rumqttc's pending queue: that one goes before its request queue and is read at
    /// most once per timer tick (a zero `pending_throttle` still sleeps until the next
    /// millisecond), about 1,000 packets a second, which a consumer working off a backlog
    /// outruns many times over.
    parked: VecDeque<(u16, QoS)>,
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
pub(crate) struct Session {
    id: u64,
    /// The tg topic (`q1/tenant/namespace/queue`), for log lines.
    topic_name: String,
    mqtt_topic: String,
    redeliver_topic: String,
    filters: Mutex<Vec<Filter>>,
    held: Mutex<HeldState>,
    acks: Mutex<Acks>,
    /// `acks.parked` is not empty.
    parked_acks: AtomicBool,
    /// Acknowledgements the [`Gate`] holds back (its count, readable without the lock).
    held_back: AtomicUsize,
    /// [`HeldState::refused_since_connack`] while no resume was asked for yet: the receivers
    /// wake the connection task once the buffer is half empty.
    resume_wanted: AtomicUsize,
    /// Wakes the connection task: acknowledgements were parked, or the buffer has room for
    /// what was refused (see [`Session::wake`]).
    wake: Notify,
    tx: mpsc::Sender<Message>,
    dedup: Option<Mutex<Dedup>>,
    dropped_q0: AtomicU64,
    /// QoS 1/2 messages refused because the buffer was full (see [`HeldState::refused`]).
    refused_total: AtomicU64,
}

impl Session {
    pub(crate) fn new(
        id: u64,
        topic: &Topic,
        mqtt_topic: String,
        redeliver_topic: String,
        dedup_capacity: usize,
        receive_maximum: u16,
        tx: mpsc::Sender<Message>,
    ) -> Self {
        let dedup = (topic.qos() == Qos::Q2).then(|| {
            Mutex::new(Dedup {
                seen: HashSet::new(),
                order: VecDeque::new(),
                capacity: dedup_capacity,
            })
        });
        Self {
            id,
            topic_name: topic.to_string(),
            mqtt_topic,
            redeliver_topic,
            filters: Mutex::new(Vec::new()),
            held: Mutex::new(HeldState {
                gate: Gate::new(receive_maximum),
                next_seq: 0,
                unacked: HashMap::new(),
                by_pkid: HashMap::new(),
                refused: HashSet::new(),
                refused_since_connack: 0,
                resume_requested: false,
            }),
            held_back: AtomicUsize::new(0),
            acks: Mutex::new(Acks::default()),
            parked_acks: AtomicBool::new(false),
            resume_wanted: AtomicUsize::new(0),
            wake: Notify::new(),
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
        self.resume_wanted.store(0, Ordering::Release);
        if !present {
            held.gate.clear();
            self.held_back.store(0, Ordering::Release);
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
            acks.content.clear();
            acks.parked.clear();
            self.parked_acks.store(false, Ordering::Release);
            // The maps are gone with the session; what they had grown to is not needed again.
            acks.unwritten.shrink_to(SHRINK_TO);
            acks.written.shrink_to(SHRINK_TO);
            acks.content.shrink_to(SHRINK_TO);
            acks.parked.shrink_to(SHRINK_TO);
        } else {
            drop(held);
            let mut acks = self.acks.lock();
            // Written acknowledgements and the content of acknowledged messages are kept (at
            // most one entry per packet id): a resend with the content of one, however many
            // reconnects later, means the broker never read the acknowledgement.
            acks.generation += 1;
        }
    }

    /// What the connection task waits on besides rumqttc's event loop (see the module).
    pub(crate) fn wake(&self) -> &Notify {
        &self.wake
    }

    /// The application is done with these messages (taken from those held): their
    /// acknowledgements go to the connection now, or when the [`Gate`] lets them. Never waits.
    pub(crate) fn acknowledge<'a>(
        &self,
        client: &AsyncClient,
        publishes: impl IntoIterator<Item = &'a Publish>,
    ) {
        let mut out = Vec::new();
        let mut held = self.held.lock();
        let room = self.tx.capacity();
        let now = Instant::now();
        let mut contents = Vec::new();
        for publish in publishes {
            if publish.qos != QoS::AtMostOnce {
                held.gate
                    .acked(publish.pkid, publish.qos, room, now, &mut out);
                contents.push((publish.pkid, content_hash(publish)));
            }
        }
        self.held_back
            .store(held.gate.held_back(), Ordering::Release);
        // Still under the lock of the held messages: a resend of one of them finds it either
        // held back or on its way.
        self.hand_over(client, &out, &contents);
    }

    /// The connection task, between polls and when woken: sends the held-back
    /// acknowledgements the buffer has room for now, and moves parked ones on.
    pub(crate) fn tend(&self, client: &AsyncClient) {
        if self.held_back.load(Ordering::Acquire) > 0 {
            let mut out = Vec::new();
            let mut held = self.held.lock();
            let now = Instant::now();
            held.gate.release(self.tx.capacity(), now, &mut out);
            self.held_back
                .store(held.gate.held_back(), Ordering::Release);
            self.hand_over(client, &out, &[]);
        }
        self.pump_acks(client);
    }

    /// When the connection task has to look at the gate again although nothing happened
    /// (see [`Gate::deadline`]).
    pub(crate) fn gate_deadline(&self) -> Option<Instant> {
        if self.held_back.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.held.lock().gate.deadline()
    }

    /// Sends every held-back acknowledgement, room or not (the consumer closes).
    pub(crate) fn release_held_back(&self, client: &AsyncClient) {
        let mut out = Vec::new();
        let mut held = self.held.lock();
        held.gate.release_all(&mut out);
        self.held_back.store(0, Ordering::Release);
        self.hand_over(client, &out, &[]);
    }

    /// Hands acknowledgements to the connection without waiting: into rumqttc's request queue,
    /// or when that is full (or acknowledgements are parked already, which keeps them in order)
    /// parked for the connection task, which is woken. `contents`: the content of messages
    /// acknowledged just now (see [`Acks::content`]).
    fn hand_over(&self, client: &AsyncClient, list: &[(u16, QoS)], contents: &[(u16, u64)]) {
        if list.is_empty() && contents.is_empty() {
            return;
        }
        let mut parked = false;
        {
            // Under the lock: the connection task takes it to recover what rumqttc dropped.
            let mut acks = self.acks.lock();
            acks.content.extend(contents.iter().copied());
            for &(pkid, qos) in list {
                acks.unwritten.insert(pkid, qos);
                if !acks.parked.is_empty() || client.try_ack(&ack_of(pkid, qos)).is_err() {
                    acks.parked.push_back((pkid, qos));
                    parked = true;
                }
            }
            if parked {
                self.parked_acks.store(true, Ordering::Release);
            }
        }
        if parked {
            self.wake.notify_one();
        }
    }

    /// The connection task's own acknowledgement (of a message dropped as a duplicate): parked,
    /// for [`pump_acks`](Self::pump_acks) to send on.
    pub(crate) fn park_ack(&self, request: &Request) {
        let (pkid, qos) = match request {
            Request::PubAck(PubAck { pkid, .. }) => (*pkid, QoS::AtLeastOnce),
            Request::PubRec(PubRec { pkid, .. }) => (*pkid, QoS::ExactlyOnce),
            _ => return,
        };
        let mut acks = self.acks.lock();
        acks.unwritten.insert(pkid, qos);
        acks.parked.push_back((pkid, qos));
        self.parked_acks.store(true, Ordering::Release);
    }

    /// rumqttc wrote the PUBACK / PUBREC of `pkid`.
    pub(crate) fn ack_written(&self, pkid: u16) {
        self.held.lock().gate.written(pkid);
        let mut acks = self.acks.lock();
        if let Some(qos) = acks.unwritten.remove(&pkid) {
            let generation = acks.generation;
            acks.written.insert(pkid, (generation, qos));
        }
    }

    /// The connection task: moves parked acknowledgements, in order, into rumqttc's request
    /// queue, as many as it has room for. What is left goes on the next time round; the loop
    /// comes round because the queue is full, that is not empty, and each request the event loop
    /// takes from it ends a poll.
    pub(crate) fn pump_acks(&self, client: &AsyncClient) {
        if !self.parked_acks.load(Ordering::Acquire) {
            return;
        }
        let mut acks = self.acks.lock();
        while let Some(&(pkid, qos)) = acks.parked.front() {
            if client.try_ack(&ack_of(pkid, qos)).is_err() {
                return;
            }
            acks.parked.pop_front();
        }
        self.parked_acks.store(false, Ordering::Release);
        if acks.parked.capacity() > SHRINK_TO * 4 {
            acks.parked.shrink_to(SHRINK_TO);
        }
    }

    /// After the connection broke (rumqttc has cleaned up): drops the network for good, takes
    /// what is still in rumqttc's request queue, and queues again, for the resumed session, every
    /// acknowledgement rumqttc dropped before writing it: those the [`Gate`] handed over go back
    /// to it (it sends them again as the buffer has room), the others are parked. Nothing is
    /// queued twice: the locks keep the application from handing over acknowledgements
    /// meanwhile.
    pub(crate) fn recover_acks(&self, eventloop: &mut EventLoop) {
        let mut held = self.held.lock();
        let mut acks = self.acks.lock();
        eventloop.clean();
        let mut out = Vec::new();
        let back: HashSet<u16> = held
            .gate
            .take_back(Instant::now(), &mut out)
            .into_iter()
            .collect();
        self.held_back
            .store(held.gate.held_back(), Ordering::Release);
        if !back.is_empty() {
            acks.unwritten.retain(|pkid, _| !back.contains(pkid));
            acks.parked.retain(|(pkid, _)| !back.contains(pkid));
            eventloop.pending.retain(|r| match r {
                Request::PubAck(PubAck { pkid, .. }) | Request::PubRec(PubRec { pkid, .. }) => {
                    !back.contains(pkid)
                }
                _ => true,
            });
        }
        let queued: HashSet<u16> = eventloop
            .pending
            .iter()
            .filter_map(|r| match r {
                Request::PubAck(a) => Some(a.pkid),
                Request::PubRec(r) => Some(r.pkid),
                _ => None,
            })
            .chain(acks.parked.iter().map(|&(pkid, _)| pkid))
            .collect();
        let lost: Vec<(u16, QoS)> = acks
            .unwritten
            .iter()
            .filter(|(pkid, _)| !queued.contains(pkid))
            .map(|(&pkid, &qos)| (pkid, qos))
            .collect();
        if !lost.is_empty() {
            tracing::debug!(
                count = lost.len(),
                "acknowledgements the connection dropped queued again"
            );
            // They were handed over before those still parked.
            for ack in lost.into_iter().rev() {
                acks.parked.push_front(ack);
            }
        }
        // Those the gate lets go at once (they release nothing), after the others.
        for &(pkid, qos) in &out {
            acks.unwritten.insert(pkid, qos);
            acks.parked.push_back((pkid, qos));
        }
        if !acks.parked.is_empty() {
            self.parked_acks.store(true, Ordering::Release);
        }
    }

    /// The connection task: true (once per episode) when messages were refused because the
    /// buffer was full and the buffer has room again: time to resume the session so that the
    /// broker sends them again.
    pub(crate) fn resume_due(&self) -> bool {
        if self.resume_wanted.load(Ordering::Acquire) == 0 || !self.half_empty() {
            return false;
        }
        let mut held = self.held.lock();
        if held.refused_since_connack == 0 || held.resume_requested || !self.half_empty() {
            return false;
        }
        held.resume_requested = true;
        self.resume_wanted.store(0, Ordering::Release);
        true
    }

    /// The resume could not be asked for now (rumqttc's request queue is full, so the
    /// connection task comes round again soon and asks again).
    pub(crate) fn resume_failed(&self) {
        let mut held = self.held.lock();
        held.resume_requested = false;
        self.resume_wanted
            .store(held.refused_since_connack, Ordering::Release);
    }

    fn half_empty(&self) -> bool {
        self.buffered() <= self.tx.max_capacity() / 2
    }

    /// The receivers took messages out of the buffer: the connection task is woken to send
    /// acknowledgements the gate held back for want of room, and, once the buffer is half empty
    /// and messages were refused, to resume the session (a receiver never does it itself: the
    /// link may be idle, and the request queue full).
    pub(crate) fn taken(&self) {
        if self.held_back.load(Ordering::Acquire) != 0
            || (self.resume_wanted.load(Ordering::Acquire) != 0 && self.half_empty())
        {
            self.wake.notify_one();
        }
    }

    /// Messages refused since the last CONNACK (for the log of a resume).
    pub(crate) fn refused_pending(&self) -> usize {
        self.held.lock().refused_since_connack
    }

    /// Turns an incoming PUBLISH into a message for the application. Returns an acknowledgement
    /// to send at once for a message that is dropped as a duplicate.
    pub(crate) fn deliver(&self, publish: Publish) -> Option<Request> {
        let via_redeliver = publish.topic.as_ref() == self.redeliver_topic.as_bytes();
        if !via_redeliver && publish.topic.as_ref() != self.mqtt_topic.as_bytes() {
            tracing::debug!(topic = %String::from_utf8_lossy(&publish.topic), "message on an unexpected topic ignored");
            return ack_request(&publish);
        }
        // A repeated name: the last value wins and a warning names it (the rule of every
        // backend); that holds for the key and the redelivery count too.
        let (mut properties, repeated) = match &publish.properties {
            Some(p) => properties_from_pairs(
                p.user_properties
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            ),
            None => Default::default(),
        };
        warn_repeated(&self.topic_name, &repeated);
        let mut count = properties
            .remove(REDELIVERY_PROPERTY)
            .map_or(0, |v| v.parse().unwrap_or(1));
        let key = properties.remove(KEY_PROPERTY);
        let qos = publish.qos;
        if qos != QoS::AtMostOnce {
            let mut acks = self.acks.lock();
            let pkid = publish.pkid;
            if publish.dup {
                let hash = content_hash(&publish);
                let acknowledged = acks.content.get(&pkid) == Some(&hash);
                if acknowledged && acks.unwritten.contains_key(&pkid) {
                    // Sent again after a reconnect; its acknowledgement is on its way.
                    return None;
                }
                if let Some((generation, _)) = acks.written.get(&pkid).copied() {
                    if acknowledged && generation == acks.generation {
                        // Crossed the acknowledgement written on this connection.
                        return None;
                    }
                    acks.written.remove(&pkid);
                    if acknowledged {
                        // The acknowledgement went out on a connection that died before the
                        // broker read it: acknowledge again.
                        return ack_request(&publish);
                    }
                }
                if acks.content.get(&pkid).is_some_and(|h| *h != hash) {
                    // Not the message acknowledged under the id: the broker read that
                    // acknowledgement and gave the id to another message, sent again now after
                    // a reconnect. Delivered.
                    tracing::debug!(
                        pkid,
                        "a resend under an acknowledged packet id is another message"
                    );
                    if !acks.unwritten.contains_key(&pkid) {
                        acks.content.remove(&pkid);
                    }
                }
            } else {
                acks.written.remove(&pkid);
                if !acks.unwritten.contains_key(&pkid) {
                    acks.content.remove(&pkid);
                }
            }
        }
        // Never waits for the application: the connection task has to keep polling (acks,
        // pings, disconnects), and the application's acknowledgements go through it.
        let mut held = self.held.lock();
        {
            if qos != QoS::AtMostOnce && publish.dup && held.gate.is_held_back(publish.pkid) {
                // Acknowledged by the application; the gate sends the acknowledgement.
                return None;
            }
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
                    held.gate
                        .arrived(publish.pkid, qos, !publish.dup, Instant::now());
                    if !held.resume_requested {
                        self.resume_wanted
                            .store(held.refused_since_connack, Ordering::Release);
                    }
                    let n = self.refused_total.fetch_add(1, Ordering::Relaxed);
                    if n == 0 {
                        tracing::warn!(
                            topic = %self.mqtt_topic,
                            buffer = self.tx.max_capacity(),
                            "the MQTT broker sends more unacknowledged messages than the \
                             consumer's Receive Maximum allows (Mosquitto 2.0.11 does); those \
                             that do not fit the buffer are left with the broker and fetched \
                             again by resuming the session"
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
                held.gate
                    .arrived(publish.pkid, qos, !publish.dup, Instant::now());
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

/// The content of a message, for telling a resend from another message under the same packet
/// id: its topic, payload and user properties.
fn content_hash(publish: &Publish) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    publish.topic.hash(&mut hasher);
    publish.payload.hash(&mut hasher);
    if let Some(p) = &publish.properties {
        p.user_properties.hash(&mut hasher);
    }
    hasher.finish()
}

/// What rumqttc's `try_ack` needs of a message to acknowledge it: its packet id and QoS.
fn ack_of(pkid: u16, qos: QoS) -> Publish {
    Publish {
        qos,
        pkid,
        ..Publish::default()
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
        session_with(buffer, 100)
    }

    fn session_with(buffer: usize, receive_maximum: u16) -> (Session, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(buffer);
        let session = Session::new(
            1,
            &Topic::new(Qos::Q1, "t", "n", "q").unwrap(),
            "t/n/q".into(),
            "tg-redeliver/s/t/n/q".into(),
            0,
            receive_maximum,
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

    #[test]
    fn resends_crossing_an_acknowledgement_are_not_delivered_again() {
        let (client, _eventloop) =
            AsyncClient::new(rumqttc::v5::MqttOptions::new("t", "127.0.0.1", 1), 10);
        let (session, mut rx) = session(10);
        assert!(session.deliver(incoming(7, false, "x")).is_none());
        let m = rx.try_recv().unwrap();
        let held = session.take(m.ack_handle().seq()).unwrap();
        session.acknowledge(&client, [&held.publish]);
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

    fn client() -> AsyncClient {
        AsyncClient::new(rumqttc::v5::MqttOptions::new("t", "127.0.0.1", 1), 10).0
    }

    /// A resend under the packet id of an acknowledgement that has other content is a message the
    /// broker sent under the id after reading the acknowledgement (and the connection closed
    /// before it was read): delivered, not taken for the acknowledged one.
    #[test]
    fn a_resend_under_an_acknowledged_id_with_other_content_is_another_message() {
        let client = client();
        let (session, mut rx) = session(10);
        assert!(session.deliver(incoming(7, false, "x")).is_none());
        let m = rx.try_recv().unwrap();
        let held = session.take(m.ack_handle().seq()).unwrap();
        session.acknowledge(&client, [&held.publish]);
        session.ack_written(7);
        session.session_resumed(true);
        assert!(session.deliver(incoming(7, true, "y")).is_none());
        assert_eq!(rx.try_recv().unwrap().payload().as_ref(), b"y");
    }

    /// An acknowledgement written on a connection that dropped (a broker restart) may not have
    /// reached the broker, also when more reconnects (session resumes) follow before the broker
    /// sends the message again: the resend is acknowledged again, not delivered.
    #[test]
    fn an_acknowledgement_the_broker_may_have_missed_is_repeated_reconnects_later() {
        let client = client();
        let (session, mut rx) = session(10);
        assert!(session.deliver(incoming(7, false, "x")).is_none());
        let m = rx.try_recv().unwrap();
        let held = session.take(m.ack_handle().seq()).unwrap();
        session.acknowledge(&client, [&held.publish]);
        session.ack_written(7);
        session.session_resumed(true);
        session.session_resumed(true);
        match session.deliver(incoming(7, true, "x")) {
            Some(Request::PubAck(a)) => assert_eq!(a.pkid, 7),
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err());
    }

    /// A broker beyond Receive Maximum: the acknowledgement of the oldest message waits until
    /// the buffer has room for what it releases, and a resend of that message meanwhile is not
    /// a new delivery.
    #[test]
    fn a_held_back_acknowledgement_waits_for_room_and_its_resend_is_not_delivered() {
        let client = client();
        // Receive Maximum 2, a buffer of 4, and the broker sends 4.
        let (session, mut rx) = session_with(4, 2);
        for (pkid, text) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            assert!(session.deliver(incoming(pkid, false, text)).is_none());
        }
        let a = rx.try_recv().unwrap();
        let held = session.take(a.ack_handle().seq()).unwrap();
        // Room for 1; acknowledging message 1 (index 0) may release 2.
        session.acknowledge(&client, [&held.publish]);
        assert_eq!(session.held_back.load(Ordering::Acquire), 1);
        assert!(session.deliver(incoming(1, true, "a")).is_none());
        assert!(rx.try_recv().unwrap().payload().as_ref() == b"b");
        assert!(rx.try_recv().unwrap().payload().as_ref() == b"c");
        // Room for 3 now: the connection task sends it.
        session.tend(&client);
        assert_eq!(session.held_back.load(Ordering::Acquire), 0);
        assert_eq!(rx.try_recv().unwrap().payload().as_ref(), b"d");
        assert!(rx.try_recv().is_err(), "the resend of 1 was not delivered");
    }
}
