//! A consumer's membership of its consumer group: one librdkafka consumer driven by a thread of
//! its own, which polls it (serving the group's rebalances and heartbeats even while the
//! application is busy), keeps what it fetched in a bounded buffer (pausing the partitions when
//! the buffer is full), and commits what the application acknowledged by the commit rule of
//! `offsets.rs`.
//!
//! Rebalances. When the group takes partitions away, the member first commits what is committable
//! in them, then drops what it fetched from them and did not hand out. If the next assignment
//! gives a partition back (with the eager protocol every membership change revokes everything
//! and assigns it again), consumption resumes where it stopped and the messages still in the
//! application's hands stay valid. If the partition went to another member (or was lost, when
//! this member was thrown out of the group), its state is dropped: acknowledging a message the
//! member handed out from it changes nothing, the new owner starts at the committed offset and
//! delivers it again.
//!
//! A new partition starts at the group's committed offset; a group without one starts at the
//! end (`Latest`) or the beginning (`Earliest`) as the partition is at assignment, and that
//! position is committed at once, so the subscription exists from the moment the consumer was
//! created, as on brokers with subscriptions of their own.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tg_backend_api::kit;
use tg_backend_api::{Error, ErrorKind, InitialPosition, Properties, Result, DEDUP_ID_PROPERTY};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dedup::Dedup;
use crate::error::from_kafka;
use crate::offsets::Offsets;

/// How long one poll of the librdkafka consumer blocks: the longest a stop request, a due
/// commit or a pause waits.
const POLL: Duration = Duration::from_millis(50);

/// Payload bytes a member holds fetched and not handed out before it pauses fetching, whatever
/// `receiver_queue` says (librdkafka's own prefetch stops at the same amount).
const MAX_BUFFERED_BYTES: usize = 64 << 20;

/// The commit metadata that marks a subscription deleted: a new consumer of the group treats the
/// partition as never committed and starts where its initial position says.
pub(crate) const UNSUBSCRIBED: &str = "tg-pubsub:unsubscribed";

/// What a member is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stop {
    Run = 0,
    /// Commit and leave the group.
    Close = 1,
    /// Mark the owned partitions unsubscribed and leave the group.
    Unsubscribe = 2,
}

/// How a member behaves.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The Kafka topic.
    pub(crate) topic: String,
    /// The consumer group.
    pub(crate) group: String,
    /// Where a group without a committed offset starts.
    pub(crate) position: InitialPosition,
    /// A group of this consumer alone: nothing is committed (the group goes with the consumer).
    pub(crate) private: bool,
    /// Bound of the requests made while joining (committed offsets, watermarks, commits).
    pub(crate) request_timeout: Duration,
    pub(crate) commit_interval: Duration,
    pub(crate) commit_batch: usize,
    pub(crate) receiver_queue: usize,
    /// q2: de-duplicate by `tg-dedup-id` (window, capacity).
    pub(crate) dedup: Option<(Duration, usize)>,
}

/// Where a handed-out message came from; the acknowledgement handle carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// The partition's ownership the message belongs to (see `Part::epoch`).
    epoch: u64,
}

/// A message fetched (or handed back for redelivery) and not handed out.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    pub(crate) place: Place,
    pub(crate) payload: Bytes,
    pub(crate) properties: Properties,
    pub(crate) key: Option<String>,
    pub(crate) time: Option<SystemTime>,
    pub(crate) redeliveries: u32,
}

/// Where a partition new to this member starts.
struct Start {
    partition: i32,
    offset: i64,
    /// The group has no committed offset there: the start is to be committed.
    new: bool,
}

/// One partition this member owns or owned until the last revocation.
#[derive(Debug)]
struct Part {
    /// Changes whenever the partition may have been someone else's in between: messages of an
    /// older epoch are stale.
    epoch: u64,
    /// Whether it is assigned to this member now.
    owned: bool,
    offsets: Offsets,
}

#[derive(Debug, Default)]
struct State {
    parts: HashMap<i32, Part>,
    buffer: VecDeque<Fetched>,
    /// Payload bytes in `buffer`.
    buffered_bytes: usize,
    redeliver: VecDeque<Fetched>,
    next_epoch: u64,
    /// The group gave this member its (possibly empty) share at least once.
    joined: bool,
    /// Why the member stopped working, for good.
    failure: Option<Error>,
    /// The last error librdkafka reported (a broker down, say), for `receive` time-outs.
    last_error: Option<String>,
    acks_waiting: usize,
    first_ack_at: Option<Instant>,
    paused: bool,
    dedup: Option<Dedup>,
}

impl State {
    fn push(&mut self, fetched: Fetched) {
        self.buffered_bytes += fetched.payload.len();
        self.buffer.push_back(fetched);
    }

    fn pop(&mut self) -> Option<Fetched> {
        let fetched = self.buffer.pop_front()?;
        self.buffered_bytes -= fetched.payload.len();
        Some(fetched)
    }

    /// Drops what was fetched from `partitions` and not handed out.
    fn drop_fetched(&mut self, partitions: &[i32]) {
        self.buffer
            .retain(|f| !partitions.contains(&f.place.partition));
        self.buffered_bytes = self.buffer.iter().map(|f| f.payload.len()).sum();
    }

    /// Whether the buffer holds as much as it may.
    fn full(&self, receiver_queue: usize) -> bool {
        self.buffer.len() >= receiver_queue || self.buffered_bytes >= MAX_BUFFERED_BYTES
    }

    /// Whether the buffer drained to half of what it may hold.
    fn drained(&self, receiver_queue: usize) -> bool {
        self.buffer.len() <= receiver_queue / 2 && self.buffered_bytes <= MAX_BUFFERED_BYTES / 2
    }

    fn owned(&self, place: &Place) -> bool {
        self.parts
            .get(&place.partition)
            .is_some_and(|p| p.owned && p.epoch == place.epoch)
    }
}

/// What the member's thread and the consumer's tasks share.
pub(crate) struct Shared {
    settings: Settings,
    state: Mutex<State>,
    /// Woken when messages arrive, the member joins, or it fails.
    changed: Notify,
    stop: AtomicU8,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("Member")
            .field("topic", &self.settings.topic)
            .field("group", &self.settings.group)
            .field("partitions", &state.parts.keys().collect::<Vec<_>>())
            .field("buffered", &state.buffer.len())
            .finish_non_exhaustive()
    }
}

/// The librdkafka consumer's context: rebalances and commit results go to the shared state.
struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(group = %self.shared.settings.group, %error, reason, "Kafka consumer");
        self.shared.state.lock().last_error = Some(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.shared.assigned(consumer, tpl);
                if let Err(e) = consumer.assign(tpl) {
                    tracing::warn!(group = %self.shared.settings.group, error = %e, "assigning partitions failed");
                }
            }
            _ => {
                self.shared.revoked(consumer, tpl);
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(group = %self.shared.settings.group, error = %e, "revoking partitions failed");
                }
            }
        }
        self.shared.changed.notify_waiters();
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        self.shared.commit_result(result.is_ok(), offsets);
    }
}

impl Shared {
    fn stop(&self) -> Stop {
        match self.stop.load(Ordering::Acquire) {
            0 => Stop::Run,
            1 => Stop::Close,
            _ => Stop::Unsubscribe,
        }
    }

    /// The group assigned `tpl`: resume the partitions that come back, start the others at the
    /// group's committed offset (or the initial position, committed at once), and write each
    /// start into `tpl`.
    fn assigned(&self, consumer: &BaseConsumer<Context>, tpl: &mut TopicPartitionList) {
        let topic = self.settings.topic.clone();
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let mut starts: HashMap<i32, i64> = HashMap::new();
        {
            let mut state = self.state.lock();
            // what went elsewhere while this member was out is no longer ours
            state.parts.retain(|p, _| partitions.contains(p));
            state
                .redeliver
                .retain(|f| partitions.contains(&f.place.partition));
            for (p, part) in &state.parts {
                starts.insert(*p, part.offsets.frontier());
            }
        }
        let fresh: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| !starts.contains_key(p))
            .collect();
        let mut initial = TopicPartitionList::new();
        if !fresh.is_empty() {
            match self.resolve(consumer, &fresh) {
                Ok(resolved) => {
                    for Start {
                        partition,
                        offset,
                        new,
                    } in resolved
                    {
                        starts.insert(partition, offset);
                        if new && !self.settings.private {
                            let _ = initial.add_partition_offset(
                                &topic,
                                partition,
                                Offset::Offset(offset),
                            );
                        }
                    }
                }
                Err(e) => tracing::warn!(
                    group = %self.settings.group, topic, error = %e,
                    "cannot read the group's committed offsets; librdkafka falls back to auto.offset.reset"
                ),
            }
        }
        for (p, start) in &starts {
            let _ = tpl.set_partition_offset(&topic, *p, Offset::Offset(*start));
        }
        if initial.count() > 0 {
            // the subscription exists from now on, at its initial position
            if let Err(e) = consumer.commit(&initial, CommitMode::Sync) {
                tracing::warn!(group = %self.settings.group, topic, error = %e, "committing the initial position failed");
            }
        }
        let mut state = self.state.lock();
        for p in &partitions {
            let start = starts.get(p).copied().unwrap_or(-1);
            if let Some(part) = state.parts.get_mut(p) {
                part.owned = true;
            } else {
                let epoch = state.next_epoch;
                state.next_epoch += 1;
                state.parts.insert(
                    *p,
                    Part {
                        epoch,
                        owned: true,
                        offsets: Offsets::new(start),
                    },
                );
            }
        }
        state.joined = true;
        state.paused = false;
        drop(state);
        tracing::debug!(group = %self.settings.group, topic, ?partitions, "partitions assigned");
    }

    /// Where fresh partitions start: the committed offset, or (true: to be committed) the end or
    /// beginning as the initial position says.
    fn resolve(
        &self,
        consumer: &BaseConsumer<Context>,
        partitions: &[i32],
    ) -> std::result::Result<Vec<Start>, KafkaError> {
        let topic = &self.settings.topic;
        let timeout = self.settings.request_timeout;
        let mut query = TopicPartitionList::new();
        for p in partitions {
            query.add_partition(topic, *p);
        }
        let committed = consumer.committed_offsets(query, timeout)?;
        let mut out = Vec::with_capacity(partitions.len());
        for elem in committed.elements() {
            let p = elem.partition();
            match elem.offset() {
                Offset::Offset(n) if elem.metadata() != UNSUBSCRIBED => out.push(Start {
                    partition: p,
                    offset: n,
                    new: false,
                }),
                _ => {
                    let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
                    let start = match self.settings.position {
                        InitialPosition::Earliest => low,
                        InitialPosition::Latest => high,
                    };
                    out.push(Start {
                        partition: p,
                        offset: start,
                        new: true,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The group revokes `tpl`: commit what is committable there, drop what was fetched and not
    /// handed out, and (if the partitions were lost) forget them.
    fn revoked(&self, consumer: &BaseConsumer<Context>, tpl: &TopicPartitionList) {
        let lost = consumer.assignment_lost();
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        if !lost {
            self.commit(consumer, CommitMode::Sync, Some(&partitions));
        }
        let mut state = self.state.lock();
        for p in &partitions {
            if lost {
                state.parts.remove(p);
            } else if let Some(part) = state.parts.get_mut(p) {
                part.owned = false;
            }
        }
        state.drop_fetched(&partitions);
        if lost {
            state
                .redeliver
                .retain(|f| !partitions.contains(&f.place.partition));
        }
        drop(state);
        tracing::debug!(group = %self.settings.group, ?partitions, lost, "partitions revoked");
    }

    /// Commits what is committable (in `only`, or every owned partition).
    fn commit(&self, consumer: &BaseConsumer<Context>, mode: CommitMode, only: Option<&[i32]>) {
        if self.settings.private {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        {
            let mut state = self.state.lock();
            state.acks_waiting = 0;
            state.first_ack_at = None;
            for (p, part) in state.parts.iter_mut() {
                if !part.owned || only.is_some_and(|o| !o.contains(p)) {
                    continue;
                }
                if let Some(offset) = part.offsets.committable() {
                    part.offsets.committing(offset);
                    let _ =
                        tpl.add_partition_offset(&self.settings.topic, *p, Offset::Offset(offset));
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        let sync = matches!(mode, CommitMode::Sync);
        match consumer.commit(&tpl, mode) {
            Ok(()) if sync => self.commit_result(true, &tpl),
            Ok(()) => {}
            Err(e) => {
                tracing::debug!(group = %self.settings.group, error = %e, "commit failed; the next one carries it");
                self.commit_result(false, &tpl);
            }
        }
    }

    /// A commit of `offsets` ended.
    fn commit_result(&self, ok: bool, offsets: &TopicPartitionList) {
        let mut state = self.state.lock();
        for elem in offsets.elements() {
            let (Some(part), Offset::Offset(offset)) =
                (state.parts.get_mut(&elem.partition()), elem.offset())
            else {
                continue;
            };
            if ok && elem.error().is_ok() {
                part.offsets.committed(offset);
            } else {
                part.offsets.commit_failed(offset);
            }
        }
    }

    /// Whether a commit is due: enough acknowledgements wait, or the oldest waited long enough.
    fn commit_due(&self) -> bool {
        let state = self.state.lock();
        state.acks_waiting >= self.settings.commit_batch
            || state
                .first_ack_at
                .is_some_and(|at| at.elapsed() >= self.settings.commit_interval)
    }

    /// Keeps a message librdkafka fetched.
    fn fetched(&self, m: &BorrowedMessage<'_>) {
        // Kafka headers may repeat a name: the kit's one rule (last value wins, with a warning)
        let properties = match m.headers() {
            Some(headers) => kit::properties_from_pairs_logged(
                m.topic(),
                headers.iter().map(|h| {
                    let value = h
                        .value
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    (h.key, value)
                }),
            ),
            None => Properties::new(),
        };
        let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let time = m
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        let mut state = self.state.lock();
        let Some(part) = state.parts.get(&m.partition()).filter(|p| p.owned) else {
            return;
        };
        let place = Place {
            partition: m.partition(),
            offset: m.offset(),
            epoch: part.epoch,
        };
        state.push(Fetched {
            place,
            payload,
            properties,
            key,
            time,
            redeliveries: 0,
        });
        drop(state);
        self.changed.notify_waiters();
    }
}

/// A consumer's group membership (see the module documentation).
pub(crate) struct Member {
    shared: Arc<Shared>,
    done: Mutex<Option<oneshot::Receiver<()>>>,
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl Member {
    /// Creates the librdkafka consumer from `client` (the backend's common settings), subscribes
    /// it, starts its thread, and waits until the group gave it its share (at most
    /// `join_timeout`). The thread ends when the member is closed or `life` is cancelled.
    pub(crate) async fn join(
        mut client: ClientConfig,
        settings: Settings,
        join_timeout: Duration,
        life: CancellationToken,
    ) -> Result<Member> {
        let reset = match settings.position {
            InitialPosition::Earliest => "earliest",
            InitialPosition::Latest => "latest",
        };
        client
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", reset)
            .set("queued.min.messages", settings.receiver_queue.to_string())
            .set("enable.partition.eof", "false");
        let dedup = settings
            .dedup
            .and_then(|(window, cap)| Dedup::new(window, cap));
        let shared = Arc::new(Shared {
            settings,
            state: Mutex::new(State {
                dedup,
                ..State::default()
            }),
            changed: Notify::new(),
            stop: AtomicU8::new(Stop::Run as u8),
        });
        let consumer: BaseConsumer<Context> = client
            .create_with_context(Context {
                shared: shared.clone(),
            })
            .map_err(|e| from_kafka("creating the Kafka consumer", e))?;
        consumer
            .subscribe(&[&shared.settings.topic])
            .map_err(|e| from_kafka("subscribing", e))?;
        let (done_tx, done_rx) = oneshot::channel();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("tg-kafka {}", shared.settings.group))
            .spawn(move || run(consumer, thread_shared, life, done_tx))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unexpected,
                    format!("cannot start the consumer thread: {e}"),
                )
            })?;
        let member = Member {
            shared,
            done: Mutex::new(Some(done_rx)),
        };
        let deadline = Instant::now() + join_timeout;
        loop {
            let changed = member.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (failure, joined) = {
                let state = member.shared.state.lock();
                let failure = state
                    .failure
                    .as_ref()
                    .map(|f| Error::new(f.kind(), f.message().to_owned()));
                (failure, state.joined)
            };
            if let Some(e) = failure {
                member.close(false).await;
                return Err(e);
            }
            if joined {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let last = member.shared.state.lock().last_error.clone();
                member.close(false).await;
                let mut e = Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "consumer group {:?} gave this consumer no partitions of {} within {join_timeout:?} (join_timeout)",
                        member.shared.settings.group, member.shared.settings.topic
                    ),
                );
                if let Some(last) = last {
                    e = e.with_context("last_error", last);
                }
                return Err(e);
            }
        }
        Ok(member)
    }

    /// The next message to hand out: a redelivery first, then what was fetched; q2 duplicates are
    /// passed over. `None` when there is none now.
    pub(crate) fn take(&self) -> Result<Option<Fetched>> {
        let mut state = self.shared.state.lock();
        if let Some(failure) = &state.failure {
            return Err(Error::new(failure.kind(), failure.message().to_owned()));
        }
        loop {
            let next = match state.redeliver.iter().position(|f| state.owned(&f.place)) {
                Some(i) => state.redeliver.remove(i),
                None => state.pop(),
            };
            let Some(fetched) = next else {
                return Ok(None);
            };
            if !state.owned(&fetched.place) {
                continue;
            }
            let place = fetched.place;
            let duplicate = match (&mut state.dedup, fetched.properties.get(DEDUP_ID_PROPERTY)) {
                (Some(dedup), Some(id)) => dedup.is_duplicate(id, (place.partition, place.offset)),
                _ => false,
            };
            let Some(part) = state.parts.get_mut(&place.partition) else {
                continue;
            };
            if duplicate {
                tracing::debug!(
                    partition = place.partition,
                    offset = place.offset,
                    "q2 duplicate passed over"
                );
                part.offsets.passed(place.offset);
                Self::note_ack(&mut state);
                continue;
            }
            part.offsets.delivered(place.offset);
            return Ok(Some(fetched));
        }
    }

    fn note_ack(state: &mut State) {
        state.acks_waiting += 1;
        if state.first_ack_at.is_none() {
            state.first_ack_at = Some(Instant::now());
        }
    }

    /// Future resolving when something changed (a message came, the member failed or stopped).
    pub(crate) fn changed(&self) -> &Notify {
        &self.shared.changed
    }

    /// The last error librdkafka reported, for time-out errors.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.shared.state.lock().last_error.clone()
    }

    /// The messages at `places` were acknowledged: they no longer hold the commit back. A message
    /// of a partition that went to another member changes nothing.
    pub(crate) fn acknowledge(&self, places: impl IntoIterator<Item = Place>) {
        let mut state = self.shared.state.lock();
        for place in places {
            let acked = state
                .parts
                .get_mut(&place.partition)
                .filter(|p| p.epoch == place.epoch)
                .is_some_and(|p| p.offsets.acknowledged(place.offset));
            if acked {
                Self::note_ack(&mut state);
            }
        }
    }

    /// The message goes back to be handed out again (first), its redelivery count raised, unless
    /// its partition went to another member (which delivers it again from the committed offset).
    pub(crate) fn redeliver(&self, mut fetched: Fetched) {
        let mut state = self.shared.state.lock();
        let place = fetched.place;
        let pending = state
            .parts
            .get(&place.partition)
            .is_some_and(|p| p.epoch == place.epoch && p.offsets.is_pending(place.offset));
        if !pending || state.redeliver.iter().any(|f| f.place == place) {
            return;
        }
        fetched.redeliveries += 1;
        let at = state.redeliver.partition_point(|f| {
            (f.place.partition, f.place.offset) < (place.partition, place.offset)
        });
        state.redeliver.insert(at, fetched);
        drop(state);
        self.shared.changed.notify_waiters();
    }

    /// Asks the thread to stop (committing, or marking the subscription deleted when
    /// `unsubscribe`) and leave the group; waits for it unless called from a drop.
    pub(crate) async fn close(&self, unsubscribe: bool) {
        let stop = if unsubscribe {
            Stop::Unsubscribe
        } else {
            Stop::Close
        };
        let _ = self.shared.stop.compare_exchange(
            Stop::Run as u8,
            stop as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        let done = self.done.lock().take();
        if let Some(done) = done {
            let _ = done.await;
        }
    }

    /// Asks the thread to stop without waiting (a consumer dropped without `close`).
    pub(crate) fn close_soon(&self) {
        let _ = self.shared.stop.compare_exchange(
            Stop::Run as u8,
            Stop::Close as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

/// The member's thread: poll, keep what comes, pause and resume, commit; at the end commit (or
/// mark the subscription deleted) and leave the group.
fn run(
    consumer: BaseConsumer<Context>,
    shared: Arc<Shared>,
    life: CancellationToken,
    done: oneshot::Sender<()>,
) {
    loop {
        if shared.stop() != Stop::Run {
            break;
        }
        if life.is_cancelled() {
            shared.stop.store(Stop::Close as u8, Ordering::Release);
            break;
        }
        flow_control(&consumer, &shared);
        if shared.commit_due() {
            shared.commit(&consumer, CommitMode::Async, None);
        }
        match consumer.poll(POLL) {
            Some(Ok(m)) => shared.fetched(&m),
            Some(Err(e)) => poll_error(&shared, e),
            None => {}
        }
    }
    if shared.stop() == Stop::Unsubscribe {
        mark_unsubscribed(&consumer, &shared);
    } else {
        shared.commit(&consumer, CommitMode::Sync, None);
    }
    // leaving the group: librdkafka revokes the partitions (the rebalance callback commits what
    // became committable meanwhile) and sends LeaveGroup
    drop(consumer);
    {
        let mut state = shared.state.lock();
        state
            .failure
            .get_or_insert_with(|| Error::closed("consumer"));
        state.buffer.clear();
        state.buffered_bytes = 0;
        state.redeliver.clear();
    }
    shared.changed.notify_waiters();
    let _ = done.send(());
}

/// Pauses the owned partitions when the buffer is full and resumes them when it drained to half.
/// librdkafka drops what it prefetched for a paused partition and fetches it again on resume,
/// which is why the buffer is large enough to pause rarely.
fn flow_control(consumer: &BaseConsumer<Context>, shared: &Shared) {
    let limit = shared.settings.receiver_queue;
    let change = {
        let state = shared.state.lock();
        if !state.paused && state.full(limit) {
            Some(true)
        } else if state.paused && state.drained(limit) {
            Some(false)
        } else {
            None
        }
    };
    let Some(pause) = change else { return };
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => shared.state.lock().paused = pause,
        Err(e) => {
            tracing::debug!(group = %shared.settings.group, error = %e, pause, "pause/resume failed")
        }
    }
}

/// Commits the end of every owned partition with the `UNSUBSCRIBED` mark.
fn mark_unsubscribed(consumer: &BaseConsumer<Context>, shared: &Shared) {
    let topic = &shared.settings.topic;
    let owned: Vec<i32> = {
        let state = shared.state.lock();
        state
            .parts
            .iter()
            .filter(|(_, p)| p.owned)
            .map(|(p, _)| *p)
            .collect()
    };
    let mut tpl = TopicPartitionList::new();
    for p in owned {
        match consumer.fetch_watermarks(topic, p, shared.settings.request_timeout) {
            Ok((_, high)) => {
                let mut elem = tpl.add_partition(topic, p);
                let _ = elem.set_offset(Offset::Offset(high));
                elem.set_metadata(UNSUBSCRIBED);
            }
            Err(e) => {
                tracing::warn!(topic, partition = p, error = %e, "unsubscribe: cannot read the partition's end")
            }
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(group = %shared.settings.group, error = %e, "unsubscribe: marking the subscription deleted failed");
        }
    }
    // nothing more may be committed over the mark
    shared.state.lock().parts.clear();
}

fn poll_error(shared: &Shared, e: KafkaError) {
    let fatal = matches!(e, KafkaError::MessageConsumptionFatal(_));
    tracing::debug!(group = %shared.settings.group, error = %e, fatal, "Kafka consumer poll");
    let mut state = shared.state.lock();
    state.last_error = Some(e.to_string());
    if fatal {
        state.failure = Some(from_kafka("consuming", e));
        drop(state);
        shared.changed.notify_waiters();
    }
}
