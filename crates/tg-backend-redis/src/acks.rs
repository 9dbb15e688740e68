//! Acknowledgements of a stream consumer: which entry an [`AckHandle`] names ([`EntryRef`]), the
//! batch they wait in ([`AckQueue`]), and who writes a batch — the reader along with its next read
//! ([`AlongWrite`]) or the acknowledger task ([`run_acker`]).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Pipeline, Value};
use tg_backend_api::{AckHandle, Backoff, ErrorKind, Result};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::completion::Completion;
use crate::core::Core;
use crate::entry::{EntryId, IdFormatter};
use crate::error::is_connection_error;
use crate::topic::Names;

/// Ids in one `XACK` at most (a larger batch is written as several in one pipeline).
const ACK_BATCH: usize = 1024;
/// Retrying a batch after a connection loss, within the send timeout.
const RETRY: Backoff = Backoff {
    initial: Duration::from_millis(20),
    max: Duration::from_millis(500),
    factor: 2.0,
    jitter: false,
};

/// Which stream a delivered entry lives in, and its id there.
#[derive(Debug, Clone)]
pub struct EntryRef {
    /// In the retry stream (else the topic stream).
    pub retry: bool,
    /// The entry id in that stream.
    pub id: EntryId,
}

/// Bits of the [`AckHandle`] number: `1 | retry | ms (42 bits, until 2109) | seq (20 bits)`.
/// A handle number without the top bit carries the [`EntryRef`] as its extra instead.
const PACKED: u64 = 1 << 63;
const RETRY_BIT: u64 = 1 << 62;
const SEQ_BITS: u32 = 20;
const MS_BITS: u32 = 42;

impl EntryRef {
    /// The ack handle of `consumer` carrying this entry (packed into its number when it fits).
    pub fn handle(self, consumer: u64) -> AckHandle {
        if let EntryId::Packed { ms, seq } = self.id {
            if ms < (1 << MS_BITS) && seq < (1 << SEQ_BITS) {
                let retry = if self.retry { RETRY_BIT } else { 0 };
                return AckHandle::new(consumer, PACKED | retry | (ms << SEQ_BITS) | seq);
            }
        }
        AckHandle::new(consumer, 0).with_extra(self)
    }

    /// The entry an ack handle of [`EntryRef::handle`] carries.
    pub fn from_handle(handle: &AckHandle) -> Option<Self> {
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

/// How an `XACK` batch ended: the error's kind and message on failure.
pub(crate) type AckOutcome = std::result::Result<(), (ErrorKind, String)>;

/// One batch of acknowledgements: every `acknowledge` in it waits for this.
pub(crate) type AckBatch = Arc<Completion<AckOutcome>>;

/// Acknowledgements waiting to be written: `acknowledge` appends its id under a lock and waits
/// for its batch's [`Completion`] (no channel, no per-message allocation).
///
/// Who writes a batch: while the reader is about to send a read that returns at once (the last
/// one was a full batch), the reader takes what is pending and sends the `XACK`s on its own
/// connection in the same write as the `XREADGROUP` — one round trip for both, as a hand-written
/// client would do. Otherwise (the reader blocks, waits for room, reconnects or stands by) the
/// first acknowledgement of a batch wakes the acknowledger task, which writes on the shared
/// connection.
pub(crate) struct AckQueue {
    state: Mutex<AckState>,
    /// Wakes the acknowledger.
    pub(crate) wake: Notify,
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
    /// The reader ended: it reads no more.
    reader_gone: bool,
}

impl AckQueue {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(AckState {
                main: Vec::new(),
                retry: Vec::new(),
                current: Arc::new(Completion::new()),
                writing: Vec::new(),
                reader_reading: false,
                reader_gone: false,
            }),
            wake: Notify::new(),
        }
    }

    /// Queues one acknowledgement; returns its batch.
    pub(crate) fn push(&self, entry: EntryRef) -> AckBatch {
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

    /// Queues several acknowledgements under one lock, so they all join one batch (one `XACK`
    /// per stream, written in one round trip); returns that batch.
    pub(crate) fn push_all(&self, entries: impl IntoIterator<Item = EntryRef>) -> AckBatch {
        let mut s = self.state.lock();
        let first = s.main.is_empty() && s.retry.is_empty();
        for entry in entries {
            if entry.retry {
                s.retry.push(entry.id);
            } else {
                s.main.push(entry.id);
            }
        }
        let batch = s.current.clone();
        let wake = first && !s.reader_reading && !(s.main.is_empty() && s.retry.is_empty());
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
    pub(crate) fn take_for_read(
        &self,
        main: &mut Vec<EntryId>,
        retry: &mut Vec<EntryId>,
        soon: bool,
    ) -> Option<AckBatch> {
        let mut s = self.state.lock();
        s.reader_reading = soon;
        Self::take_locked(&mut s, main, retry)
    }

    /// A receiver made the room the reader waited for: it reads next, and takes what is
    /// pending along (unless it stops, stands by or reconnects first; each of those calls
    /// [`AckQueue::reader_away`]).
    pub(crate) fn reader_soon(&self) {
        let mut s = self.state.lock();
        if !s.reader_gone {
            s.reader_reading = true;
        }
    }

    /// The reader ended: the acknowledger writes everything from now on.
    pub(crate) fn reader_gone(&self) {
        self.state.lock().reader_gone = true;
        self.reader_away();
    }

    /// The reader will not read soon (it blocks, waits for room, reconnects, stands by or
    /// stopped): the acknowledger takes over what is pending and what comes.
    pub(crate) fn reader_away(&self) {
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
    pub(crate) fn done(&self, batch: &AckBatch) {
        self.state.lock().writing.retain(|w| !Arc::ptr_eq(w, batch));
    }

    /// The batches that complete once everything acknowledged so far is written.
    pub(crate) fn unfinished(&self) -> Vec<AckBatch> {
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
pub(crate) fn ack_pipeline(
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
pub(crate) struct AlongWrite {
    core: Arc<Core>,
    queue: Arc<AckQueue>,
    pipe: Pipeline,
    batch: AckBatch,
    finished: bool,
}

impl AlongWrite {
    pub(crate) fn new(
        core: Arc<Core>,
        queue: Arc<AckQueue>,
        pipe: Pipeline,
        batch: AckBatch,
    ) -> Self {
        Self {
            core,
            queue,
            pipe,
            batch,
            finished: false,
        }
    }

    /// Writes the batch on the reader's connection, waiting at most `within` for the reply (what
    /// the read it goes along with waits): on a silent network the reply never comes, and the
    /// read that joins this must not wait for it for good.
    pub(crate) async fn run(mut self, mut conn: MultiplexedConnection, within: Duration) {
        let n = self.pipe.len();
        let reply = tokio::time::timeout(within, conn.req_packed_commands(&self.pipe, 0, n)).await;
        drop(conn);
        let outcome = match reply {
            // the reader's connection went silent: write them on the shared one (XACK is
            // idempotent)
            Err(_) => write_acks(&self.core, &self.pipe).await,
            Ok(Ok(values)) => match values.into_iter().find_map(|v| match v {
                Value::ServerError(e) => Some(e),
                _ => None,
            }) {
                None => Ok(()),
                Some(e) => Err(self.core.err(e.into(), "acknowledging failed")),
            },
            // the reader's connection broke: write them on the shared one (retrying)
            Ok(Err(e)) if is_connection_error(&e) => write_acks(&self.core, &self.pipe).await,
            Ok(Err(e)) => Err(self.core.err(e, "acknowledging failed")),
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
        let (core, queue, batch) = (self.core.clone(), self.queue.clone(), self.batch.clone());
        let pipe = std::mem::replace(&mut self.pipe, Pipeline::new());
        let finish = async move {
            let outcome = write_acks(&core, &pipe).await;
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

/// Writes acknowledgements in batches: `XACK` on the topic stream, `XACK` + `XDEL` on the retry
/// stream (only this subscription reads it). Each `acknowledge` waits for its batch.
pub(crate) async fn run_acker(core: Arc<Core>, names: Names, queue: Arc<AckQueue>) {
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
        let result = write_acks(&core, &pipe).await;
        batch.set(result.map_err(|e| (e.kind(), e.message().to_owned())));
        queue.done(&batch);
        main.clear();
        retry.clear();
    }
}

/// XACK is idempotent, so a batch is simply written again after a reconnect.
async fn write_acks(core: &Core, pipe: &Pipeline) -> Result<()> {
    let deadline = Instant::now() + core.config.send_timeout;
    let mut conn = core.conn();
    let mut retry = 0;
    loop {
        match tokio::time::timeout_at(deadline, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e))
                if is_connection_error(&e)
                    && Instant::now() + RETRY.ceiling(retry + 1) < deadline =>
            {
                retry += 1;
                tokio::time::sleep(RETRY.delay(retry)).await;
            }
            Ok(Err(e)) => return Err(core.err(e, "acknowledging failed")),
            Err(_) => return Err(core.timeout("Redis did not confirm the acknowledgement in time")),
        }
    }
}
