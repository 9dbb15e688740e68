//! q1/q2 consumers: a member of the subscription's consumer group on the topic stream and on the
//! subscription's retry stream ([`StreamConsumer`]); and [`RedisConsumer`], which is either that or
//! a q0 consumer (`q0.rs`).
//!
//! Tasks per stream consumer: a reader (`XREADGROUP` on its own connection into a small bounded
//! [`Inbox`] that `receive` takes from; blocking only when the last read was not a full batch;
//! pending acknowledgements go along with each read, as `XACK`s in the same write), an
//! acknowledger (writes the `XACK`s the reader will not carry soon, e.g. while it blocks;
//! `acknowledge` waits for its batch; see `acks.rs`), a reclaimer (`XAUTOCLAIM` of messages a
//! crashed member held longer than the visibility timeout) and, for exclusive/failover consumers,
//! a lease keeper (`lease.rs`). The reader, reclaimer and lease keeper stop when the consumer or
//! its backend closes.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Pipeline, Value};
use tg_backend_api::kit::{warn_repeated, RawConsumer};
use tg_backend_api::{
    Backoff, ConsumerOptions, ConsumerType, Error, ErrorKind, InitialPosition, Message, MessageId,
    Result, Topic,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::acks::{ack_pipeline, run_acker, AckQueue, AlongWrite, EntryRef};
use crate::core::Core;
use crate::entry::{as_bytes, decode_entry, ms_time, reply_streams, EntryId, IdFormatter};
use crate::error::{convert, is_connection_error};
use crate::inbox::Inbox;
use crate::lease;
use crate::q0::Q0Consumer;
use crate::scripts::{NACK, RECLAIM, RELEASE};
use crate::topic::Names;

/// The group member name the reclaimer claims crashed members' messages to (it holds them only
/// within one script run).
const RECLAIM_CONSUMER: &str = "tg-reclaim";

/// The Redis consumer (as the kit sees it; applications get it as a `Box<dyn Consumer>`): a
/// consumer group member on q1/q2 topics, a pub/sub subscriber on q0 topics.
#[derive(Debug)]
pub struct RedisConsumer(pub(crate) Kind);

/// The two kinds of Redis consumer.
#[derive(Debug)]
pub(crate) enum Kind {
    Stream(StreamConsumer),
    Q0(Q0Consumer),
}

impl RedisConsumer {
    fn inbox(&self) -> &Inbox {
        match &self.0 {
            Kind::Stream(c) => &c.inbox,
            Kind::Q0(c) => c.inbox(),
        }
    }
}

impl RawConsumer for RedisConsumer {
    // The inbox's own future, without an `async` layer per type: each layer would move the
    // (150-byte) message once more on its way out.
    fn receive(&self, timeout: Duration) -> impl Future<Output = Result<Message>> + Send {
        self.inbox().receive(timeout)
    }

    /// What the reader already fetched in batches (`XREADGROUP COUNT batch`, or the q0
    /// dispatcher's deliveries), taken from the inbox under one lock.
    fn receive_batch(
        &self,
        max: usize,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send {
        self.inbox().receive_batch(max, timeout)
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        match &self.0 {
            Kind::Stream(c) => c.acknowledge(message).await,
            Kind::Q0(c) => c.acknowledge(message).await,
        }
    }

    async fn acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        match &self.0 {
            Kind::Stream(c) => c.acknowledge_batch(messages).await,
            Kind::Q0(c) => c.acknowledge_batch(messages).await,
        }
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        match &self.0 {
            Kind::Stream(c) => c.negative_acknowledge(message).await,
            Kind::Q0(c) => c.negative_acknowledge(message).await,
        }
    }

    async fn negative_acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        match &self.0 {
            Kind::Stream(c) => c.negative_acknowledge_batch(messages).await,
            Kind::Q0(c) => c.negative_acknowledge_batch(messages).await,
        }
    }

    async fn unsubscribe(&self) -> Result<()> {
        match &self.0 {
            Kind::Stream(c) => c.unsubscribe().await,
            Kind::Q0(c) => c.unsubscribe().await,
        }
    }

    async fn close(&self) -> Result<()> {
        match &self.0 {
            Kind::Stream(c) => c.close().await,
            Kind::Q0(c) => c.close().await,
        }
    }

    fn close_sync(&self) -> bool {
        match &self.0 {
            Kind::Stream(c) => c.close_sync(),
            Kind::Q0(c) => c.close_sync(),
        }
    }
}

/// A q1/q2 consumer: one member of the subscription's consumer group.
pub(crate) struct StreamConsumer {
    /// The kit's id of this consumer, in the ack handles of what it delivers.
    id: u64,
    core: Arc<Core>,
    topic: Topic,
    names: Names,
    consumer_type: ConsumerType,
    inbox: Arc<Inbox>,
    /// Stops the reader, reclaimer and lease keeper: cancelled on close, and with the backend.
    stop: CancellationToken,
    /// The reader connection's `CLIENT ID`, to interrupt its blocking read on close.
    reader_client: Arc<AtomicI64>,
    acks: Arc<AckQueue>,
    lease_token: Option<String>,
    reader: Mutex<Option<JoinHandle<()>>>,
    helpers: Mutex<Vec<JoinHandle<()>>>,
}

impl StreamConsumer {
    pub(crate) async fn create(
        core: Arc<Core>,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<Self> {
        let names = Names::new(
            &core.config.prefix,
            topic,
            &options.subscription,
            options.consumer_name.as_deref(),
        );
        let start = match options.initial_position {
            InitialPosition::Earliest => "0",
            InitialPosition::Latest => "$",
        };
        ensure_groups(&core, &names, start)
            .await
            .map_err(|e| e.with_context("topic", topic))?;

        let (active_tx, _) = watch::channel(false);
        let active = Arc::new(active_tx);
        let lease_token = lease::join(&core, topic, &names, options.consumer_type, &active).await?;

        let batch = core.config.batch;
        let acks = Arc::new(AckQueue::new());
        let mut inbox = Inbox::new(batch * 3);
        let soon = acks.clone();
        inbox.set_room_hook(move || soon.reader_soon());
        let inbox = Arc::new(inbox);
        let stop = core.life.token().child_token();
        let reader_client = Arc::new(AtomicI64::new(0));

        let reader = tokio::spawn(run_reader(ReaderCtx {
            core: core.clone(),
            topic: topic.to_string(),
            names: names.clone(),
            consumer: id,
            inbox: inbox.clone(),
            acks: acks.clone(),
            decoded: VecDeque::with_capacity(batch * 2),
            stop: stop.clone(),
            active: active.subscribe(),
            client_id: reader_client.clone(),
        }));
        let mut helpers = vec![
            tokio::spawn(run_acker(core.clone(), names.clone(), acks.clone())),
            tokio::spawn(run_reclaimer(core.clone(), names.clone(), stop.clone())),
        ];
        if let Some(token) = &lease_token {
            helpers.push(tokio::spawn(lease::run_lease(
                core.clone(),
                names.lease.clone(),
                token.clone(),
                active.clone(),
                stop.clone(),
            )));
        }
        Ok(Self {
            id,
            core,
            topic: topic.clone(),
            names,
            consumer_type: options.consumer_type,
            inbox,
            stop,
            reader_client,
            acks,
            lease_token,
            reader: Mutex::new(Some(reader)),
            helpers: Mutex::new(helpers),
        })
    }

    /// The entry a message of this consumer names (the kit checked that this consumer
    /// delivered it).
    fn entry(&self, message: &Message) -> Result<EntryRef> {
        EntryRef::from_handle(message.ack_handle()).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "the message was not received from a Redis stream",
            )
            .with_context("message_id", message.id())
        })
    }

    /// What `acknowledge` returns for its batch's outcome.
    fn ack_outcome(&self, outcome: &crate::acks::AckOutcome) -> Result<()> {
        match outcome {
            Ok(()) => Ok(()),
            Err((ErrorKind::Closed, _)) => Err(Error::closed("consumer")),
            Err((kind, message)) => Err(Error::new(*kind, message.clone())
                .with_context("server", &self.core.server)
                .with_context("subscription", &self.names.group)),
        }
    }

    /// Moves the entries `main` (of the topic stream) and `retry` (of the retry stream) to the
    /// retry stream with their redelivery count raised, acknowledging them (the nack script,
    /// once per non-empty list).
    async fn nack(&self, main: Vec<EntryId>, retry: Vec<EntryId>) -> Result<()> {
        let core = &self.core;
        let run = |src: &str, ids: Vec<EntryId>| {
            let mut conn = core.conn();
            let mut nack = NACK.prepare_invoke();
            nack.key(src)
                .key(&self.names.retry)
                .arg(&self.names.group)
                .arg(core.config.max_len);
            for id in &ids {
                nack.arg(id);
            }
            async move {
                if ids.is_empty() {
                    return Ok(());
                }
                core.bounded(nack.invoke_async::<i64>(&mut conn))
                    .await?
                    .map(|_| ())
                    .map_err(|e| core.err(e, "negative acknowledgement failed"))
            }
        };
        let (a, b) = tokio::join!(run(&self.names.stream, main), run(&self.names.retry, retry));
        a.and(b)
    }

    /// Stops the tasks and hands back what this consumer held (or, when `unsubscribe`, deletes
    /// the subscription). The kit calls it once.
    async fn shutdown(&self, unsubscribe: bool) -> Result<()> {
        self.stop.cancel();
        self.stop_reader().await;
        let core = &self.core;
        // write out acknowledgements queued before the close
        let unfinished = self.acks.unfinished();
        if !unfinished.is_empty() {
            self.acks.wake.notify_one();
            let _ = tokio::time::timeout(core.config.connect_timeout, async {
                for batch in &unfinished {
                    batch.wait().await;
                }
            })
            .await;
        }
        let mut conn = core.conn();
        let result = if unsubscribe {
            let mut pipe = Pipeline::with_capacity(3);
            pipe.cmd("XGROUP")
                .arg("DESTROY")
                .arg(&self.names.stream)
                .arg(&self.names.group);
            pipe.cmd("DEL").arg(&self.names.retry);
            core.bounded(pipe.query_async::<()>(&mut conn))
                .await
                .and_then(|r| r.map_err(|e| core.err(e, "deleting the subscription failed")))
        } else {
            let mut release = RELEASE.prepare_invoke();
            release
                .key(&self.names.stream)
                .key(&self.names.retry)
                .arg(&self.names.group)
                .arg(core.config.max_len)
                .arg(&self.names.member);
            // bounded by the connect timeout: a close must not hang while Redis is away (a live
            // member reclaims what this one held after the visibility timeout)
            let fut = release.invoke_async::<i64>(&mut conn);
            match tokio::time::timeout(core.config.connect_timeout, fut).await {
                Ok(Ok(n)) => {
                    if n > 0 {
                        tracing::debug!(topic = %self.topic, subscription = %self.names.group, released = n,
                            "handed unacknowledged messages back to the subscription");
                    }
                    Ok(())
                }
                Ok(Err(e)) => Err(core.err(e, "handing back unacknowledged messages failed")),
                Err(_) => Err(core.timeout("Redis did not answer in time")),
            }
        };
        if let Some(token) = &self.lease_token {
            lease::release(core, &self.names.lease, token).await;
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
        let deadline = Instant::now() + self.core.config.block + self.core.config.connect_timeout;
        let mut conn = self.core.conn();
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

impl RawConsumer for StreamConsumer {
    async fn receive(&self, timeout: Duration) -> Result<Message> {
        self.inbox.receive(timeout).await
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        let entry = self.entry(message)?;
        self.ack_outcome(self.acks.push(entry).wait().await)
    }

    /// Every id joins one acknowledgement batch (one lock): its `XACK` per stream (and `XDEL` on
    /// the retry stream, as for single acknowledgements) is written in one round trip, along
    /// with the reader's next read or by the acknowledger, and the call waits for it once.
    async fn acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        let entries = messages
            .iter()
            .map(|m| self.entry(m))
            .collect::<Result<Vec<_>>>()?;
        if entries.is_empty() {
            return Ok(());
        }
        self.ack_outcome(self.acks.push_all(entries).wait().await)
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        let entry = self.entry(message)?;
        let (main, retry) = if entry.retry {
            (Vec::new(), vec![entry.id])
        } else {
            (vec![entry.id], Vec::new())
        };
        self.nack(main, retry).await
    }

    /// The nack script takes a list of ids: one run per stream the messages came from (the
    /// topic stream, the retry stream), both sent at once on the shared connection.
    async fn negative_acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        let (mut main, mut retry) = (Vec::new(), Vec::new());
        for m in messages {
            let entry = self.entry(m)?;
            if entry.retry {
                retry.push(entry.id);
            } else {
                main.push(entry.id);
            }
        }
        self.nack(main, retry).await
    }

    async fn unsubscribe(&self) -> Result<()> {
        self.shutdown(true).await
    }

    async fn close(&self) -> Result<()> {
        // a failure to hand back held messages is logged; the reclaimer of a live member
        // recovers them after the visibility timeout
        let _ = self.shutdown(false).await;
        Ok(())
    }

    /// Without a runtime nothing can hand back what the consumer held (a live member reclaims it
    /// after the visibility timeout): the tasks are only told to stop.
    fn close_sync(&self) -> bool {
        if tokio::runtime::Handle::try_current().is_ok() {
            return false;
        }
        self.stop.cancel();
        true
    }
}

impl fmt::Debug for StreamConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamConsumer")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("subscription", &self.names.group)
            .field("member", &self.names.member)
            .field("type", &self.consumer_type)
            .finish()
    }
}

/// Creates the consumer group on the topic stream (at `start`) and on the retry stream (at 0),
/// creating the streams if needed; an existing group is left as it is.
async fn ensure_groups(core: &Core, names: &Names, start: &str) -> Result<()> {
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
    let mut conn = core.conn();
    let values = core
        .bounded(conn.req_packed_commands(&pipe, 0, 2))
        .await?
        .map_err(|e| core.err(e, "creating the consumer group failed"))?;
    for v in values {
        if let Value::ServerError(e) = v {
            if e.code() != "BUSYGROUP" {
                return Err(
                    convert(e.into(), "creating the consumer group failed", &core.server)
                        .with_context("subscription", &names.group),
                );
            }
        }
    }
    Ok(())
}

struct ReaderCtx {
    core: Arc<Core>,
    /// The topic, as warnings name it.
    topic: String,
    names: Names,
    consumer: u64,
    inbox: Arc<Inbox>,
    acks: Arc<AckQueue>,
    /// Messages of the last reply, decoded before they go to the inbox in one go.
    decoded: VecDeque<Message>,
    /// Cancelled when the consumer (or its backend) closes.
    stop: CancellationToken,
    active: watch::Receiver<bool>,
    client_id: Arc<AtomicI64>,
}

impl ReaderCtx {
    fn stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Sleeps, returning early (false) when asked to stop.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.stopping(),
            () = self.stop.cancelled() => false,
        }
    }

    /// Decodes every entry of an `XREADGROUP` reply (`[[stream, [[id, fields], …]], …]`, or a
    /// map of streams under RESP3) straight into messages.
    /// Returns the most entries one stream delivered.
    fn decode_reply(&mut self, reply: Value) -> usize {
        let Some(streams) = reply_streams(reply) else {
            return 0;
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

    /// The message of one entry; `None` for an entry that does not decode, which is reported
    /// and acknowledged (it never will decode: left pending it would come back after every
    /// close and reclaim). An acknowledged entry stays in the topic stream until trimmed, for
    /// whoever wants to look at it. Fields set aside (an unreadable `r` or `o`, a repeated
    /// field) are reported and the message is delivered.
    fn message(&self, retry: bool, id: &[u8], fields: Value) -> Option<Message> {
        let entry_id = EntryId::from_bytes(id);
        let stream = || {
            if retry {
                &self.names.retry
            } else {
                &self.names.stream
            }
        };
        let entry = match decode_entry(fields) {
            Ok(e) => e,
            Err(malformed) => {
                let stream = stream();
                tracing::warn!(
                    %stream,
                    subscription = %self.names.group,
                    entry = %String::from_utf8_lossy(id),
                    field = %malformed.field,
                    "dropping an entry that is not a message of this backend (acknowledged, not \
                     delivered): {malformed}"
                );
                // nobody waits for this acknowledgement; a failure to write it leaves the entry
                // pending, to be dropped again when it comes back
                let _ = self.acks.push(EntryRef {
                    retry,
                    id: entry_id,
                });
                return None;
            }
        };
        if !(entry.ignored.is_empty() && entry.repeated.is_empty()) {
            let entry_text = String::from_utf8_lossy(id);
            for note in &entry.ignored {
                tracing::warn!(
                    stream = %stream(),
                    subscription = %self.names.group,
                    entry = %entry_text,
                    field = %note.field,
                    "delivering an entry with a field set aside: {note}"
                );
            }
            if !entry.repeated.is_empty() {
                let _entry = tracing::warn_span!("entry", entry = %entry_text).entered();
                warn_repeated(&self.topic, &entry.repeated);
            }
        }
        // the message id is the original entry's (a retry copy names it in `o`)
        let (text, ms): (Arc<str>, Option<u64>) = match entry.original {
            Some((original, ms)) => (original, Some(ms)),
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

impl ReaderCtx {
    /// `PING`s the reader's connection while it waits without reading: one that went silent
    /// meanwhile (no answer within `keep_alive`) is dropped, which closes it, and the next read
    /// opens a new one, instead of finding out a whole read timeout later.
    async fn check_idle(&self, conn: &mut Option<MultiplexedConnection>) {
        let Some(c) = conn.as_mut() else { return };
        let within = self.core.config.keep_alive;
        let answer = tokio::time::timeout(within, redis::cmd("PING").query_async::<()>(c)).await;
        if !matches!(answer, Ok(Ok(()))) {
            tracing::debug!(stream = %self.names.stream, "the reader's idle connection went silent; reconnecting");
            *conn = None;
            self.client_id.store(0, Ordering::Release);
        }
    }
}

/// When the reader ends (also when aborted): receivers see the inbox close, and the
/// acknowledger takes over all acknowledgements.
struct ReaderExit(Arc<Inbox>, Arc<AckQueue>);

impl Drop for ReaderExit {
    fn drop(&mut self) {
        self.0.close();
        self.1.reader_gone();
    }
}

/// Reads batches with `XREADGROUP` (retry stream first) into the consumer's buffer, carrying the
/// pending acknowledgements along; blocking only when the last read was not a full batch.
/// Reconnects by itself, and reads only while the consumer is active (failover/exclusive).
async fn run_reader(mut ctx: ReaderCtx) {
    let batch = ctx.core.config.batch;
    let block_ms = ctx.core.config.block.as_millis().max(1) as u64;
    let read_timeout =
        ctx.core.config.block + ctx.core.config.connect_timeout + Duration::from_secs(1);
    // while the reader does not read (its buffer is full, or it stands by), its connection is
    // checked every `keep_alive`, as the shared one is
    let keep_alive = ctx.core.config.keep_alive;
    let mut conn: Option<MultiplexedConnection> = None;
    let reconnect = Backoff::reconnect();
    let mut retry = 0;
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
                () = ctx.stop.cancelled() => {},
                () = tokio::time::sleep(keep_alive) => ctx.check_idle(&mut conn).await,
            }
            continue;
        }
        // wait for room for a batch (the buffer holds at most about twice the batch, three
        // times when both streams deliver a full batch at once)
        if !inbox.has_room(batch) {
            acks.reader_away();
            tokio::select! {
                _ = inbox.wait_room(batch) => {},
                () = ctx.stop.cancelled() => continue,
                () = tokio::time::sleep(keep_alive) => {
                    ctx.check_idle(&mut conn).await;
                    continue;
                }
            }
        }
        if conn.is_none() {
            acks.reader_away();
            blocking = true;
            match ctx.core.dedicated_connection().await {
                // (bounded: the network may go silent right after connecting)
                Ok(mut c) => match tokio::time::timeout(
                    read_timeout,
                    redis::cmd("CLIENT").arg("ID").query_async::<i64>(&mut c),
                )
                .await
                {
                    Ok(Ok(id)) => {
                        ctx.client_id.store(id, Ordering::Release);
                        conn = Some(c);
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "CLIENT ID failed"),
                    Err(_) => tracing::debug!("CLIENT ID went unanswered"),
                },
                Err(e) => tracing::debug!(error = %e, "reader cannot connect yet"),
            }
            if conn.is_none() {
                retry += 1;
                if !ctx.pause(reconnect.delay(retry)).await {
                    break;
                }
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
                AlongWrite::new(ctx.core.clone(), acks.clone(), pipe, batch)
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
            (Some(along), Some(ack_conn)) => {
                tokio::join!(along.run(ack_conn, read_timeout), read).1
            }
            _ => read.await,
        };
        if !matches!(reply, Ok(Ok(_))) {
            acks.reader_away();
            blocking = true;
        }
        let reply = match reply {
            Ok(Ok(v)) => {
                retry = 0;
                v
            }
            Ok(Err(e)) if e.code() == Some("NOGROUP") => {
                // the group or a stream vanished (a restart without persistence, or unsubscribe):
                // recreate it at the start so nothing written since is lost
                tracing::info!(stream = %ctx.names.stream, group = %ctx.names.group, "consumer group missing; recreating it");
                if ensure_groups(&ctx.core, &ctx.names, "0").await.is_err()
                    && !ctx.pause(reconnect.delay(retry.max(1))).await
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
                retry += 1;
                if !ctx.pause(reconnect.delay(retry)).await {
                    break;
                }
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

/// At start and every half visibility timeout: moves messages that crashed members held too long
/// to the retry stream, and removes idle empty members.
async fn run_reclaimer(core: Arc<Core>, names: Names, stop: CancellationToken) {
    let vt = core.config.visibility_timeout;
    let every = (vt / 2).max(Duration::from_millis(200));
    loop {
        let mut conn = core.conn();
        let mut reclaim = RECLAIM.prepare_invoke();
        reclaim
            .key(&names.stream)
            .key(&names.retry)
            .arg(&names.group)
            .arg(core.config.max_len)
            .arg(vt.as_millis() as u64)
            .arg(RECLAIM_CONSUMER)
            .arg(100);
        match tokio::time::timeout(
            core.config.send_timeout,
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
            () = stop.cancelled() => return,
        }
        if stop.is_cancelled() {
            return;
        }
    }
}
