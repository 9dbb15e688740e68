//! q1/q2 consumers: a member of the subscription's consumer group on the topic stream and on the
//! subscription's retry stream.
//!
//! Tasks per consumer: a reader (blocking `XREADGROUP` on its own connection into a small
//! bounded buffer), an acknowledger (batches `XACK`s; `acknowledge` waits for its batch), a
//! reclaimer (`XAUTOCLAIM` of messages a crashed member held longer than the visibility timeout)
//! and, for exclusive/failover consumers, a lease keeper.

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
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::Shared;
use crate::error::{convert, is_connection_error};
use crate::scripts::{LEASE_RELEASE, LEASE_RENEW, NACK, RECLAIM, RELEASE};
use crate::topic::{decode_entry, id_time, into_string, TopicKeys};

/// Acknowledgements written in one pipeline at most.
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
    fn parse(id: &str) -> Self {
        let packed = id
            .split_once('-')
            .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)));
        match packed {
            Some((ms, seq)) => Self::Packed { ms, seq },
            None => Self::Text(id.into()),
        }
    }
}

impl redis::ToRedisArgs for EntryId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        match self {
            Self::Packed { ms, seq } => out.write_arg_fmt(format_args!("{ms}-{seq}")),
            Self::Text(t) => out.write_arg(t.as_bytes()),
        }
    }
}

enum AckReq {
    Ack(EntryRef, oneshot::Sender<Result<()>>),
    Flush(oneshot::Sender<()>),
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
    rx: tokio::sync::Mutex<mpsc::Receiver<Message>>,
    stop: watch::Sender<bool>,
    reader_client: Arc<AtomicI64>,
    acks: mpsc::Sender<AckReq>,
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
        let (msg_tx, msg_rx) = mpsc::channel(batch * 2);
        let (ack_tx, ack_rx) = mpsc::channel(ACK_BATCH * 4);
        let (stop_tx, stop_rx) = watch::channel(false);
        let reader_client = Arc::new(AtomicI64::new(0));
        let id = next_consumer_id();

        let reader = tokio::spawn(run_reader(ReaderCtx {
            shared: shared.clone(),
            names: names.clone(),
            consumer: id,
            tx: msg_tx,
            stop: stop_rx.clone(),
            active: active.subscribe(),
            client_id: reader_client.clone(),
        }));
        let mut helpers = vec![
            tokio::spawn(run_acker(shared.clone(), names.clone(), ack_rx)),
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
                rx: tokio::sync::Mutex::new(msg_rx),
                stop: stop_tx,
                reader_client,
                acks: ack_tx,
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
        let (tx, rx) = oneshot::channel();
        if self.acks.send(AckReq::Flush(tx)).await.is_ok() {
            let _ = tokio::time::timeout(self.shared.config.connect_timeout, rx).await;
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
        if let Ok(mut rx) = core.rx.try_lock() {
            match rx.try_recv() {
                Ok(m) => return Ok(m),
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(closed()),
                Err(mpsc::error::TryRecvError::Empty) if timeout.is_zero() => {
                    return Err(receive_timeout(timeout))
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
        } else if timeout.is_zero() {
            return Err(receive_timeout(timeout));
        }
        let got = tokio::time::timeout(timeout, async {
            let mut rx = core.rx.lock().await;
            rx.recv().await
        })
        .await;
        match got {
            Ok(Some(m)) => {
                core.check_open()?;
                Ok(m)
            }
            Ok(None) => Err(closed()),
            Err(_) => {
                core.check_open()?;
                Err(receive_timeout(timeout))
            }
        }
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        let core = &self.core;
        let entry = core.own_entry(message)?;
        core.check_open()?;
        let (tx, rx) = oneshot::channel();
        let req = AckReq::Ack(entry, tx);
        core.acks
            .send(req)
            .await
            .map_err(|_| Error::closed("consumer"))?;
        rx.await.map_err(|_| Error::closed("consumer"))?
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
    tx: mpsc::Sender<Message>,
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

    fn message(&self, retry: bool, id: String, fields: Value) -> Option<Message> {
        let entry = match decode_entry(fields) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(stream = %self.names.stream, id = %id, error = %e, "skipping an undecodable entry");
                return None;
            }
        };
        let entry_ref = EntryRef {
            retry,
            id: EntryId::parse(&id),
        };
        let original: Arc<str> = match entry.original {
            Some(o) => o.into(),
            None => id.into(),
        };
        let mut msg = Message::new(
            entry.payload,
            entry.properties,
            MessageId::from_text(original.clone()),
            entry_ref.handle(self.consumer),
        )
        .with_redelivery_count(entry.redeliveries)
        .with_key(entry.key);
        if let Some(t) = id_time(&original) {
            msg = msg.with_publish_time(t);
        }
        Some(msg)
    }
}

/// Reads batches with blocking `XREADGROUP` (retry stream first) into the consumer's buffer,
/// reconnecting by itself, and only while the consumer is active (failover/exclusive).
async fn run_reader(mut ctx: ReaderCtx) {
    let batch = ctx.shared.config.batch;
    let block_ms = ctx.shared.config.block.as_millis().max(1) as u64;
    let read_timeout =
        ctx.shared.config.block + ctx.shared.config.connect_timeout + Duration::from_secs(1);
    let mut conn: Option<MultiplexedConnection> = None;
    let mut delay = Duration::from_millis(50);
    let tx = ctx.tx.clone();
    loop {
        if ctx.stopping() {
            break;
        }
        if !*ctx.active.borrow_and_update() {
            tokio::select! {
                r = ctx.active.changed() => if r.is_err() { break },
                _ = ctx.stop.changed() => {},
            }
            continue;
        }
        // wait for room for a batch, so what is read is buffered without waiting
        let permits = tokio::select! {
            p = tx.reserve_many(batch) => match p { Ok(p) => p, Err(_) => break },
            _ = ctx.stop.changed() => continue,
        };
        if conn.is_none() {
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
                drop(permits);
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
            .arg(batch)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&ctx.names.retry)
            .arg(&ctx.names.stream)
            .arg(">")
            .arg(">");
        let reply = tokio::time::timeout(read_timeout, cmd.query_async::<Value>(c)).await;
        let entries = match reply {
            Ok(Ok(v)) => {
                delay = Duration::from_millis(50);
                parse_read_reply(v, &ctx.names.retry)
            }
            Ok(Err(e)) if e.code() == Some("NOGROUP") => {
                // the group or a stream vanished (a restart without persistence, or unsubscribe):
                // recreate it at the start so nothing written since is lost
                tracing::info!(stream = %ctx.names.stream, group = %ctx.names.group, "consumer group missing; recreating it");
                drop(permits);
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
                drop(permits);
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
        let mut permits = permits;
        for (retry, id, fields) in entries {
            let Some(msg) = ctx.message(retry, id, fields) else {
                continue;
            };
            match permits.next() {
                Some(p) => p.send(msg),
                None => {
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// `(in retry stream, id, fields)` of every entry of an `XREADGROUP` reply.
fn parse_read_reply(v: Value, retry_key: &str) -> Vec<(bool, String, Value)> {
    let streams: Vec<(Value, Value)> = match v {
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
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    for (key, entries) in streams {
        let retry = into_string(key).is_some_and(|k| k == retry_key);
        let Value::Array(entries) = entries else {
            continue;
        };
        out.reserve(entries.len());
        for e in entries {
            let Value::Array(parts) = e else { continue };
            let mut it = parts.into_iter();
            let (Some(id), Some(fields)) = (it.next(), it.next()) else {
                continue;
            };
            if let Some(id) = into_string(id) {
                out.push((retry, id, fields));
            }
        }
    }
    out
}

/// Writes acknowledgements in batches: `XACK` on the topic stream, `XACK` + `XDEL` on the retry
/// stream (only this subscription reads it). Each `acknowledge` waits for its batch.
async fn run_acker(shared: Arc<Shared>, names: Names, mut rx: mpsc::Receiver<AckReq>) {
    let mut main: Vec<EntryId> = Vec::new();
    let mut retry: Vec<EntryId> = Vec::new();
    let mut waiters: Vec<oneshot::Sender<Result<()>>> = Vec::new();
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    let mut reqs: Vec<AckReq> = Vec::with_capacity(ACK_BATCH);
    while rx.recv_many(&mut reqs, ACK_BATCH).await > 0 {
        for req in reqs.drain(..) {
            match req {
                AckReq::Ack(entry, tx) => {
                    if entry.retry {
                        retry.push(entry.id)
                    } else {
                        main.push(entry.id)
                    }
                    waiters.push(tx);
                }
                AckReq::Flush(tx) => flushes.push(tx),
            }
        }
        if !waiters.is_empty() {
            let mut pipe = Pipeline::with_capacity(3);
            if !main.is_empty() {
                pipe.cmd("XACK").arg(&names.stream).arg(&names.group);
                for id in &main {
                    pipe.arg(id);
                }
            }
            if !retry.is_empty() {
                pipe.cmd("XACK").arg(&names.retry).arg(&names.group);
                for id in &retry {
                    pipe.arg(id);
                }
                pipe.cmd("XDEL").arg(&names.retry);
                for id in &retry {
                    pipe.arg(id);
                }
            }
            let result = write_acks(&shared, &pipe).await;
            for tx in waiters.drain(..) {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(Error::new(e.kind(), e.message().to_owned())
                        .with_context("server", &shared.server)
                        .with_context("subscription", &names.group)),
                };
                let _ = tx.send(r);
            }
            main.clear();
            retry.clear();
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
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
