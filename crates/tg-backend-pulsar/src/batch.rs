//! Whole-batch acknowledgement, and where one cumulative acknowledgement may stand for several.
//!
//! A batch of the producer is one broker entry; Pulsar brokers without batch-index
//! acknowledgement (the default) treat the acknowledgement of any message of a batch as the
//! acknowledgement of the whole entry. A consumer therefore acknowledges an entry only when the
//! application has acknowledged every message of it (as the Java client does), and when a nack
//! brings an entry back, it drops the messages of it that were acknowledged already.
//!
//! A cumulative acknowledgement of entry E acknowledges every entry of the subscription up to E.
//! [`OpenEntries`] says when that is what the application asked for: on an `Exclusive` or
//! `Failover` subscription, when no entry up to E that this consumer handed out is still
//! unacknowledged (a nacked one counts as unacknowledged until it is acknowledged after its
//! redelivery). Entries this consumer never handed out cannot sit below E unacknowledged there:
//! the broker dispatches such a subscription in position order to one consumer, and redelivers
//! from the oldest unacknowledged position. On a `Shared` subscription other consumers hold
//! entries between this consumer's, so it never acknowledges cumulatively (the broker would
//! ignore it, as Pulsar documents).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use pulsar::proto::MessageIdData;

/// What an [`AckHandle`](tg_backend_api::AckHandle) of this backend carries: the Pulsar id and
/// the size of its batch.
#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    pub(crate) id: MessageIdData,
    pub(crate) batch_size: i32,
}

/// The key of a broker entry.
pub(crate) type EntryKey = (u64, u64, i32);

pub(crate) fn entry_key(id: &MessageIdData) -> EntryKey {
    (id.ledger_id, id.entry_id, id.partition.unwrap_or(-1))
}

/// Acknowledgement state of one batch (broker entry) with messages still unacknowledged.
struct BatchState {
    acked: Vec<bool>,
    remaining: usize,
}

/// How many fully acknowledged batches a consumer remembers. Each nack of a message of a batch
/// makes the broker redeliver the whole entry; a redelivery that arrives after the batch was
/// completed (two nacks of one batch, say) is dropped as already acknowledged, not delivered a
/// second time.
const COMPLETED: usize = 10_000;

/// The batches of one consumer with some, but not all, messages acknowledged, and the batches
/// it completed lately.
#[derive(Default)]
pub(crate) struct BatchAcks {
    batches: HashMap<EntryKey, BatchState>,
    completed: HashSet<EntryKey>,
    completed_order: VecDeque<EntryKey>,
}

impl BatchAcks {
    /// The ids to acknowledge now for this delivery: none while its batch has unacknowledged
    /// messages, all of the batch when the last one is acknowledged.
    pub(crate) fn ids_to_ack(&mut self, d: &Delivery) -> Vec<MessageIdData> {
        match (d.batch_size > 1, d.id.batch_index) {
            (true, Some(index)) if index >= 0 && index < d.batch_size => {
                let key = entry_key(&d.id);
                let state = self.batches.entry(key).or_insert_with(|| BatchState {
                    acked: vec![false; d.batch_size as usize],
                    remaining: d.batch_size as usize,
                });
                let slot = &mut state.acked[index as usize];
                if !*slot {
                    *slot = true;
                    state.remaining -= 1;
                }
                if state.remaining > 0 {
                    return Vec::new();
                }
                self.batches.remove(&key);
                if self.completed.insert(key) {
                    self.completed_order.push_back(key);
                    if self.completed_order.len() > COMPLETED {
                        if let Some(old) = self.completed_order.pop_front() {
                            self.completed.remove(&old);
                        }
                    }
                }
                (0..d.batch_size)
                    .map(|i| MessageIdData {
                        batch_index: Some(i),
                        ..d.id.clone()
                    })
                    .collect()
            }
            _ => vec![d.id.clone()],
        }
    }

    /// Whether this message of a redelivered batch was acknowledged already.
    pub(crate) fn already_acked(&self, id: &MessageIdData, batch_size: i32) -> bool {
        if batch_size <= 1 {
            return false;
        }
        if self.completed.contains(&entry_key(id)) {
            return true;
        }
        match (self.batches.get(&entry_key(id)), id.batch_index) {
            (Some(state), Some(index)) if index >= 0 => {
                state.acked.get(index as usize).copied().unwrap_or(false)
            }
            _ => false,
        }
    }
}

/// The entries (by position) a consumer handed out and has not acknowledged whole.
#[derive(Default)]
pub(crate) struct OpenEntries {
    open: BTreeSet<EntryKey>,
}

impl OpenEntries {
    /// A message of `key` was handed to the application.
    pub(crate) fn handed_out(&mut self, key: EntryKey) {
        self.open.insert(key);
    }

    /// Entry `key` was acknowledged whole.
    pub(crate) fn acknowledged(&mut self, key: &EntryKey) {
        self.open.remove(key);
    }

    /// Whether one cumulative acknowledgement of `key` acknowledges only entries the
    /// application acknowledged: no entry up to it is still open. Positions are ordered only
    /// within one partition, so entries of a partitioned topic (`partition` ≥ 0) never qualify.
    pub(crate) fn cumulative_allowed(&self, key: &EntryKey) -> bool {
        key.2 < 0 && self.open.range(..=*key).next().is_none()
    }
}

#[cfg(test)]
pub(crate) fn id(entry: u64, batch: Option<i32>) -> MessageIdData {
    MessageIdData {
        ledger_id: 1,
        entry_id: entry,
        batch_index: batch,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_acknowledged_whole() {
        let mut s = BatchAcks::default();
        let d = |i| Delivery {
            id: id(7, Some(i)),
            batch_size: 3,
        };
        assert!(s.ids_to_ack(&d(0)).is_empty());
        assert!(s.ids_to_ack(&d(0)).is_empty(), "twice is fine");
        assert!(s.already_acked(&id(7, Some(0)), 3));
        assert!(!s.already_acked(&id(7, Some(1)), 3));
        assert!(s.ids_to_ack(&d(2)).is_empty());
        let all = s.ids_to_ack(&d(1));
        assert_eq!(
            all.iter().map(|i| i.batch_index).collect::<Vec<_>>(),
            [Some(0), Some(1), Some(2)]
        );
        assert!(s.batches.is_empty());
        // a late redelivery of the completed batch is not delivered again
        assert!(s.already_acked(&id(7, Some(1)), 3));
        // a message outside a batch is acknowledged at once
        let single = Delivery {
            id: id(8, None),
            batch_size: 0,
        };
        assert_eq!(s.ids_to_ack(&single).len(), 1);
    }

    #[test]
    fn cumulative_only_when_nothing_below_is_open() {
        let mut open = OpenEntries::default();
        let key = |entry| entry_key(&id(entry, None));
        for e in 1..=4 {
            open.handed_out(key(e));
        }
        // 1 and 2 acknowledged: a cumulative acknowledgement of 2 covers nothing else
        open.acknowledged(&key(1));
        open.acknowledged(&key(2));
        assert!(open.cumulative_allowed(&key(2)));
        // 4 acknowledged while 3 is open: acknowledging up to 4 would take 3 too
        open.acknowledged(&key(4));
        assert!(!open.cumulative_allowed(&key(4)));
        open.acknowledged(&key(3));
        assert!(open.cumulative_allowed(&key(4)));
        // a later ledger orders after every entry of an earlier one
        let later = (2, 0, -1);
        open.handed_out((1, 9, -1));
        assert!(!open.cumulative_allowed(&later));
        open.acknowledged(&(1, 9, -1));
        assert!(open.cumulative_allowed(&later));
        // a partition's positions say nothing about another's
        assert!(!open.cumulative_allowed(&(1, 1, 0)));
    }
}
