//! Which delivery tags of a consumer's channel may be settled (acknowledged or negatively
//! acknowledged) with one `multiple` frame.
//!
//! `basic.ack` and `basic.nack` with `multiple=true` settle every unsettled delivery of the
//! channel up to the tag they carry, and the broker closes the channel (`PRECONDITION_FAILED -
//! unknown delivery tag`) when a frame names a tag that is settled already. A batch is settled
//! with one `multiple` frame only where that settles exactly the batch: its tags are every tag of
//! the channel up to the highest one that was handed to the application and is still open.
//! Deliveries the application has not been handed yet (in the prefetch buffer) all carry higher
//! tags, since the broker numbers a channel's deliveries in order and the consumer hands them
//! out in that order; deliveries it dropped (q2 copies) were acknowledged before the next one
//! was handed out.
//!
//! Frames of concurrent calls may reach the socket in any order, so a tag counts as in flight
//! from the moment a call takes it until its frame went out; while a tag up to the highest one is
//! in flight, a batch is settled tag by tag instead, or a `multiple` frame might overtake the
//! frame of that tag and make it name a settled tag.

use std::collections::BTreeSet;

use parking_lot::Mutex;

/// The open and in-flight delivery tags of one channel.
#[derive(Debug, Default)]
pub(crate) struct Tags(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    /// Handed to the application, not settled.
    open: BTreeSet<u64>,
    /// Taken by a call whose frame may not have gone out yet.
    in_flight: BTreeSet<u64>,
}

/// How to settle the open tags of a batch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Nothing: every tag was settled before.
    Nothing,
    /// One frame with `multiple=true` and the last (highest) of these tags: they are every
    /// open tag up to it.
    Multiple(Vec<u64>),
    /// One frame per tag, `multiple=false`.
    Each(Vec<u64>),
}

impl Tags {
    /// A delivery with `tag` was handed to the application.
    pub(crate) fn handed_out(&self, tag: u64) {
        self.0.lock().open.insert(tag);
    }

    /// Takes `tag` alone if it is open: whether it was (the caller then sends its frame and calls
    /// [`Tags::sent`] with `Plan::Each(vec![tag])`, or [`Tags::sent_one`]).
    pub(crate) fn take_one(&self, tag: u64) -> bool {
        let mut state = self.0.lock();
        let open = state.open.remove(&tag);
        if open {
            state.in_flight.insert(tag);
        }
        open
    }

    /// The frame of a tag taken with [`Tags::take_one`] went out (or failed).
    pub(crate) fn sent_one(&self, tag: u64) {
        self.0.lock().in_flight.remove(&tag);
    }

    /// Takes the open tags among `tags` (settled by no one else since) and says how to settle
    /// them. The caller sends the frames and then calls [`Tags::sent`] with the plan.
    pub(crate) fn take(&self, tags: &[u64]) -> Plan {
        let mut state = self.0.lock();
        let mut mine: Vec<u64> = tags
            .iter()
            .copied()
            .filter(|t| state.open.contains(t))
            .collect();
        mine.sort_unstable();
        mine.dedup();
        let Some(&highest) = mine.last() else {
            return Plan::Nothing;
        };
        let exact = mine.len() > 1
            && state.open.range(..=highest).count() == mine.len()
            && state.in_flight.range(..=highest).next().is_none();
        for tag in &mine {
            state.open.remove(tag);
        }
        if exact {
            state.in_flight.insert(highest);
            Plan::Multiple(mine)
        } else {
            state.in_flight.extend(mine.iter().copied());
            Plan::Each(mine)
        }
    }

    /// The frames of `plan` went out (or failed: the channel is gone).
    pub(crate) fn sent(&self, plan: &Plan) {
        let mut state = self.0.lock();
        match plan {
            Plan::Nothing => {}
            Plan::Multiple(tags) => {
                if let Some(highest) = tags.last() {
                    state.in_flight.remove(highest);
                }
            }
            Plan::Each(tags) => {
                for tag in tags {
                    state.in_flight.remove(tag);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(open: impl IntoIterator<Item = u64>) -> Tags {
        let t = Tags::default();
        for tag in open {
            t.handed_out(tag);
        }
        t
    }

    #[test]
    fn multiple_only_for_every_open_tag_up_to_the_highest() {
        let t = tags(1..=6);
        // 1..=3 is everything open up to 3
        let plan = t.take(&[3, 1, 2]);
        assert_eq!(plan, Plan::Multiple(vec![1, 2, 3]));
        t.sent(&plan);
        // 4 is still open below 6
        let plan = t.take(&[5, 6]);
        assert_eq!(plan, Plan::Each(vec![5, 6]));
        t.sent(&plan);
        // settled before: nothing to send
        assert_eq!(t.take(&[1, 5]), Plan::Nothing);
        // one tag travels alone
        assert!(t.take_one(4));
        assert!(!t.take_one(4), "settled before");
        t.sent_one(4);
    }

    #[test]
    fn a_frame_in_flight_below_keeps_the_batch_tag_by_tag() {
        let t = tags(1..=4);
        let single = t.take(&[1]);
        assert_eq!(single, Plan::Each(vec![1]));
        // 1's frame may not have gone out: acknowledging up to 4 could overtake it
        let plan = t.take(&[2, 3, 4]);
        assert_eq!(plan, Plan::Each(vec![2, 3, 4]));
        t.sent(&plan);
        t.sent(&single);
        let t = tags(1..=4);
        let first = t.take(&[1, 2]);
        assert_eq!(first, Plan::Multiple(vec![1, 2]));
        assert_eq!(t.take(&[3, 4]), Plan::Each(vec![3, 4]));
        t.sent(&first);
    }

    #[test]
    fn deliveries_handed_out_later_do_not_count() {
        let t = tags(1..=3);
        let plan = t.take(&[1, 2, 3]);
        t.handed_out(4);
        assert_eq!(plan, Plan::Multiple(vec![1, 2, 3]));
        t.sent(&plan);
        assert_eq!(t.take(&[4]), Plan::Each(vec![4]));
    }
}
