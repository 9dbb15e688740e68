//! The commit rule: per partition, the group's committed offset only ever moves to the lowest
//! offset that was handed out and not acknowledged yet, or past everything handed out when all of
//! it was acknowledged. Handlers that run concurrently acknowledge out of order; a commit never
//! passes a message still in their hands, so a crash redelivers it (and whatever followed it).

use std::collections::BTreeSet;

use tg_backend_api::MessageId;

/// The id of the message at `offset` of `partition`, as receipts and received messages give it.
pub(crate) fn message_id(partition: i32, offset: i64) -> MessageId {
    MessageId::from_text(format!("{partition}:{offset}"))
}

/// What one consumer knows of one partition it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Offsets {
    /// Offsets handed out and not acknowledged yet.
    pending: BTreeSet<i64>,
    /// One past the highest offset handed out (or passed over as a duplicate): where fetching
    /// resumes when the partition comes back to this consumer.
    frontier: i64,
    /// The offset the group has committed (as far as this consumer knows).
    committed: i64,
    /// An offset a commit is in flight for.
    committing: Option<i64>,
}

impl Offsets {
    /// A partition whose consumption starts at `start`, which the group has committed.
    pub(crate) fn new(start: i64) -> Self {
        Self {
            pending: BTreeSet::new(),
            frontier: start,
            committed: start,
            committing: None,
        }
    }

    /// The message at `offset` was handed out (again, for a redelivery).
    pub(crate) fn delivered(&mut self, offset: i64) {
        self.pending.insert(offset);
        self.passed(offset);
    }

    /// The message at `offset` was passed over without being handed out (a duplicate): it counts
    /// as done.
    pub(crate) fn passed(&mut self, offset: i64) {
        self.frontier = self.frontier.max(offset + 1);
    }

    /// The message at `offset` was acknowledged; false if it was not pending.
    pub(crate) fn acknowledged(&mut self, offset: i64) -> bool {
        self.pending.remove(&offset)
    }

    /// Whether the message at `offset` is handed out and not acknowledged.
    pub(crate) fn is_pending(&self, offset: i64) -> bool {
        self.pending.contains(&offset)
    }

    /// Where fetching resumes.
    pub(crate) fn frontier(&self) -> i64 {
        self.frontier
    }

    /// The offset to commit now: the lowest unacknowledged one, else the frontier, if that is
    /// past what is committed or being committed.
    pub(crate) fn committable(&self) -> Option<i64> {
        let offset = self.pending.first().copied().unwrap_or(self.frontier);
        (offset > self.committed.max(self.committing.unwrap_or(i64::MIN))).then_some(offset)
    }

    /// A commit of `offset` was sent.
    pub(crate) fn committing(&mut self, offset: i64) {
        self.committing = Some(offset);
    }

    /// The commit of `offset` succeeded.
    pub(crate) fn committed(&mut self, offset: i64) {
        self.committed = self.committed.max(offset);
        if self.committing.is_some_and(|c| c <= offset) {
            self.committing = None;
        }
    }

    /// The commit of `offset` failed: a later one will carry it.
    pub(crate) fn commit_failed(&mut self, offset: i64) {
        if self.committing == Some(offset) {
            self.committing = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_acks_never_commit_past_a_gap() {
        let mut o = Offsets::new(10);
        for offset in 10..15 {
            o.delivered(offset);
        }
        assert_eq!(o.committable(), None, "nothing acknowledged yet");
        for offset in [11, 12, 14] {
            assert!(o.acknowledged(offset));
        }
        assert_eq!(o.committable(), None, "10 is still in a handler's hands");
        assert!(o.acknowledged(10));
        assert_eq!(o.committable(), Some(13), "up to the gap at 13");
        o.committing(13);
        assert_eq!(o.committable(), None, "already being committed");
        o.committed(13);
        assert!(o.acknowledged(13));
        assert_eq!(o.committable(), Some(15), "everything handed out is done");
        assert!(!o.acknowledged(13), "twice is not pending");
    }

    #[test]
    fn redeliveries_and_duplicates() {
        let mut o = Offsets::new(0);
        o.delivered(0);
        o.delivered(1);
        assert!(o.acknowledged(1));
        // 0 was nacked and goes out again: still pending, the commit stays at 0
        o.delivered(0);
        assert!(o.is_pending(0));
        assert_eq!(o.committable(), None);
        // a duplicate at 2 is passed over; it counts as done once 0 is
        o.passed(2);
        assert_eq!(o.frontier(), 3);
        assert!(o.acknowledged(0));
        assert_eq!(o.committable(), Some(3));
    }

    #[test]
    fn a_failed_commit_is_retried() {
        let mut o = Offsets::new(0);
        o.delivered(0);
        o.acknowledged(0);
        o.committing(1);
        assert_eq!(o.committable(), None);
        o.commit_failed(1);
        assert_eq!(o.committable(), Some(1));
        o.committed(1);
        assert_eq!(o.committable(), None);
    }
}
