//! q2 de-duplication, on the consumer side.
//!
//! A message whose `tg-dedup-id` was seen among the consumer's last `dedup_capacity` messages
//! with another message id (a redelivery of the same message is not a duplicate) is acknowledged
//! and skipped. Pulsar's own broker de-duplication works on producer names and sequence ids, not
//! on an application id, and needs namespace configuration, so it is not used.

use std::collections::{HashMap, VecDeque};

use pulsar::proto::MessageIdData;

use crate::batch::{entry_key, EntryKey};

/// The last de-duplication ids one q2 consumer saw, with the message that carried each.
pub(crate) struct Dedup {
    seen: HashMap<String, (EntryKey, i32)>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Dedup {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            seen: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Records `dedup_id` for message `id`; false when another message carried it before.
    pub(crate) fn first_time(&mut self, dedup_id: &str, id: &MessageIdData) -> bool {
        let this = (entry_key(id), id.batch_index.unwrap_or(-1));
        match self.seen.get(dedup_id) {
            Some(first) => *first == this, // a redelivery of the first copy is delivered
            None => {
                if self.order.len() >= self.capacity {
                    if let Some(old) = self.order.pop_front() {
                        self.seen.remove(&old);
                    }
                }
                self.seen.insert(dedup_id.to_owned(), this);
                self.order.push_back(dedup_id.to_owned());
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::id;

    #[test]
    fn dedup_skips_copies_but_not_redeliveries() {
        let mut d = Dedup::new(2);
        assert!(d.first_time("a", &id(1, None)));
        assert!(
            d.first_time("a", &id(1, None)),
            "redelivery of the same message"
        );
        assert!(
            !d.first_time("a", &id(2, None)),
            "a second message with the same id"
        );
        assert!(d.first_time("b", &id(3, Some(0))));
        assert!(d.first_time("c", &id(3, Some(1))));
        // "a" fell out of the capacity of 2
        assert!(d.first_time("a", &id(4, None)));
    }
}
