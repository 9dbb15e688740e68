//! A bounded, time-limited set of message ids already handled.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Remembers message ids for `ttl`, at most `capacity` of them (the oldest are forgotten first),
/// so a consumer can drop messages it already handled — typically redeliveries after a
/// reconnection (spec 003 FR-007). Memory is bounded by `capacity`.
///
/// ```
/// use std::time::Duration;
/// use tg_runtime::Deduplicator;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let seen = Deduplicator::new(1000, Duration::from_secs(600));
/// assert!(seen.first_time("a"));
/// assert!(!seen.first_time("a"));
/// seen.forget("a");
/// assert!(seen.first_time("a"));
/// # }
/// ```
pub struct Deduplicator {
    capacity: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl Deduplicator {
    /// At most `capacity` ids (at least 1), each kept `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Records `id`; `true` if it was not already there (the message should be handled).
    pub fn first_time(&self, id: &str) -> bool {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.expire(now, self.ttl, self.capacity);
        if let Some(at) = inner.seen.get(id) {
            if now.duration_since(*at) < self.ttl {
                return false;
            }
        }
        inner.seen.insert(id.to_owned(), now);
        inner.order.push_back((now, id.to_owned()));
        true
    }

    /// Forgets `id` (after a failure, so the redelivery is handled).
    pub fn forget(&self, id: &str) {
        self.inner.lock().seen.remove(id);
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().seen.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn expire(&mut self, now: Instant, ttl: Duration, capacity: usize) {
        while let Some((at, _)) = self.order.front() {
            let expired = now.duration_since(*at) >= ttl;
            if !expired && self.order.len() < capacity {
                break;
            }
            if let Some((at, id)) = self.order.pop_front() {
                // Only remove the entry this order slot inserted (it may have been re-inserted).
                if self.seen.get(&id) == Some(&at) {
                    self.seen.remove(&id);
                }
            }
        }
    }
}

impl fmt::Debug for Deduplicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deduplicator")
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_after_ttl() {
        let d = Deduplicator::new(10, Duration::from_secs(5));
        assert!(d.first_time("x"));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!d.first_time("x"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(d.first_time("x"));
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_by_capacity() {
        let d = Deduplicator::new(3, Duration::from_secs(60));
        for i in 0..10 {
            assert!(d.first_time(&i.to_string()));
        }
        assert!(d.len() <= 3, "{}", d.len());
        assert!(d.first_time("0"), "the oldest ids are forgotten first");
        assert!(!d.first_time("9"));
    }
}
