//! q2 de-duplication on the consumer side: RabbitMQ has no broker-side de-duplication, so a q2
//! consumer remembers the `tg-dedup-id`s it handed out and drops (acknowledging it) a later copy.
//!
//! An id is `Pending` from the moment a message carrying it is handed out until it is acknowledged
//! (`Done`) or negatively acknowledged (forgotten, so the redelivery comes through). A copy whose
//! id is `Done` is a duplicate. So is a first delivery (not flagged `redelivered`) whose id is
//! `Pending`: the original is still unacknowledged at the broker, which redelivers it if it is
//! lost. A redelivery of a `Pending` id comes through: it may be the same message back after its
//! channel closed.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Done,
}

/// The ids one consumer remembers, at most `capacity` and none longer than `window`.
#[derive(Debug)]
pub(crate) struct Dedup {
    window: Duration,
    capacity: usize,
    ids: HashMap<String, (State, Instant)>,
    /// Ids in the order they were first seen, for forgetting the oldest first.
    order: VecDeque<(String, Instant)>,
}

impl Dedup {
    pub(crate) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity,
            ids: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((id, at)) = self.order.front() {
            let old = now.duration_since(*at) > self.window || self.order.len() > self.capacity;
            if !old {
                break;
            }
            if self.ids.get(id).is_some_and(|(_, seen)| seen == at) {
                self.ids.remove(id);
            }
            self.order.pop_front();
        }
    }

    /// Whether a message with `id` (flagged `redelivered` by the broker) is a duplicate to drop;
    /// if not, the id is now pending.
    pub(crate) fn is_duplicate(&mut self, id: &str, redelivered: bool) -> bool {
        if self.capacity == 0 || self.window.is_zero() {
            return false;
        }
        let now = Instant::now();
        self.expire(now);
        match self.ids.get(id).map(|(s, _)| *s) {
            Some(State::Done) => true,
            Some(State::Pending) if !redelivered => true,
            Some(State::Pending) => false,
            None => {
                self.ids.insert(id.to_owned(), (State::Pending, now));
                self.order.push_back((id.to_owned(), now));
                self.expire(now);
                false
            }
        }
    }

    /// The message with `id` was acknowledged: later copies are duplicates.
    pub(crate) fn done(&mut self, id: &str) {
        if let Some((state, _)) = self.ids.get_mut(id) {
            *state = State::Done;
        }
    }

    /// The message with `id` goes back to the broker: its redelivery must come through.
    pub(crate) fn forget(&mut self, id: &str) {
        self.ids.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_dropped_redeliveries_pass() {
        let mut d = Dedup::new(Duration::from_secs(60), 10);
        assert!(!d.is_duplicate("a", false));
        assert!(
            d.is_duplicate("a", false),
            "a copy while the first is pending"
        );
        assert!(
            !d.is_duplicate("a", true),
            "the same message back after its channel closed"
        );
        d.done("a");
        assert!(
            d.is_duplicate("a", true),
            "acknowledged: every later copy is a duplicate"
        );
        assert!(!d.is_duplicate("b", false));
        d.forget("b");
        assert!(
            !d.is_duplicate("b", false),
            "nacked: the redelivery comes through"
        );
    }

    #[test]
    fn capacity_forgets_the_oldest() {
        let mut d = Dedup::new(Duration::from_secs(60), 2);
        for id in ["a", "b", "c"] {
            assert!(!d.is_duplicate(id, false));
            d.done(id);
        }
        assert!(!d.is_duplicate("a", false), "a was forgotten");
        assert!(d.is_duplicate("c", false));
        assert!(!Dedup::new(Duration::ZERO, 10).is_duplicate("x", false));
    }

    #[tokio::test(start_paused = true)]
    async fn window_expires() {
        let mut d = Dedup::new(Duration::from_secs(1), 10);
        assert!(!d.is_duplicate("a", false));
        d.done("a");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!d.is_duplicate("a", false));
    }
}
