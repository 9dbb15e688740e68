//! q2 de-duplication on the consumer side. The idempotent producer keeps a producer's retries
//! from writing a message twice, but a message sent twice by the application (say, after a
//! timeout it could not tell from a loss) is two records. A q2 consumer remembers the
//! `tg-dedup-id`s it handed out with the partition and offset they came at, and passes over a
//! record whose id it saw at another place. The same record again (a redelivery after a nack or
//! a rebalance) is not a duplicate.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// The ids one consumer remembers: at most `capacity`, none longer than `window`.
#[derive(Debug)]
pub(crate) struct Dedup {
    window: Duration,
    capacity: usize,
    /// id → where it was first seen (partition, offset) and when.
    ids: HashMap<String, ((i32, i64), Instant)>,
    /// Ids in the order they were first seen, for forgetting the oldest first.
    order: VecDeque<(String, Instant)>,
}

impl Dedup {
    /// None when de-duplication is off (`capacity` or `window` zero).
    pub(crate) fn new(window: Duration, capacity: usize) -> Option<Self> {
        (capacity > 0 && !window.is_zero()).then(|| Self {
            window,
            capacity,
            ids: HashMap::new(),
            order: VecDeque::new(),
        })
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

    /// Whether the record at `place` carrying `id` is a copy of one seen elsewhere; if it is new,
    /// it is remembered.
    pub(crate) fn is_duplicate(&mut self, id: &str, place: (i32, i64)) -> bool {
        let now = Instant::now();
        self.expire(now);
        match self.ids.get(id) {
            Some((seen, _)) => *seen != place,
            None => {
                self.ids.insert(id.to_owned(), (place, now));
                self.order.push_back((id.to_owned(), now));
                self.expire(now);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_dropped_redeliveries_pass() {
        let mut d = Dedup::new(Duration::from_secs(60), 10).unwrap();
        assert!(!d.is_duplicate("a", (0, 1)));
        assert!(!d.is_duplicate("a", (0, 1)), "the same record again");
        assert!(d.is_duplicate("a", (0, 2)), "a copy");
        assert!(d.is_duplicate("a", (1, 1)), "a copy in another partition");
        assert!(!d.is_duplicate("b", (0, 3)));
    }

    #[test]
    fn capacity_forgets_the_oldest() {
        let mut d = Dedup::new(Duration::from_secs(60), 2).unwrap();
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            assert!(!d.is_duplicate(id, (0, i as i64)));
        }
        assert!(!d.is_duplicate("a", (0, 9)), "a was forgotten");
        assert!(d.is_duplicate("c", (0, 9)));
        assert!(Dedup::new(Duration::ZERO, 10).is_none());
        assert!(Dedup::new(Duration::from_secs(1), 0).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn window_expires() {
        let mut d = Dedup::new(Duration::from_secs(1), 10).unwrap();
        assert!(!d.is_duplicate("a", (0, 0)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!d.is_duplicate("a", (0, 5)));
    }
}
