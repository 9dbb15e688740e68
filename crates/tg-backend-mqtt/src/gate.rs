//! When a consumer's acknowledgements go to a broker that sends more than Receive Maximum.
//!
//! Mosquitto 2.0.11, on each PUBACK, moves up to Receive Maximum (R) queued messages into
//! flight, less the number of in-flight messages *before* the acknowledged one
//! (`db__message_delete_outgoing` stops counting at the match). Acknowledging the oldest message
//! in flight, which is what a consumer working in order does, therefore releases R further
//! messages, however many are in flight already: a consumer with a backlog gets all of it. With
//! the backlog larger than the consumer's buffer, what does not fit has to be refused and fetched
//! again by resuming the session, which makes the broker send its whole in-flight list again;
//! and once more than 65,535 messages are in flight its packet ids repeat, a PUBACK then takes
//! the oldest message with that id off the broker's list, and refused messages are lost to the
//! consumer.
//!
//! The gate keeps that from happening by choosing when each acknowledgement goes out. It keeps
//! the broker's in-flight list as this consumer knows it (every QoS 1/2 message received whose
//! acknowledgement has not been handed to rumqttc, in the order the broker sent them, which is
//! the order of its list). An acknowledgement handed over now is written after those handed over
//! before it, so when the broker reads it, the messages before it in its list are those of this
//! list. An acknowledgement of a message at index `i < R` of that list releases up to `R − i`
//! messages: it goes out when that many fit in the buffer's free room (less what
//! acknowledgements already sent may still bring), and is held back until the receivers make
//! room otherwise. One at `i ≥ R` releases one message (the broker fills the place it frees, as
//! one that keeps to Receive Maximum does) and goes out at once: the receivers made room for it
//! when they took the message. So the broker never sends more than the buffer takes, and the
//! list stays within buffer + messages the application holds + R.
//!
//! Acknowledgements handed over are remembered until rumqttc reports them written; when the
//! connection drops first, they go back into the list at their places (the resumed session's
//! broker still has those messages in flight) and out again through the gate.
//!
//! A broker that keeps to Receive Maximum never has more than R messages in flight, so the gate
//! stays open (every acknowledgement goes out at once) until the list grows beyond R: the sign
//! of a broker that does not. What an acknowledgement sent may still bring is expected for
//! [`EXPECTED_FOR`], and forgotten after: the broker had fewer queued than it might have
//! released, or counted more messages before it than this consumer knows of (in flight towards
//! it).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use tokio::time::Instant;

/// How long the messages an acknowledgement may release are expected after it went out. Longer
/// than the broker takes to answer a PUBACK with the messages it releases; on a link slower than
/// that the buffer may overflow, and the consumer falls back to refusing and resuming the
/// session.
pub(crate) const EXPECTED_FOR: Duration = Duration::from_millis(100);

struct Slot {
    pkid: u16,
    qos: QoS,
    /// The application acknowledged it; the acknowledgement is held back.
    acked: bool,
}

/// See the module.
pub(crate) struct Gate {
    /// Receive Maximum.
    window: usize,
    /// The broker's in-flight list as far as this consumer knows it, by arrival.
    list: BTreeMap<u64, Slot>,
    /// Acknowledgements handed over and not yet written: packet id → place in the list, QoS.
    sent: HashMap<u16, (u64, QoS)>,
    /// Packet id → place, for the list and `sent`.
    by_pkid: HashMap<u16, u64>,
    next: u64,
    /// The broker was seen to exceed Receive Maximum: acknowledgements are metered.
    flood: bool,
    /// Acknowledgements held back.
    held_back: usize,
    /// Messages the acknowledgements sent within [`EXPECTED_FOR`] may still bring, by when they
    /// were sent (oldest first; those of one millisecond together), and their sum.
    reserved: VecDeque<(Instant, usize)>,
    expected: usize,
}

impl Gate {
    pub(crate) fn new(window: u16) -> Self {
        Self {
            window: usize::from(window.max(1)),
            list: BTreeMap::new(),
            sent: HashMap::new(),
            by_pkid: HashMap::new(),
            next: 0,
            flood: false,
            held_back: 0,
            reserved: VecDeque::new(),
            expected: 0,
        }
    }

    /// A QoS 1/2 message arrived, delivered or refused. `fresh`: sent for the first time (no
    /// DUP flag); a resend keeps its place in the list.
    pub(crate) fn arrived(&mut self, pkid: u16, qos: QoS, fresh: bool, now: Instant) {
        if fresh {
            // The broker reused a packet id that is still in the list: the older message is
            // gone from the broker's point of view (its PUBACK would now take the new one).
            self.forget(pkid);
            self.prune(now);
            if let Some(front) = self.reserved.front_mut() {
                front.1 -= 1;
                self.expected -= 1;
                if front.1 == 0 {
                    self.reserved.pop_front();
                }
            }
        }
        if !self.by_pkid.contains_key(&pkid) {
            self.next += 1;
            self.list.insert(
                self.next,
                Slot {
                    pkid,
                    qos,
                    acked: false,
                },
            );
            self.by_pkid.insert(pkid, self.next);
        }
        if self.list.len() > self.window && !self.flood {
            self.flood = true;
            tracing::debug!(
                in_flight = self.list.len(),
                receive_maximum = self.window,
                "the MQTT broker exceeds Receive Maximum: acknowledgements are metered to the \
                 consumer's buffer"
            );
        }
    }

    /// Whether the application acknowledged `pkid` and the acknowledgement is held back (a
    /// resend of it is not a new delivery).
    pub(crate) fn is_held_back(&self, pkid: u16) -> bool {
        self.by_pkid
            .get(&pkid)
            .and_then(|k| self.list.get(k))
            .is_some_and(|s| s.acked)
    }

    /// The application acknowledged `pkid`: adds to `out` the acknowledgements to send now,
    /// given `room` free places in the buffer.
    pub(crate) fn acked(
        &mut self,
        pkid: u16,
        qos: QoS,
        room: usize,
        now: Instant,
        out: &mut Vec<(u16, QoS)>,
    ) {
        let Some(&key) = self.by_pkid.get(&pkid) else {
            out.push((pkid, qos));
            return;
        };
        if self.list.get(&key).is_none_or(|s| s.acked) {
            return;
        }
        if !self.flood {
            self.send(key, out);
            return;
        }
        if self.list.range(..key).nth(self.window - 1).is_some() {
            // At index R or beyond: releases one message.
            self.send(key, out);
            self.reserve(now, 1);
            return;
        }
        if let Some(slot) = self.list.get_mut(&key) {
            slot.acked = true;
            self.held_back += 1;
        }
        self.release(room, now, out);
    }

    /// Adds to `out` the held-back acknowledgements, oldest first, as long as what they release
    /// fits in `room` free places of the buffer (less what is expected already).
    ///
    /// Oldest first even where a younger one would release less: one held back for good stays
    /// in the broker's list while the list moves on, and once the list spans 65,535 messages the
    /// broker's packet ids repeat within it (see the module).
    pub(crate) fn release(&mut self, room: usize, now: Instant, out: &mut Vec<(u16, QoS)>) {
        if self.held_back == 0 {
            return;
        }
        self.prune(now);
        let mut credit = room.saturating_sub(self.expected);
        let mut sent = Vec::new();
        let mut releasing = 0;
        let mut index = 0;
        for (&key, slot) in &self.list {
            if index >= self.window {
                break;
            }
            if !slot.acked {
                index += 1;
                continue;
            }
            let releases = self.window - index;
            if releases > credit {
                break;
            }
            credit -= releases;
            releasing += releases;
            sent.push(key);
        }
        if !sent.is_empty() {
            self.reserve(now, releasing);
            self.held_back -= sent.len();
            for key in sent {
                self.send(key, out);
            }
        }
    }

    /// rumqttc wrote the acknowledgement of `pkid`.
    pub(crate) fn written(&mut self, pkid: u16) {
        if let Some((key, _)) = self.sent.remove(&pkid) {
            if self.by_pkid.get(&pkid) == Some(&key) {
                self.by_pkid.remove(&pkid);
            }
        }
        self.shrink();
    }

    /// The connection dropped: the acknowledgements handed over and not written go back into
    /// the list, held back at their places; returns their packet ids (the caller drops them from
    /// what it would send again on its own). Those at index R or beyond, which release one message
    /// each, are added to `out` at once.
    pub(crate) fn take_back(&mut self, now: Instant, out: &mut Vec<(u16, QoS)>) -> Vec<u16> {
        let back: Vec<u16> = self.sent.keys().copied().collect();
        for (pkid, (key, qos)) in self.sent.drain() {
            self.list.insert(
                key,
                Slot {
                    pkid,
                    qos,
                    acked: true,
                },
            );
            self.held_back += 1;
        }
        let beyond: Vec<u64> = self
            .list
            .iter()
            .skip(self.window)
            .filter(|(_, s)| s.acked)
            .map(|(&k, _)| k)
            .collect();
        self.held_back -= beyond.len();
        self.reserve(now, beyond.len());
        for key in beyond {
            self.send(key, out);
        }
        back
    }

    /// Adds every held-back acknowledgement to `out` (the consumer closes).
    pub(crate) fn release_all(&mut self, out: &mut Vec<(u16, QoS)>) {
        let keys: Vec<u64> = self
            .list
            .iter()
            .filter(|(_, s)| s.acked)
            .map(|(&k, _)| k)
            .collect();
        for key in keys {
            self.send(key, out);
        }
        self.held_back = 0;
    }

    /// Held-back acknowledgements.
    pub(crate) fn held_back(&self) -> usize {
        self.held_back
    }

    /// When what the acknowledgements sent may still bring is no longer expected, if they
    /// matter (acknowledgements are held back).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        if self.held_back == 0 {
            return None;
        }
        self.reserved.front().map(|&(at, _)| at + EXPECTED_FOR)
    }

    /// Forgets what acknowledgements sent [`EXPECTED_FOR`] ago or earlier may still bring.
    pub(crate) fn prune(&mut self, now: Instant) {
        while let Some(&(at, n)) = self.reserved.front() {
            if at + EXPECTED_FOR > now {
                break;
            }
            self.expected -= n;
            self.reserved.pop_front();
        }
    }

    fn reserve(&mut self, now: Instant, n: usize) {
        if n == 0 {
            return;
        }
        self.expected += n;
        match self.reserved.back_mut() {
            Some(back) if now.saturating_duration_since(back.0) < Duration::from_millis(1) => {
                back.1 += n;
            }
            _ => self.reserved.push_back((now, n)),
        }
    }

    /// The broker lost the session: nothing it had in flight is left.
    pub(crate) fn clear(&mut self) {
        // A new session, maybe with a broker that keeps to Receive Maximum: found out again.
        self.flood = false;
        self.list = BTreeMap::new();
        self.sent = HashMap::new();
        self.by_pkid = HashMap::new();
        self.held_back = 0;
        self.reserved = VecDeque::new();
        self.expected = 0;
    }

    /// Messages in the list.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    fn forget(&mut self, pkid: u16) {
        if let Some(key) = self.by_pkid.remove(&pkid) {
            if let Some(slot) = self.list.remove(&key) {
                // Its acknowledgement was not written: the broker still had it in flight and
                // gave its packet id to another message, which only a list of 65,535 and more
                // allows. Its acknowledgement would now take the other one off the broker's list.
                tracing::debug!(
                    pkid,
                    acknowledged = slot.acked,
                    "packet id reused by the broker for a message while another was in flight"
                );
                if slot.acked {
                    self.held_back -= 1;
                }
            }
            self.sent.remove(&pkid);
        }
    }

    /// Hands the acknowledgement at `key` over: out of the list, into `sent` and `out`.
    fn send(&mut self, key: u64, out: &mut Vec<(u16, QoS)>) {
        if let Some(slot) = self.list.remove(&key) {
            self.sent.insert(slot.pkid, (key, slot.qos));
            out.push((slot.pkid, slot.qos));
        }
    }

    /// A burst (a backlog) may have grown the maps far beyond what they hold now.
    fn shrink(&mut self) {
        if self.by_pkid.capacity() > 4 * 1024 && self.by_pkid.len() * 8 < self.by_pkid.capacity() {
            self.by_pkid.shrink_to(self.by_pkid.len() * 2);
            self.sent.shrink_to(self.sent.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q1: QoS = QoS::AtLeastOnce;

    fn gate_with(window: u16, n: u16) -> Gate {
        let mut gate = Gate::new(window);
        let now = Instant::now();
        for pkid in 1..=n {
            gate.arrived(pkid, Q1, true, now);
        }
        gate
    }

    #[test]
    fn a_broker_within_receive_maximum_never_meets_the_gate() {
        let mut gate = gate_with(4, 4);
        let mut out = Vec::new();
        for pkid in 1..=4 {
            gate.acked(pkid, Q1, 0, Instant::now(), &mut out);
        }
        assert_eq!(
            out.len(),
            4,
            "no room needed: the broker keeps to Receive Maximum"
        );
        assert_eq!(gate.len(), 0);
    }

    #[test]
    fn a_flooding_broker_gets_acknowledgements_as_the_buffer_has_room() {
        // Receive Maximum 4; the broker sent 10: beyond it.
        let mut gate = gate_with(4, 10);
        let now = Instant::now();
        let mut out = Vec::new();
        // The oldest at index 0 would release 4: no room, held back.
        gate.acked(1, Q1, 0, now, &mut out);
        assert!(out.is_empty());
        assert!(gate.is_held_back(1));
        // Index 4 and beyond release one: out at once, room or not.
        gate.acked(6, Q1, 0, now, &mut out);
        assert_eq!(out, [(6, Q1)]);
        out.clear();
        // Message 2 would release 3 (index 1, behind the held-back 1), and there is room for 3
        // (4, one of it expected by the acknowledgement of 6); but the oldest goes first.
        gate.acked(2, Q1, 4, now, &mut out);
        assert!(out.is_empty());
        // Room for 5: message 1 (4) goes, message 2 (now at index 0: 4) waits.
        gate.release(5, now, &mut out);
        assert_eq!(out, [(1, Q1)]);
        out.clear();
        // What 6 and 1 released came: room for message 2 now.
        for pkid in 11..=15 {
            gate.arrived(pkid, Q1, true, now);
        }
        gate.release(4, now, &mut out);
        assert_eq!(out, [(2, Q1)]);
        assert_eq!(gate.held_back(), 0);
    }

    #[test]
    fn what_acknowledgements_may_release_is_expected_for_a_while() {
        let mut gate = gate_with(2, 6);
        let now = Instant::now();
        let mut out = Vec::new();
        gate.acked(1, Q1, 2, now, &mut out);
        assert_eq!(out, [(1, Q1)]);
        gate.acked(2, Q1, 2, now, &mut out);
        assert_eq!(out.len(), 1, "2 expected already: message 2 waits");
        assert_eq!(gate.deadline(), Some(now + EXPECTED_FOR));
        gate.release(2, now + EXPECTED_FOR / 2, &mut out);
        assert_eq!(out.len(), 1, "still expected");
        gate.release(2, now + EXPECTED_FOR, &mut out);
        assert_eq!(out, [(1, Q1), (2, Q1)]);
    }

    #[test]
    fn resends_keep_their_place_and_reused_ids_start_over() {
        let mut gate = gate_with(2, 4);
        let now = Instant::now();
        let mut out = Vec::new();
        gate.acked(1, Q1, 0, now, &mut out);
        assert!(gate.is_held_back(1));
        gate.arrived(1, Q1, false, now);
        assert!(gate.is_held_back(1), "a resend is the same message");
        assert_eq!(gate.len(), 4);
        gate.arrived(1, Q1, true, now);
        assert!(!gate.is_held_back(1), "a new message under the id");
        assert_eq!(gate.held_back(), 0);
        assert_eq!(gate.len(), 4);
        gate.acked(3, Q1, 0, now, &mut out);
        gate.release_all(&mut out);
        assert_eq!(out, [(3, Q1)]);
    }

    #[test]
    fn acknowledgements_not_written_when_the_connection_drops_go_back_to_their_places() {
        let mut gate = gate_with(2, 6);
        let now = Instant::now();
        let mut out = Vec::new();
        // Message 5 (index 4) goes out at once; 1 with room for what both release (1 + 2).
        gate.acked(5, Q1, 0, now, &mut out);
        gate.acked(1, Q1, 3, now, &mut out);
        assert_eq!(out, [(5, Q1), (1, Q1)]);
        gate.written(5);
        out.clear();
        // Dropped before 1 was written: back at the head, held back; index 0 releases 2.
        let back = gate.take_back(now, &mut out);
        assert_eq!(back, [1]);
        assert!(out.is_empty());
        assert!(gate.is_held_back(1));
        assert_eq!(gate.len(), 5);
        // Message 6 (index 4: out at once).
        gate.acked(6, Q1, 0, now, &mut out);
        assert_eq!(out, [(6, Q1)]);
        out.clear();
        // Back: 6 is beyond index R, out at once again; 1 stays held back.
        let mut back = gate.take_back(now, &mut out);
        back.sort_unstable();
        assert_eq!(back, [6]);
        assert_eq!(out, [(6, Q1)]);
        assert_eq!(gate.held_back(), 1);
    }
}
