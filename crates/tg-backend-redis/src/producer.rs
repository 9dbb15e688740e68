//! The producer: `send` copies the message's parts into the last batch of a bounded queue (no
//! allocation, no channel per message); a writer task turns each batch into a pipeline of
//! `PUBLISH` (q0), `XADD` (q1) or the de-duplicating script (q2) and writes one pipeline at a
//! time. Each batch has one [`Completion`] that its receipts wait on.
//!
//! The commands are built (and freed) by the writer, not by the sending task: with the system
//! allocator, commands allocated by one thread and freed by another in bursts of a thousand cost
//! more than building them.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionLike;
use redis::{Pipeline, Value};
use tg_backend_api::kit::RawProducer;
use tg_backend_api::{
    Backoff, Error, ErrorKind, MessageId, OutboundMessage, ProducerOptions, Qos, Result,
    SendReceipt, Topic, DEDUP_ID_PROPERTY,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::completion::Completion;
use crate::core::Core;
use crate::entry::{as_bytes, push_fields};
use crate::error::{convert, is_connection_error};
use crate::frame::{now_ms, FrameArg};
use crate::record::{encode_record, Record};
use crate::scripts::DEDUP_XADD;
use crate::topic::TopicKeys;

/// Messages a producer queues before `send` waits: the batch being written and the next one.
const QUEUE: usize = 2 * MAX_BATCH;
/// Most commands in one pipeline.
const MAX_BATCH: usize = 1024;
/// How many times the writer yields to let a busy producer fill a batch.
const LINGER_YIELDS: usize = 16;
/// Retrying a pipeline after a connection loss, within the send timeout.
const RETRY: Backoff = Backoff {
    initial: Duration::from_millis(20),
    max: Duration::from_millis(500),
    factor: 2.0,
    jitter: false,
};

/// How a pipeline ended.
enum Outcome {
    /// Redis answered, one reply per command; q0 ids are `seq` + the command's index.
    Replies { seq: u64, values: Vec<Value> },
    /// Writing failed (kind, message).
    Failed(ErrorKind, String),
    /// The writer ended before it wrote the pipeline.
    Closed,
}

/// One pipeline's outcome, which its receipts wait for.
struct Batch {
    done: Completion<Outcome>,
    core: Arc<Core>,
}

impl Batch {
    /// The receipt of the `index`-th command, once the batch completed.
    fn reply(&self, index: usize) -> Result<MessageId> {
        let server = &self.core.server;
        match self.done.get() {
            Some(Outcome::Replies { seq, values }) => match values.get(index) {
                Some(Value::ServerError(e)) => Err(convert(
                    e.clone().into(),
                    "Redis refused the message",
                    server,
                )),
                Some(Value::Int(_)) => Ok(MessageId::from_u64(seq + index as u64)),
                Some(v) => match as_bytes(v).and_then(|b| std::str::from_utf8(b).ok()) {
                    Some(id) => Ok(MessageId::from_text(id)),
                    None => Err(Error::new(
                        ErrorKind::Unexpected,
                        "unexpected reply to a send",
                    )),
                },
                None => Err(Error::new(ErrorKind::Unexpected, "missing reply to a send")),
            },
            Some(Outcome::Failed(kind, message)) => {
                Err(Error::new(*kind, message.clone()).with_context("server", server))
            }
            Some(Outcome::Closed) | None => Err(Error::new(
                ErrorKind::Closed,
                "the producer closed before the broker confirmed the message; it may or may not \
                 have been delivered",
            )),
        }
    }
}

/// A batch being filled or waiting for the writer: its messages as [`Record`]s.
struct Pending {
    records: Vec<u8>,
    n: usize,
    batch: Arc<Batch>,
}

struct QueueState {
    pending: VecDeque<Pending>,
    /// Messages in `pending`.
    queued: usize,
    /// The batch being written.
    writing: Option<Arc<Batch>>,
    /// The producer is gone: the writer ends once everything queued is written.
    dropped: bool,
    /// The writer ended: sends fail.
    writer_gone: bool,
    /// Record buffers of written batches, for reuse.
    spare: Vec<Vec<u8>>,
}

/// The queue between `send` and the writer.
struct Queue {
    state: Mutex<QueueState>,
    /// Wakes the writer (the first message after the queue was empty).
    wake: Notify,
    /// Wakes senders waiting for room.
    room: Notify,
}

impl Queue {
    fn new() -> Self {
        Self {
            state: Mutex::new(QueueState {
                pending: VecDeque::new(),
                queued: 0,
                writing: None,
                dropped: false,
                writer_gone: false,
                spare: Vec::new(),
            }),
            wake: Notify::new(),
            room: Notify::new(),
        }
    }

    /// Appends a message to the last batch (a new one when it is full), waiting while the queue
    /// is full; its batch and index, or `None` when the writer ended.
    async fn push(
        &self,
        message: &OutboundMessage,
        core: &Arc<Core>,
    ) -> Option<(Arc<Batch>, usize)> {
        loop {
            {
                let mut s = self.state.lock();
                if s.writer_gone {
                    return None;
                }
                if s.queued < QUEUE {
                    let was_empty = s.queued == 0;
                    s.queued += 1;
                    if s.pending.back().is_none_or(|p| p.n >= MAX_BATCH) {
                        let records = s.spare.pop().unwrap_or_default();
                        s.pending.push_back(Pending {
                            records,
                            n: 0,
                            batch: Arc::new(Batch {
                                done: Completion::new(),
                                core: core.clone(),
                            }),
                        });
                    }
                    let last = s.pending.back_mut()?;
                    encode_record(
                        &mut last.records,
                        message.payload(),
                        message.properties(),
                        message.key_str(),
                    );
                    let index = last.n;
                    last.n += 1;
                    let batch = last.batch.clone();
                    drop(s);
                    if was_empty {
                        self.wake.notify_one();
                    }
                    return Some((batch, index));
                }
            }
            // full: wait until the writer takes a pipeline
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.state.lock();
                if s.writer_gone {
                    return None;
                }
                if s.queued < QUEUE {
                    continue;
                }
            }
            notified.await;
        }
    }

    /// Appends messages in order, each run of at most [`MAX_BATCH`] to one batch (so it goes
    /// out as one pipeline), waiting until the queue has room for a whole run; each message's
    /// batch and index, or `None` when the writer ended (what was queued then fails `Closed`).
    async fn push_batch(
        &self,
        messages: &[OutboundMessage],
        core: &Arc<Core>,
    ) -> Option<Vec<(Arc<Batch>, usize)>> {
        let mut placed = Vec::with_capacity(messages.len());
        for run in messages.chunks(MAX_BATCH) {
            loop {
                let notified = self.room.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let mut s = self.state.lock();
                    if s.writer_gone {
                        return None;
                    }
                    if s.queued == 0 || s.queued + run.len() <= QUEUE {
                        let was_empty = s.queued == 0;
                        s.queued += run.len();
                        if s.pending.back().is_none_or(|p| p.n + run.len() > MAX_BATCH) {
                            let records = s.spare.pop().unwrap_or_default();
                            s.pending.push_back(Pending {
                                records,
                                n: 0,
                                batch: Arc::new(Batch {
                                    done: Completion::new(),
                                    core: core.clone(),
                                }),
                            });
                        }
                        let last = s.pending.back_mut()?;
                        for message in run {
                            encode_record(
                                &mut last.records,
                                message.payload(),
                                message.properties(),
                                message.key_str(),
                            );
                            placed.push((last.batch.clone(), last.n));
                            last.n += 1;
                        }
                        drop(s);
                        if was_empty {
                            self.wake.notify_one();
                        }
                        break;
                    }
                }
                notified.await;
            }
        }
        Some(placed)
    }

    /// The batch that completes after everything queued so far, if any.
    fn last_batch(&self) -> Option<Arc<Batch>> {
        let s = self.state.lock();
        match s.pending.back() {
            Some(p) => Some(p.batch.clone()),
            None => s.writing.clone(),
        }
    }
}

impl Queue {
    /// The producer is closed or gone: the writer writes what is queued, then ends.
    fn finish(&self) {
        self.state.lock().dropped = true;
        self.wake.notify_one();
    }
}

/// The Redis producer (as the kit sees it; applications get it as a `Box<dyn Producer>`).
pub struct RedisProducer {
    core: Arc<Core>,
    topic: Topic,
    queue: Arc<Queue>,
}

impl RedisProducer {
    pub(crate) fn new(core: Arc<Core>, topic: Topic, options: &ProducerOptions) -> Self {
        let commands = Commands {
            qos: topic.qos(),
            keys: TopicKeys::new(&core.config.prefix, &topic),
            max_len: core.config.max_len.to_string(),
            dedup_window: core.config.dedup_window.as_secs().max(1).to_string(),
        };
        let queue = Arc::new(Queue::new());
        let send_timeout = options.send_timeout.unwrap_or(core.config.send_timeout);
        // batching(false): every message goes out as soon as the writer sees it (no lingering);
        // messages that queued up meanwhile still share a pipeline
        let linger = options.batching.unwrap_or(true);
        tokio::spawn(run_writer(
            core.clone(),
            commands,
            queue.clone(),
            send_timeout,
            linger,
        ));
        Self { core, topic, queue }
    }

    fn closed(&self) -> Error {
        Error::closed("producer").with_context("topic", &self.topic)
    }
}

impl Drop for RedisProducer {
    fn drop(&mut self) {
        self.queue.finish();
    }
}

/// What the writer needs to turn records into commands.
struct Commands {
    qos: Qos,
    keys: TopicKeys,
    /// `max_len` as a command argument.
    max_len: String,
    /// The de-duplication window in seconds, as a command argument.
    dedup_window: String,
}

impl Commands {
    fn command(&self, record: &Record<'_>, time_ms: u64) -> redis::Cmd {
        let main = &self.keys.main;
        match self.qos {
            Qos::Q0 => {
                let frame = FrameArg { record, time_ms };
                let mut cmd = redis::Cmd::with_capacity(3, 7 + main.len() + frame.len());
                cmd.arg("PUBLISH").arg(main).arg(frame);
                cmd
            }
            Qos::Q1 => {
                let mut cmd = redis::Cmd::with_capacity(
                    9 + 2 * record.property_count(),
                    64 + main.len() + record.payload.len() + record.properties_len(),
                );
                cmd.arg("XADD")
                    .arg(main)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(&self.max_len)
                    .arg("*");
                push_fields(&mut cmd, record);
                cmd
            }
            Qos::Q2 => {
                // `send` set the id; a record without one (cannot happen) is de-duplicated on ""
                let id = record
                    .property(DEDUP_ID_PROPERTY)
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                let mut cmd = redis::Cmd::with_capacity(
                    10 + 2 * record.property_count(),
                    160 + 2 * main.len() + record.payload.len() + record.properties_len(),
                );
                cmd.arg("EVALSHA")
                    .arg(DEDUP_XADD.get_hash())
                    .arg(2)
                    .arg(main)
                    .arg(self.keys.dedup(&id))
                    .arg(&self.max_len)
                    .arg(&self.dedup_window);
                push_fields(&mut cmd, record);
                cmd
            }
        }
    }
}

impl RawProducer for RedisProducer {
    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        // a send never waits while there is room: keep other tasks of this worker running
        tokio::task::coop::consume_budget().await;
        let Some((batch, index)) = self.queue.push(&message, &self.core).await else {
            return Err(self.closed());
        };
        Ok(SendReceipt::from_future(async move {
            batch.done.wait().await;
            batch.reply(index)
        }))
    }

    /// The messages go into the producer's queue together, at most 1,024 to a batch, so each
    /// such run is written as one pipeline (`XADD`s, q2 scripts or `PUBLISH`es) — the same
    /// commands, in order, as single sends; one receipt per message.
    async fn send_batch(&self, messages: Vec<OutboundMessage>) -> Result<Vec<SendReceipt>> {
        tokio::task::coop::consume_budget().await;
        let Some(placed) = self.queue.push_batch(&messages, &self.core).await else {
            return Err(self.closed());
        };
        Ok(placed
            .into_iter()
            .map(|(batch, index)| {
                SendReceipt::from_future(async move {
                    batch.done.wait().await;
                    batch.reply(index)
                })
            })
            .collect())
    }

    async fn flush(&self) -> Result<()> {
        if let Some(batch) = self.queue.last_batch() {
            if let Outcome::Closed = batch.done.wait().await {
                return Err(self.closed());
            }
        } else if self.queue.state.lock().writer_gone {
            return Err(self.closed());
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let flushed = self.flush().await;
        self.queue.finish();
        flushed
    }

    /// Dropped without `close`: the writer still writes what is queued (nobody awaits it), then
    /// ends; nothing to await here.
    fn close_sync(&self) -> bool {
        self.queue.finish();
        true
    }
}

impl fmt::Debug for RedisProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisProducer")
            .field("topic", &self.topic)
            .field("server", &self.core.server)
            .finish()
    }
}

/// Fails what is left when the writer ends (the runtime shut down): receipts, flushes and
/// senders waiting for room see `Closed` instead of waiting for ever.
struct WriterGone(Arc<Queue>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        let mut s = self.0.state.lock();
        s.writer_gone = true;
        for p in s.pending.drain(..) {
            p.batch.done.set(Outcome::Closed);
        }
        s.queued = 0;
        if let Some(w) = s.writing.take() {
            w.done.set(Outcome::Closed);
        }
        drop(s);
        self.0.room.notify_waiters();
    }
}

/// Writes the queued pipelines one after the other.
async fn run_writer(
    core: Arc<Core>,
    commands: Commands,
    queue: Arc<Queue>,
    send_timeout: Duration,
    linger: bool,
) {
    let _gone = WriterGone(queue.clone());
    let qos = commands.qos;
    let mut pipe = Pipeline::with_capacity(MAX_BATCH);
    let mut seq = 0u64;
    let mut last_batch = 0usize;
    loop {
        let front = {
            let s = queue.state.lock();
            match s.pending.front() {
                Some(p) => Some((p.n, s.pending.len())),
                None if s.dropped => return,
                None => None,
            }
        };
        // (the writer ends with its producer: closing the backend closes every producer first)
        let Some((mut n, count)) = front else {
            queue.wake.notified().await;
            continue;
        };
        // Under load (the last batch had company), give the senders a moment to fill this batch:
        // fewer, larger pipelines cost Redis and both ends far less per message. A lone message
        // of an idle producer goes out at once.
        if linger && last_batch > 1 && count == 1 {
            for _ in 0..LINGER_YIELDS {
                if n >= MAX_BATCH {
                    break;
                }
                tokio::task::yield_now().await;
                let now = queue.state.lock().pending.front().map_or(0, |p| p.n);
                if now == n {
                    break;
                }
                n = now;
            }
        }
        let pending = {
            let mut s = queue.state.lock();
            let Some(p) = s.pending.pop_front() else {
                continue;
            };
            s.queued -= p.n;
            s.writing = Some(p.batch.clone());
            p
        };
        // also when the queue was not full: a `send_batch` may wait for room for a whole run
        queue.room.notify_waiters();
        let Pending {
            mut records,
            n,
            batch,
        } = pending;
        last_batch = n;
        // one publish time per q0 batch: its messages are written together
        let time_ms = if qos == Qos::Q0 { now_ms() } else { 0 };
        let mut rest = &records[..];
        while let Some(record) = Record::decode(&mut rest) {
            pipe.add_command(commands.command(&record, time_ms));
        }
        let outcome = if pipe.len() == n {
            write_batch(&core, qos, &pipe, n, send_timeout, &mut seq).await
        } else {
            Outcome::Failed(
                ErrorKind::Unexpected,
                "a queued message was corrupt".to_owned(),
            )
        };
        pipe.clear();
        batch.done.set(outcome);
        records.clear();
        let mut s = queue.state.lock();
        if s.writing.as_ref().is_some_and(|w| Arc::ptr_eq(w, &batch)) {
            s.writing = None;
        }
        if s.spare.len() < 2 {
            s.spare.push(records);
        }
    }
}

async fn write_batch(
    core: &Core,
    qos: Qos,
    pipe: &Pipeline,
    n: usize,
    send_timeout: Duration,
    seq: &mut u64,
) -> Outcome {
    let deadline = Instant::now() + send_timeout;
    let mut conn = core.conn();
    let mut retry = 0;
    loop {
        match tokio::time::timeout_at(deadline, conn.req_packed_commands(pipe, 0, n)).await {
            Err(_) => {
                return Outcome::Failed(
                    ErrorKind::Timeout,
                    format!(
                        "Redis did not confirm the message within the send timeout of \
                         {send_timeout:?}; it may or may not have been stored"
                    ),
                )
            }
            Ok(Ok(values)) => {
                let noscript = qos == Qos::Q2
                    && values
                        .iter()
                        .any(|v| matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT"));
                if noscript {
                    // the server lost its script cache (restart): load and write the batch again;
                    // the de-duplication keys make the messages that did get through idempotent
                    let _ = DEDUP_XADD.prepare_invoke().load_async(&mut conn).await;
                    continue;
                }
                let base = *seq;
                *seq += n as u64;
                return Outcome::Replies { seq: base, values };
            }
            Ok(Err(e))
                if is_connection_error(&e)
                    && Instant::now() + RETRY.ceiling(retry + 1) < deadline =>
            {
                retry += 1;
                tracing::debug!(server = %core.server, error = %e, "send failed; retrying after reconnect");
                tokio::time::sleep(RETRY.delay(retry)).await;
            }
            Ok(Err(e)) => {
                let e = core.err(e, "sending to Redis failed");
                return Outcome::Failed(e.kind(), e.message().to_owned());
            }
        }
    }
}
