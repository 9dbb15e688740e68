//! q1/q2 consumers: a member of the subscription's consumer group on the topic stream and on the
//! subscription's retry stream.
//!
//! Tasks per consumer: a reader (`XREADGROUP` on its own connection into a small bounded
//! [`Inbox`] that `receive` takes from; blocking only when the last read was not a full batch;
//! pending acknowledgements go along with each read, as `XACK`s in the same write), an
//! acknowledger (writes the `XACK`s the reader will not carry soon, e.g. while it blocks;
//! `acknowledge` waits for its batch), a reclaimer (`XAUTOCLAIM` of messages a crashed member held
//! longer than the visibility timeout) and, for exclusive/failover consumers, a lease keeper.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Pipeline, Value};
use tg_backend_api::{
    next_consumer_id, receive_timeout, AckHandle, Consumer, ConsumerOptions, ConsumerType, Error,
    ErrorKind, InitialPosition, Message, MessageId, Result, Topic,
};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::Shared;
use crate::error::{convert, is_connection_error};
use crate::scripts::{LEASE_RELEASE, LEASE_RENEW, NACK, RECLAIM, RELEASE};
use crate::sync::{Completion, Inbox, Popped};
use crate::topic::{as_bytes, decode_entry, format_id, ms_time, parse_id, TopicKeys};

/// Ids in one `XACK` at most (a larger batch is written as several in one pipeline).
const ACK_BATCH: usize = 1024;
/// The group member name the reclaimer claims crashed members' messages to (it holds them only
/// within one script run).
const RECLAIM_CONSUMER: &str = "tg-reclaim";

/// Which stream a delivered entry lives in, and its id there.
#[derive(Debug, Clone)]
struct EntryRef {
    retry: bool,
    id: EntryId,
}

/// A stream id: packed into numbers when it fits (the common case, no allocation), else text.
#[derive(Debug, Clone)]
enum EntryId {
    Packed { ms: u64, seq: u64 },
    Text(Arc<str>),
}

/// Bits of the [`AckHandle`] number: `1 | retry | ms (42 bits, until 2109) | seq (20 bits)`.
/// A handle number without the top bit carries the [`EntryRef`] as its extra instead.
const PACKED: u64 = 1 << 63;
const RETRY_BIT: u64 = 1 << 62;
const SEQ_BITS: u32 = 20;
const MS_BITS: u32 = 42;

impl EntryRef {
    fn handle(self, consumer: u64) -> AckHandle {
        if let EntryId::Packed { ms, seq } = self.id {
            if ms < (1 << MS_BITS) && seq < (1 << SEQ_BITS) {
                let retry = if self.retry { RETRY_BIT } else { 0 };
                return AckHandle::new(consumer, PACKED | retry | (ms << SEQ_BITS) | seq);
            }
        }
        AckHandle::new(consumer, 0).with_extra(self)
    }

    fn from_handle(handle: &AckHandle) -> Option<Self> {
        let n = handle.seq();
        if n & PACKED != 0 {
            let ms = (n >> SEQ_BITS) & ((1 << MS_BITS) - 1);
            let seq = n & ((1 << SEQ_BITS) - 1);
            return Some(Self {
                retry: n & RETRY_BIT != 0,
                id: EntryId::Packed { ms, seq },
            });
        }
        handle.extra::<EntryRef>().cloned()
    }
}

impl EntryId {
    fn from_bytes(id: &[u8]) -> Self {
        match parse_id(id) {
            Some((ms, seq)) => Self::Packed { ms, seq },
            None => Self::Text(String::from_utf8_lossy(id).into()),
        }
    }
}

impl redis::ToRedisArgs for EntryId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        match self {
            Self::Packed { ms, seq } => out.write_arg(format_id(*ms, *seq, &mut [0; 41])),
            Self::Text(t) => out.write_arg(t.as_bytes()),
        }
    }
}

/// Writes stream ids as command arguments, reusing the digits of the last `ms` (the ids of one
/// batch mostly share it).
#[derive(Default)]
struct IdFormatter {
    ms: Option<u64>,
    /// `<ms>-` of the last id, then room for the sequence number.
    buf: Vec<u8>,
    prefix: usize,
}

impl IdFormatter {
    fn push_all(&mut self, cmd: &mut redis::Cmd, ids: &[EntryId]) {
        for id in ids {
            match id {
                EntryId::Packed { ms, seq } => {
                    if self.ms != Some(*ms) {
                        let mut full = [0u8; 41];
                        let text = format_id(*ms, 0, &mut full);
                        self.prefix = text.len() - 1;
                        self.buf.clear();
                        self.buf.extend_from_slice(&text[..self.prefix]);
                        self.ms = Some(*ms);
                    }
                    self.buf.truncate(self.prefix);
                    let mut tail = [0u8; 41];
                    let text = format_id(0, *seq, &mut tail);
                    self.buf.extend_from_slice(&text[2..]);
                    cmd.arg(&self.buf[..]);
                }
                EntryId::Text(t) => {
                    cmd.arg(t.as_bytes());
                }
            }
        }
    }
}

/// How an `XACK` batch ended: the error's kind and message on failure.
type AckOutcome = std::result::Result<(), (ErrorKind, String)>;

/// One batch of acknowledgements: every `acknowledge` in it waits for this.
type AckBatch = Arc<Completion<AckOutcome>>;

/// Acknowledgements waiting to be written: `acknowledge` appends its id under a lock and waits
/// for its batch's [`Completion`] (no channel, no per-message allocation).
///
/// Who writes a batch: while the reader is about to send a read that returns at once (the last
/// one was a full batch), the reader takes what is pending and sends the `XACK`s on its own
/// connection in the same write as the `XREADGROUP` — one round trip for both, as a hand-written
/// client would do. Otherwise (the reader blocks, waits for room, reconnects or stands by) the
/// first acknowledgement of a batch wakes the acknowledger task, which writes on the shared
/// connection.
struct AckQueue {
    state: Mutex<AckState>,
    wake: Notify,
}

struct AckState {
    main: Vec<EntryId>,
    retry: Vec<EntryId>,
    /// The batch now being appended to.
    current: AckBatch,
    /// Batches being written (by the acknowledger, or by the reader along with a read).
    writing: Vec<AckBatch>,
    /// The reader is about to send a read that returns at once and carries what is pending.
    reader_reading: bool,
}

impl AckQueue {
    fn new() -> Self {
        Self {
            state: Mutex::new(AckState {
                main: Vec::new(),
                retry: Vec::new(),
                current: Arc::new(Completion::new()),
                writing: Vec::new(),
                reader_reading: false,
            }),
            wake: Notify::new(),
        }
    }

    /// Queues one acknowledgement; returns its batch.
    fn push(&self, entry: EntryRef) -> AckBatch {
        let mut s = self.state.lock();
        let first = s.main.is_empty() && s.retry.is_empty();
        if entry.retry {
            s.retry.push(entry.id);
        } else {
            s.main.push(entry.id);
        }
        let batch = s.current.clone();
        let wake = first && !s.reader_reading;
        drop(s);
        if wake {
            self.wake.notify_one();
        }
        batch
    }

    /// Moves what is pending into `main` and `retry` (empty on entry) for one write; its batch.
    fn take_locked(
        s: &mut AckState,
        main: &mut Vec<EntryId>,
        retry: &mut Vec<EntryId>,
    ) -> Option<AckBatch> {
        if s.main.is_empty() && s.retry.is_empty() {
            return None;
        }
        std::mem::swap(&mut s.main, main);
        std::mem::swap(&mut s.retry, retry);
        let batch = std::mem::replace(&mut s.current, Arc::new(Completion::new()));
        s.writing.push(batch.clone());
        Some(batch)
    }

    /// The acknowledger takes what is pending.
    fn take(&self, main: &mut Vec<EntryId>, retry: &mut Vec<EntryId>) -> Option<AckBatch> {
        Self::take_locked(&mut self.state.lock(), main, retry)
    }

    /// The reader is about to send a read and takes what is pending to send along. `soon`: the
    /// read returns at once, so acknowledgements until the next read may wait for that one.
    fn take_for_read(
        &self,
        main: &mut Vec<EntryId>,
        retry: &mut Vec<EntryId>,
        soon: bool,
    ) -> Option<AckBatch> {
        let mut s = self.state.lock();
        s.reader_reading = soon;
        Self::take_locked(&mut s, main, retry)
    }

    /// The reader will not read soon (it blocks, waits for room, reconnects, stands by or
    /// stopped): the acknowledger takes over what is pending and what comes.
    fn reader_away(&self) {
        let mut s = self.state.lock();
        if !s.reader_reading {
            return;
        }
        s.reader_reading = false;
        let pending = !(s.main.is_empty() && s.retry.is_empty());
        drop(s);
        if pending {
            self.wake.notify_one();
        }
    }

    /// A batch was written.
    fn done(&self, batch: &AckBatch) {
        self.state.lock().writing.retain(|w| !Arc::ptr_eq(w, batch));
    }

    /// The batches that complete once everything acknowledged so far is written.
    fn unfinished(&self) -> Vec<AckBatch> {
        let s = self.state.lock();
        let mut all = s.writing.clone();
        if !(s.main.is_empty() && s.retry.is_empty()) {
            all.push(s.current.clone());
        }
        all
    }

    /// Fails every batch not yet written (the acknowledger ended).
    fn fail_all(&self) {
        let mut s = self.state.lock();
        s.main.clear();
        s.retry.clear();
        s.reader_reading = false;
        let gone = || Err((ErrorKind::Closed, "the consumer closed".to_owned()));
        s.current.set(gone());
        for w in s.writing.drain(..) {
            w.set(gone());
        }
    }
}

/// The `XACK`s (and, on the retry stream, `XDEL`s) of one batch.
fn ack_pipeline(
    names: &Names,
    main: &[EntryId],
    retry: &[EntryId],
    fmt: &mut IdFormatter,
) -> Pipeline {
    let command =
        |name: &str, key: &str, group: Option<&str>, ids: &[EntryId], fmt: &mut IdFormatter| {
            let mut cmd = redis::Cmd::with_capacity(3 + ids.len(), 32 + key.len() + 24 * ids.len());
            cmd.arg(name).arg(key);
            if let Some(g) = group {
                cmd.arg(g);
            }
            fmt.push_all(&mut cmd, ids);
            cmd
        };
    let mut pipe = Pipeline::with_capacity(3);
    for ids in main.chunks(ACK_BATCH) {
        pipe.add_command(command("XACK", &names.stream, Some(&names.group), ids, fmt));
    }
    for ids in retry.chunks(ACK_BATCH) {
        pipe.add_command(command("XACK", &names.retry, Some(&names.group), ids, fmt));
        pipe.add_command(command("XDEL", &names.retry, None, ids, fmt));
    }
    pipe
}

/// A batch of acknowledgements the reader sends along with its read, on its own connection.
/// If the reader stops before the reply came, the batch is finished on the shared connection.
struct AlongWrite {
    shared: Arc<Shared>,
    queue: Arc<AckQueue>,
    pipe: Pipeline,
    batch: AckBatch,
    finished: bool,
}

impl AlongWrite {
    async fn run(mut self, mut conn: MultiplexedConnection) {
        let n = self.pipe.len();
        let outcome = match conn.req_packed_commands(&self.pipe, 0, n).await {
            Ok(values) => match values.into_iter().find_map(|v| match v {
                Value::ServerError(e) => Some(e),
                _ => None,
            }) {
                None => Ok(()),
                Some(e) => Err(self.shared.err(e.into(), "acknowledging failed")),
            },
            // the reader's connection broke: write them on the shared one (retrying)
            Err(e) if is_connection_error(&e) => write_acks(&self.shared, &self.pipe).await,
            Err(e) => Err(self.shared.err(e, "acknowledging failed")),
        };
        self.batch
            .set(outcome.map_err(|e| (e.kind(), e.message().to_owned())));
        self.queue.done(&self.batch);
        self.finished = true;
    }
}

impl Drop for AlongWrite {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let (shared, queue, batch) = (self.shared.clone(), self.queue.clone(), self.batch.clone());
        let pipe = std::mem::replace(&mut self.pipe, Pipeline::new());
        let finish = async move {
            let outcome = write_acks(&shared, &pipe).await;
            batch.set(outcome.map_err(|e| (e.kind(), e.message().to_owned())));
            queue.done(&batch);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(finish);
            }
            Err(_) => {
                self.batch
                    .set(Err((ErrorKind::Closed, "the consumer closed".to_owned())));
                self.queue.done(&self.batch);
            }
        }
    }
}

/// The names one consumer works with.
#[derive(Debug, Clone)]
struct Names {
    stream: String,
    retry: String,
    lease: String,
    group: String,
    member: String,
}

/// The part of a consumer that the backend keeps (weakly) to close it.
pub(crate) struct ConsumerCore {
    id: u64,
    shared: Arc<Shared>,
    topic: Topic,
    names: Names,
    consumer_type: ConsumerType,
    closed: AtomicBool,
    inbox: Arc<Inbox>,
    stop: watch::Sender<bool>,
    reader_client: Arc<AtomicI64>,
    acks: Arc<AckQueue>,
    lease_token: Option<String>,
    reader: Mutex<Option<JoinHandle<()>>>,
    helpers: Mutex<Vec<JoinHandle<()>>>,
    shutdown_lock: tokio::sync::Mutex<()>,
}

pub(crate) struct StreamConsumer {
    core: Arc<ConsumerCore>,
}

impl StreamConsumer {
    pub(crate) async fn create(
        shared: Arc<Shared>,
        topic: Topic,
        options: ConsumerOptions,
    ) -> Result<Self> {
        let keys = TopicKeys::new(&shared.config.prefix, &topic);
        let member = format!(
            "{}-{}",
            options.consumer_name.as_deref().unwrap_or("c"),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let names = Names {
            retry: keys.retry(&options.subscription),
            lease: keys.lease(&options.subscription),
            stream: keys.main,
            group: options.subscription.clone(),
            member,
        };
        let start = match options.initial_position {
            InitialPosition::Earliest => "0",
            InitialPosition::Latest => "$",
        };
        ensure_groups(&shared, &names, start)
            .await
            .map_err(|e| e.with_context("topic", &topic))?;

        let (active_tx, _) = watch::channel(options.consumer_type == ConsumerType::Shared);
        let active = Arc::new(active_tx);
        let lease_token = match options.consumer_type {
            ConsumerType::Shared => {
                if let Some(holder) = lease_holder(&shared, &names.lease).await? {
                    return Err(busy(&topic, &names.group, &holder, ConsumerType::Shared));
                }
                None
            }
            ty => {
                let token = format!("{ty}:{}", uuid::Uuid::new_v4().simple());
                if try_acquire(&shared, &names.lease, &token).await? {
                    active.send_replace(true);
                } else {
                    let holder = lease_holder(&shared, &names.lease)
                        .await?
                        .unwrap_or_default();
                    if ty == ConsumerType::Exclusive || !holder.starts_with("failover:") {
                        return Err(busy(&topic, &names.group, &holder, ty));
                    }
                    tracing::debug!(%topic, subscription = %names.group, "failover consumer stands by");
                }
                Some(token)
            }
        };

        let batch = shared.config.batch;
        let inbox = Arc::new(Inbox::new(batch * 3));
        let acks = Arc::new(AckQueue::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let reader_client = Arc::new(AtomicI64::new(0));
        let id = next_consumer_id();

        let reader = tokio::spawn(run_reader(ReaderCtx {
            shared: shared.clone(),
            names: names.clone(),
            consumer: id,
            inbox: inbox.clone(),
            acks: acks.clone(),
            decoded: VecDeque::with_capacity(batch * 2),
            stop: stop_rx.clone(),
            active: active.subscribe(),
            client_id: reader_client.clone(),
        }));
        let mut helpers = vec![
            tokio::spawn(run_acker(shared.clone(), names.clone(), acks.clone())),
            tokio::spawn(run_reclaimer(
                shared.clone(),
                names.clone(),
                stop_rx.clone(),
            )),
        ];
        if let Some(token) = &lease_token {
            helpers.push(tokio::spawn(run_lease(
                shared.clone(),
                names.lease.clone(),
                token.clone(),
                active.clone(),
                stop_rx,
            )));
        }
        Ok(Self {
            core: Arc::new(ConsumerCore {
                id,
                shared,
                topic,
                names,
                consumer_type: options.consumer_type,
                closed: AtomicBool::new(false),
                inbox,
                stop: stop_tx,
                reader_client,
                acks,
                lease_token,
                reader: Mutex::new(Some(reader)),
                helpers: Mutex::new(helpers),
                shutdown_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    pub(crate) fn core(&self) -> &Arc<ConsumerCore> {
        &self.core
    }
}

fn busy(topic: &Topic, group: &str, holder: &str, wanted: ConsumerType) -> Error {
    let held_by = holder.split(':').next().unwrap_or("another");
    Error::new(
        ErrorKind::ConsumerBusy,
        format!(
            "subscription {group:?} already has an active {held_by} consumer (its lease is held); \
             a {wanted} consumer cannot join"
        ),
    )
    .with_context("topic", topic)
}

async fn lease_holder(shared: &Shared, key: &str) -> Result<Option<String>> {
    let mut conn = shared.conn();
    bounded(
        shared,
        redis::cmd("GET")
            .arg(key)
            .query_async::<Option<String>>(&mut conn),
    )
    .await?
    .map_err(|e| shared.err(e, "reading the subscription lease failed"))
}

async fn try_acquire(shared: &Shared, key: &str, token: &str) -> Result<bool> {
    let mut conn = shared.conn();
    let ms = shared.config.lease.as_millis() as u64;
    let res = bounded(
        shared,
        redis::cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ms)
            .query_async::<Option<String>>(&mut conn),
    )
    .await?
    .map_err(|e| shared.err(e, "taking the subscription lease failed"))?;
    Ok(res.is_some())
}

/// Runs a command future bounded by the send timeout.
async fn bounded<T>(shared: &Shared, fut: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(shared.config.send_timeout, fut)
        .await
        .map_err(|_| {
            Error::new(ErrorKind::Timeout, "Redis did not answer in time")
                .with_context("server", &shared.server)
        })
}

/// Creates the consumer group on the topic stream (at `start`) and on the retry stream (at 0),
/// creating the streams if needed; an existing group is left as it is.
async fn ensure_groups(shared: &Shared, names: &Names, start: &str) -> Result<()> {
    let mut pipe = Pipeline::with_capacity(2);
    pipe.cmd("XGROUP")
        .arg("CREATE")
        .arg(&names.stream)
        .arg(&names.group)
        .arg(start)
        .arg("MKSTREAM");
    pipe.cmd("XGROUP")
        .arg("CREATE")
        .arg(&names.retry)
        .arg(&names.group)
        .arg("0")
        .arg("MKSTREAM");
    let mut conn = shared.conn();
    let values = bounded(shared, conn.req_packed_commands(&pipe, 0, 2))
        .await?
        .map_err(|e| shared.err(e, "creating the consumer group failed"))?;
    for v in values {
        if let Value::ServerError(e) = v {
            if e.code() != "BUSYGROUP" {
                return Err(convert(
                    e.into(),
                    "creating the consumer group failed",
                    &shared.server,
                )
                .with_context("subscription", &names.group));
            }
        }
    }
    Ok(())
}

impl ConsumerCore {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("consumer")
                .with_context("topic", &self.topic)
                .with_context("subscription", &self.names.group));
        }
        self.shared.check_open()
    }

    fn own_entry(&self, message: &Message) -> Result<EntryRef> {
        let handle = message.ack_handle();
        match EntryRef::from_handle(handle) {
            Some(entry) if handle.consumer() == self.id => Ok(entry),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                "the message was received by another consumer; acknowledge it there",
            )
            .with_context("message_id", message.id())),
        }
    }

    /// Stops the tasks and hands back what this consumer held (or, when `unsubscribe`, deletes
    /// the subscription). Runs once; later calls return at once.
    pub(crate) async fn shutdown(&self, unsubscribe: bool) -> Result<()> {
        let _guard = self.shutdown_lock.lock().await;
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.stop.send_replace(true);
        self.stop_reader().await;
        // write out acknowledgements queued before the close
        let unfinished = self.acks.unfinished();
        if !unfinished.is_empty() {
            self.acks.wake.notify_one();
            let _ = tokio::time::timeout(self.shared.config.connect_timeout, async {
                for batch in &unfinished {
                    batch.wait().await;
                }
            })
            .await;
        }
        let mut conn = self.shared.conn();
        let result = if unsubscribe {
            let mut pipe = Pipeline::with_capacity(3);
            pipe.cmd("XGROUP")
                .arg("DESTROY")
                .arg(&self.names.stream)
                .arg(&self.names.group);
            pipe.cmd("DEL").arg(&self.names.retry);
            bounded(&self.shared, pipe.query_async::<()>(&mut conn))
                .await
                .and_then(|r| r.map_err(|e| self.shared.err(e, "deleting the subscription failed")))
        } else {
            let mut release = RELEASE.prepare_invoke();
            release
                .key(&self.names.stream)
                .key(&self.names.retry)
                .arg(&self.names.group)
                .arg(self.shared.config.max_len)
                .arg(&self.names.member);
            // bounded by the connect timeout: a close must not hang while Redis is away (a live
            // member reclaims what this one held after the visibility timeout)
            let fut = release.invoke_async::<i64>(&mut conn);
            let released = tokio::time::timeout(self.shared.config.connect_timeout, fut)
                .await
                .map_err(|_| {
                    Error::new(ErrorKind::Timeout, "Redis did not answer in time")
                        .with_context("server", &self.shared.server)
                });
            match released {
                Ok(Ok(n)) => {
                    if n > 0 {
                        tracing::debug!(topic = %self.topic, subscription = %self.names.group, released = n,
                            "handed unacknowledged messages back to the subscription");
                    }
                    Ok(())
                }
                Ok(Err(e)) => Err(self
                    .shared
                    .err(e, "handing back unacknowledged messages failed")),
                Err(e) => Err(e),
            }
        };
        if let Some(token) = &self.lease_token {
            let mut release = LEASE_RELEASE.prepare_invoke();
            release.key(&self.names.lease).arg(token);
            let fut = release.invoke_async::<i64>(&mut conn);
            let _ = tokio::time::timeout(self.shared.config.connect_timeout, fut).await;
        }
        for h in self.helpers.lock().drain(..) {
            h.abort();
        }
        if let Err(e) = &result {
            tracing::warn!(topic = %self.topic, subscription = %self.names.group, error = %e,
                "consumer close could not finish on the server; a live member reclaims what it held \
                 after the visibility timeout");
        }
        result
    }

    /// Interrupts the reader's blocking read (`CLIENT UNBLOCK`) and waits for it to end.
    async fn stop_reader(&self) {
        let Some(mut reader) = self.reader.lock().take() else {
            return;
        };
        let deadline =
            Instant::now() + self.shared.config.block + self.shared.config.connect_timeout;
        let mut conn = self.shared.conn();
        loop {
            let client = self.reader_client.load(Ordering::Acquire);
            if client > 0 {
                let mut unblock = redis::cmd("CLIENT");
                unblock.arg("UNBLOCK").arg(client);
                let _ = tokio::time::timeout(
                    Duration::from_millis(500),
                    unblock.query_async::<i64>(&mut conn),
                )
                .await;
            }
            match tokio::time::timeout(Duration::from_millis(50), &mut reader).await {
                Ok(_) => return,
                Err(_) if Instant::now() >= deadline => {
                    reader.abort();
                    return;
                }
                Err(_) => {}
            }
        }
    }
}

#[async_trait]
impl Consumer for StreamConsumer {
    fn topic(&self) -> &Topic {
        &self.core.topic
    }

    fn subscription(&self) -> &str {
        &self.core.names.group
    }

    async fn receive(&self, timeout: Duration) -> Result<Message> {
        let core = &self.core;
        core.check_open()?;
        let closed = || {
            core.check_open()
                .err()
                .unwrap_or_else(|| Error::closed("consumer"))
        };
        // fast path: a buffered message needs no timer
        if let Some(m) = core.inbox.try_pop() {
            return Ok(m);
        }
        match core.inbox.pop() {
            Popped::Message(m) => return Ok(m),
            Popped::Closed => return Err(closed()),
            Popped::Empty if timeout.is_zero() => return Err(receive_timeout(timeout)),
            Popped::Empty => {}
        }
        match core.inbox.pop_wait(timeout).await {
            Some(m) => {
                core.check_open()?;
                Ok(m)
            }
            None => {
                core.check_open()?;
                match core.inbox.pop() {
                    Popped::Message(m) => Ok(m),
                    Popped::Closed => Err(closed()),
                    Popped::Empty => Err(receive_timeout(timeout)),
                }
            }
        }
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        let core = &self.core;
        let entry = core.own_entry(message)?;
        core.check_open()?;
        match core.acks.push(entry).wait().await {
            Ok(()) => Ok(()),
            Err((ErrorKind::Closed, _)) => Err(Error::closed("consumer")),
            Err((kind, message)) => Err(Error::new(*kind, message.clone())
                .with_context("server", &core.shared.server)
                .with_context("subscription", &core.names.group)),
        }
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        let core = &self.core;
        let entry = core.own_entry(message)?;
        core.check_open()?;
        let src = if entry.retry {
            &core.names.retry
        } else {
            &core.names.stream
        };
        let mut conn = core.shared.conn();
        let mut nack = NACK.prepare_invoke();
        nack.key(src)
            .key(&core.names.retry)
            .arg(&core.names.group)
            .arg(core.shared.config.max_len)
            .arg(&entry.id);
        bounded(&core.shared, nack.invoke_async::<i64>(&mut conn))
            .await?
            .map(|_| ())
            .map_err(|e| core.shared.err(e, "negative acknowledgement failed"))
    }

    async fn unsubscribe(&self) -> Result<()> {
        self.core.check_open()?;
        self.core.shutdown(true).await
    }

    async fn close(&self) -> Result<()> {
        // a failure to hand back held messages is logged; the reclaimer of a live member
        // recovers them after the visibility timeout
        let _ = self.core.shutdown(false).await;
        Ok(())
    }
}

impl Drop for StreamConsumer {
    fn drop(&mut self) {
        if self.core.closed.load(Ordering::Acquire) {
            return;
        }
        let core = self.core.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = core.shutdown(false).await;
                });
            }
            Err(_) => {
                core.stop.send_replace(true);
            }
        }
    }
}

impl fmt::Debug for StreamConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStreamConsumer")
            .field("topic", &self.core.topic)
            .field("subscription", &self.core.names.group)
            .field("member", &self.core.names.member)
            .field("type", &self.core.consumer_type)
            .field("closed", &self.core.closed.load(Ordering::Relaxed))
            .finish()
    }
}

struct ReaderCtx {
    shared: Arc<Shared>,
    names: Names,
    consumer: u64,
    inbox: Arc<Inbox>,
    acks: Arc<AckQueue>,
    /// Messages of the last reply, decoded before they go to the inbox in one go.
    decoded: VecDeque<Message>,
    stop: watch::Receiver<bool>,
    active: watch::Receiver<bool>,
    client_id: Arc<AtomicI64>,
}

impl ReaderCtx {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps, returning early (false) when asked to stop.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.stopping(),
            _ = self.stop.changed() => false,
        }
    }

    /// Decodes every entry of an `XREADGROUP` reply (`[[stream, [[id, fields], …]], …]`, or a
    /// map of streams under RESP3) straight into messages.
    /// Returns the most entries one stream delivered.
    fn decode_reply(&mut self, reply: Value) -> usize {
        let streams: Vec<(Value, Value)> = match reply {
            Value::Array(items) => items
                .into_iter()
                .filter_map(|s| match s {
                    Value::Array(kv) if kv.len() == 2 => {
                        let mut it = kv.into_iter();
                        Some((it.next()?, it.next()?))
                    }
                    _ => None,
                })
                .collect(),
            Value::Map(pairs) => pairs,
            _ => return 0,
        };
        let mut most = 0;
        for (key, entries) in streams {
            let retry = as_bytes(&key) == Some(self.names.retry.as_bytes());
            let Value::Array(entries) = entries else {
                continue;
            };
            most = most.max(entries.len());
            self.decoded.reserve(entries.len());
            for e in entries {
                let Value::Array(parts) = e else { continue };
                let mut it = parts.into_iter();
                let (Some(id), Some(fields)) = (it.next(), it.next()) else {
                    continue;
                };
                let Some(id) = as_bytes(&id) else { continue };
                if let Some(msg) = self.message(retry, id, fields) {
                    self.decoded.push_back(msg);
                }
            }
        }
        most
    }

    fn message(&self, retry: bool, id: &[u8], fields: Value) -> Option<Message> {
        let entry = match decode_entry(fields) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(stream = %self.names.stream, id = %String::from_utf8_lossy(id), error = %e, "skipping an undecodable entry");
                return None;
            }
        };
        let entry_id = EntryId::from_bytes(id);
        // the message id is the original entry's (a retry copy names it in `o`)
        let (text, ms): (Arc<str>, Option<u64>) = match entry.original {
            Some(o) => {
                let ms = parse_id(o.as_bytes()).map(|(ms, _)| ms);
                (o.into(), ms)
            }
            None => {
                let ms = match entry_id {
                    EntryId::Packed { ms, .. } => Some(ms),
                    EntryId::Text(_) => None,
                };
                let text: Arc<str> = match std::str::from_utf8(id) {
                    Ok(t) => t.into(),
                    Err(_) => String::from_utf8_lossy(id).into(),
                };
                (text, ms)
            }
        };
        let entry_ref = EntryRef {
            retry,
            id: entry_id,
        };
        let mut msg = Message::new(
            entry.payload,
            entry.properties,
            MessageId::from_text(text),
            entry_ref.handle(self.consumer),
        );
        // (each `with_*` moves the whole message: only the ones that change something)
        if entry.redeliveries > 0 {
            msg = msg.with_redelivery_count(entry.redeliveries);
        }
        if entry.key.is_some() {
            msg = msg.with_key(entry.key);
        }
        if let Some(t) = ms.and_then(ms_time) {
            msg = msg.with_publish_time(t);
        }
        Some(msg)
    }
}

/// When the reader ends (also when aborted): receivers see the inbox close, and the
/// acknowledger takes over all acknowledgements.
struct ReaderExit(Arc<Inbox>, Arc<AckQueue>);

impl Drop for ReaderExit {
    fn drop(&mut self) {
        self.0.close();
        self.1.reader_away();
    }
}

/// Reads batches with `XREADGROUP` (retry stream first) into the consumer's buffer, carrying the
/// pending acknowledgements along; blocking only when the last read was not a full batch.
/// Reconnects by itself, and reads only while the consumer is active (failover/exclusive).
async fn run_reader(mut ctx: ReaderCtx) {
    let batch = ctx.shared.config.batch;
    let block_ms = ctx.shared.config.block.as_millis().max(1) as u64;
    let read_timeout =
        ctx.shared.config.block + ctx.shared.config.connect_timeout + Duration::from_secs(1);
    let mut conn: Option<MultiplexedConnection> = None;
    let mut delay = Duration::from_millis(50);
    let inbox = ctx.inbox.clone();
    let acks = ctx.acks.clone();
    let _exit = ReaderExit(inbox.clone(), acks.clone());
    let mut ids_fmt = IdFormatter::default();
    let (mut ack_main, mut ack_retry) = (Vec::new(), Vec::new());
    // block on the first read; after a full batch, read without blocking (more is likely
    // there, and acknowledgements may then wait for the next read to go along)
    let mut blocking = true;
    loop {
        if ctx.stopping() {
            break;
        }
        if !*ctx.active.borrow_and_update() {
            acks.reader_away();
            tokio::select! {
                r = ctx.active.changed() => if r.is_err() { break },
                _ = ctx.stop.changed() => {},
            }
            continue;
        }
        // wait for room for a batch (the buffer holds at most about twice the batch, three
        // times when both streams deliver a full batch at once)
        if !inbox.has_room(batch) {
            acks.reader_away();
            tokio::select! {
                _ = inbox.wait_room(batch) => {},
                _ = ctx.stop.changed() => continue,
            }
        }
        if conn.is_none() {
            acks.reader_away();
            blocking = true;
            match ctx.shared.dedicated_connection().await {
                Ok(mut c) => match redis::cmd("CLIENT")
                    .arg("ID")
                    .query_async::<i64>(&mut c)
                    .await
                {
                    Ok(id) => {
                        ctx.client_id.store(id, Ordering::Release);
                        conn = Some(c);
                    }
                    Err(e) => tracing::debug!(error = %e, "CLIENT ID failed"),
                },
                Err(e) => tracing::debug!(error = %e, "reader cannot connect yet"),
            }
            if conn.is_none() {
                if !ctx.pause(delay).await {
                    break;
                }
                delay = (delay * 2).min(Duration::from_secs(1));
                continue;
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&ctx.names.group)
            .arg(&ctx.names.member)
            .arg("COUNT")
            .arg(batch);
        if blocking {
            cmd.arg("BLOCK").arg(block_ms);
        }
        cmd.arg("STREAMS")
            .arg(&ctx.names.retry)
            .arg(&ctx.names.stream)
            .arg(">")
            .arg(">");
        // pending acknowledgements go along, written before the read in the same write
        let along = acks
            .take_for_read(&mut ack_main, &mut ack_retry, !blocking)
            .map(|batch| {
                let pipe = ack_pipeline(&ctx.names, &ack_main, &ack_retry, &mut ids_fmt);
                ack_main.clear();
                ack_retry.clear();
                AlongWrite {
                    shared: ctx.shared.clone(),
                    queue: acks.clone(),
                    pipe,
                    batch,
                    finished: false,
                }
            });
        let ack_conn = along.as_ref().map(|_| c.clone());
        // the raw reply: `query_async` would first walk and rebuild the whole reply looking for
        // nested errors, which an XREADGROUP reply cannot hold (only a top-level one)
        let read = async {
            tokio::time::timeout(read_timeout, c.req_packed_command(&cmd))
                .await
                .map(|r| match r {
                    Ok(Value::ServerError(e)) => Err(redis::RedisError::from(e)),
                    other => other,
                })
        };
        let reply = match (along, ack_conn) {
            (Some(along), Some(ack_conn)) => tokio::join!(along.run(ack_conn), read).1,
            _ => read.await,
        };
        if !matches!(reply, Ok(Ok(_))) {
            acks.reader_away();
            blocking = true;
        }
        let reply = match reply {
            Ok(Ok(v)) => {
                delay = Duration::from_millis(50);
                v
            }
            Ok(Err(e)) if e.code() == Some("NOGROUP") => {
                // the group or a stream vanished (a restart without persistence, or unsubscribe):
                // recreate it at the start so nothing written since is lost
                tracing::info!(stream = %ctx.names.stream, group = %ctx.names.group, "consumer group missing; recreating it");
                if ensure_groups(&ctx.shared, &ctx.names, "0").await.is_err()
                    && !ctx.pause(delay).await
                {
                    break;
                }
                continue;
            }
            Ok(Err(e)) => {
                if is_connection_error(&e) {
                    tracing::debug!(error = %e, "reader lost its connection; reconnecting");
                } else {
                    tracing::warn!(stream = %ctx.names.stream, error = %e, "XREADGROUP failed");
                }
                conn = None;
                ctx.client_id.store(0, Ordering::Release);
                if !ctx.pause(delay).await {
                    break;
                }
                delay = (delay * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(_) => {
                conn = None;
                ctx.client_id.store(0, Ordering::Release);
                continue;
            }
        };
        if ctx.stopping() {
            // the entries stay pending for this member; close hands them back
            break;
        }
        blocking = ctx.decode_reply(reply) < batch;
        inbox.push_all(&mut ctx.decoded);
    }
}

/// Writes acknowledgements in batches: `XACK` on the topic stream, `XACK` + `XDEL` on the retry
/// stream (only this subscription reads it). Each `acknowledge` waits for its batch.
async fn run_acker(shared: Arc<Shared>, names: Names, queue: Arc<AckQueue>) {
    /// Fails what is left when the acknowledger ends (aborted on close, or the runtime ends).
    struct FailLeft(Arc<AckQueue>);
    impl Drop for FailLeft {
        fn drop(&mut self) {
            self.0.fail_all();
        }
    }
    let _fail_left = FailLeft(queue.clone());
    let mut ids_fmt = IdFormatter::default();
    let mut main: Vec<EntryId> = Vec::new();
    let mut retry: Vec<EntryId> = Vec::new();
    loop {
        let Some(batch) = queue.take(&mut main, &mut retry) else {
            queue.wake.notified().await;
            continue;
        };
        let pipe = ack_pipeline(&names, &main, &retry, &mut ids_fmt);
        let result = write_acks(&shared, &pipe).await;
        batch.set(result.map_err(|e| (e.kind(), e.message().to_owned())));
        queue.done(&batch);
        main.clear();
        retry.clear();
    }
}

/// XACK is idempotent, so a batch is simply written again after a reconnect.
async fn write_acks(shared: &Shared, pipe: &Pipeline) -> Result<()> {
    let deadline = Instant::now() + shared.config.send_timeout;
    let mut conn = shared.conn();
    let mut delay = Duration::from_millis(20);
    loop {
        match tokio::time::timeout_at(deadline, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if is_connection_error(&e) && Instant::now() + delay < deadline => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Ok(Err(e)) => return Err(shared.err(e, "acknowledging failed")),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "Redis did not confirm the acknowledgement in time",
                )
                .with_context("server", &shared.server))
            }
        }
    }
}

/// At start and every half visibility timeout: moves messages that crashed members held too long
/// to the retry stream, and removes idle empty members.
async fn run_reclaimer(shared: Arc<Shared>, names: Names, mut stop: watch::Receiver<bool>) {
    let vt = shared.config.visibility_timeout;
    let every = (vt / 2).max(Duration::from_millis(200));
    loop {
        let mut conn = shared.conn();
        let mut reclaim = RECLAIM.prepare_invoke();
        reclaim
            .key(&names.stream)
            .key(&names.retry)
            .arg(&names.group)
            .arg(shared.config.max_len)
            .arg(vt.as_millis() as u64)
            .arg(RECLAIM_CONSUMER)
            .arg(100);
        match tokio::time::timeout(
            shared.config.send_timeout,
            reclaim.invoke_async::<i64>(&mut conn),
        )
        .await
        {
            Ok(Ok(n)) if n > 0 => {
                tracing::info!(stream = %names.stream, group = %names.group, reclaimed = n,
                    "reclaimed messages a crashed consumer held longer than the visibility timeout")
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "reclaim failed"),
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {},
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Keeps the lease of an exclusive/failover consumer, or waits to take it over (standby).
async fn run_lease(
    shared: Arc<Shared>,
    key: String,
    token: String,
    active: Arc<watch::Sender<bool>>,
    mut stop: watch::Receiver<bool>,
) {
    let lease = shared.config.lease;
    let ms = lease.as_millis() as u64;
    let renew_every = lease / 3;
    let poll = (lease / 5).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut last_ok = Instant::now();
    loop {
        let is_active = *active.borrow();
        tokio::select! {
            _ = tokio::time::sleep(if is_active { renew_every } else { poll }) => {},
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let mut conn = shared.conn();
        if is_active {
            let mut renew = LEASE_RENEW.prepare_invoke();
            renew.key(&key).arg(&token).arg(ms);
            match tokio::time::timeout(renew_every, renew.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(1)) => last_ok = Instant::now(),
                Ok(Ok(_)) => {
                    // expired (or lost with the server's data): take it again if nobody else did
                    if try_acquire(&shared, &key, &token).await.unwrap_or(false) {
                        last_ok = Instant::now();
                    } else {
                        tracing::warn!(lease = %key, "lost the subscription lease to another consumer; standing by");
                        active.send_replace(false);
                    }
                }
                _ => {
                    if last_ok.elapsed() > lease {
                        tracing::warn!(lease = %key, "cannot renew the subscription lease; standing by");
                        active.send_replace(false);
                    }
                }
            }
        } else if try_acquire(&shared, &key, &token).await.unwrap_or(false) {
            tracing::debug!(lease = %key, "took over the subscription lease");
            last_ok = Instant::now();
            active.send_replace(true);
        }
    }
}
