//! The producer: a bounded queue into a writer task that pipelines `PUBLISH` (q0), `XADD` (q1)
//! or the de-duplicating script (q2) in batches.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionLike;
use redis::{Pipeline, Value};
use tg_backend_api::{
    Error, ErrorKind, MessageId, OutboundMessage, Producer, ProducerOptions, Qos, Result,
    SendReceipt, Topic,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::Shared;
use crate::error::{convert, is_connection_error};
use crate::scripts::DEDUP_XADD;
use crate::topic::{into_string, push_fields, FrameArg, TopicKeys};

/// Messages a producer queues before `send` waits.
const QUEUE: usize = 8192;
/// Most commands in one pipeline.
const MAX_BATCH: usize = 1024;
/// How many times the writer yields to let a busy producer fill a batch.
const LINGER_YIELDS: usize = 16;

enum Req {
    Send(redis::Cmd, oneshot::Sender<Result<MessageId>>),
    Flush(oneshot::Sender<()>),
}

/// The part of a producer the backend keeps (weakly) to close it.
pub(crate) struct ProducerCore {
    shared: Arc<Shared>,
    topic: Topic,
    keys: TopicKeys,
    tx: mpsc::Sender<Req>,
    closed: AtomicBool,
}

impl ProducerCore {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("producer").with_context("topic", &self.topic));
        }
        self.shared.check_open()
    }

    async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Req::Flush(tx))
            .await
            .map_err(|_| Error::closed("producer").with_context("topic", &self.topic))?;
        rx.await
            .map_err(|_| Error::closed("producer").with_context("topic", &self.topic))
    }

    /// Flushes and closes; later sends fail with `Closed`.
    pub(crate) async fn shutdown(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.flush().await
    }
}

pub(crate) struct RedisProducer {
    core: Arc<ProducerCore>,
}

impl RedisProducer {
    pub(crate) fn new(shared: Arc<Shared>, topic: Topic, options: &ProducerOptions) -> Self {
        let keys = TopicKeys::new(&shared.config.prefix, &topic);
        let (tx, rx) = mpsc::channel(QUEUE);
        let send_timeout = options.send_timeout.unwrap_or(shared.config.send_timeout);
        // batching(false): every message goes out as soon as the writer sees it (no lingering);
        // messages that queued up meanwhile still share a pipeline
        let linger = options.batching.unwrap_or(true);
        tokio::spawn(run_writer(
            shared.clone(),
            topic.qos(),
            rx,
            send_timeout,
            linger,
        ));
        Self {
            core: Arc::new(ProducerCore {
                shared,
                topic,
                keys,
                tx,
                closed: AtomicBool::new(false),
            }),
        }
    }

    pub(crate) fn core(&self) -> &Arc<ProducerCore> {
        &self.core
    }

    fn command(&self, mut message: OutboundMessage) -> redis::Cmd {
        let config = &self.core.shared.config;
        let keys = &self.core.keys;
        match self.core.topic.qos() {
            Qos::Q0 => {
                let (payload, properties, key) = message.into_parts();
                let frame = FrameArg {
                    payload: &payload,
                    properties: &properties,
                    key: key.as_deref(),
                };
                let mut cmd = redis::Cmd::with_capacity(3, 7 + keys.main.len() + frame.len());
                cmd.arg("PUBLISH").arg(&keys.main).arg(frame);
                cmd
            }
            Qos::Q1 => {
                let (payload, properties, key) = message.into_parts();
                let mut cmd = redis::Cmd::with_capacity(
                    9 + 2 * properties.len(),
                    64 + keys.main.len() + payload.len() + fields_len(&properties),
                );
                cmd.arg("XADD");
                cmd.arg(&keys.main)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(config.max_len)
                    .arg("*");
                push_fields(&mut cmd, &payload, &properties, key.as_deref());
                cmd
            }
            Qos::Q2 => {
                let dedup_key = keys.dedup(message.ensure_dedup_id());
                let (payload, properties, key) = message.into_parts();
                let mut cmd = redis::Cmd::with_capacity(
                    10 + 2 * properties.len(),
                    160 + 2 * keys.main.len() + payload.len() + fields_len(&properties),
                );
                cmd.arg("EVALSHA");
                cmd.arg(DEDUP_XADD.get_hash())
                    .arg(2)
                    .arg(&keys.main)
                    .arg(dedup_key)
                    .arg(config.max_len)
                    .arg(config.dedup_window.as_secs().max(1));
                push_fields(&mut cmd, &payload, &properties, key.as_deref());
                cmd
            }
        }
    }
}

fn fields_len(properties: &tg_backend_api::Properties) -> usize {
    properties.iter().map(|(k, v)| 2 + k.len() + v.len()).sum()
}

#[async_trait]
impl Producer for RedisProducer {
    fn topic(&self) -> &Topic {
        &self.core.topic
    }

    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        self.core.check_open()?;
        let max = self.core.shared.config.max_payload;
        if message.payload().len() > max {
            return Err(Error::payload_too_large(message.payload().len(), max)
                .with_context("topic", &self.core.topic));
        }
        if message.is_retained() {
            return Err(Error::unsupported(
                "the Redis backend keeps no retained messages; use a q1 topic and an Earliest \
                 subscription to replay what a stream holds",
            )
            .with_context("topic", &self.core.topic));
        }
        let cmd = self.command(message);
        let (tx, rx) = oneshot::channel();
        self.core
            .tx
            .send(Req::Send(cmd, tx))
            .await
            .map_err(|_| Error::closed("producer").with_context("topic", &self.core.topic))?;
        Ok(SendReceipt::from_channel(rx))
    }

    async fn flush(&self) -> Result<()> {
        self.core.check_open()?;
        self.core.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.core.shutdown().await
    }
}

impl fmt::Debug for RedisProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisProducer")
            .field("topic", &self.core.topic)
            .field("closed", &self.core.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// Takes queued messages in batches and writes each batch as one pipeline.
async fn run_writer(
    shared: Arc<Shared>,
    qos: Qos,
    mut rx: mpsc::Receiver<Req>,
    send_timeout: Duration,
    linger: bool,
) {
    let seq = AtomicU64::new(0);
    let mut reqs: Vec<Req> = Vec::with_capacity(MAX_BATCH);
    let mut waiters: Vec<oneshot::Sender<Result<MessageId>>> = Vec::with_capacity(MAX_BATCH);
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    let mut last_batch = 0usize;
    // `recv_many` frees many queue slots at once, so a sender waiting for room is woken once per
    // batch rather than once per message
    while rx.recv_many(&mut reqs, MAX_BATCH).await > 0 {
        // Under load (the last batch had company), give the senders a moment to fill this batch:
        // fewer, larger pipelines cost Redis and both ends far less per message. A lone message
        // of an idle producer goes out at once.
        if linger && last_batch > 1 {
            for _ in 0..LINGER_YIELDS {
                if reqs.len() >= MAX_BATCH {
                    break;
                }
                tokio::task::yield_now().await;
                let before = reqs.len();
                while reqs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(r) => reqs.push(r),
                        Err(_) => break,
                    }
                }
                if reqs.len() == before {
                    break;
                }
            }
        }
        let mut pipe = Pipeline::with_capacity(reqs.len());
        for req in reqs.drain(..) {
            match req {
                Req::Send(cmd, tx) => {
                    pipe.add_command(cmd);
                    waiters.push(tx);
                }
                Req::Flush(tx) => flushes.push(tx),
            }
        }
        last_batch = waiters.len();
        if !waiters.is_empty() {
            write_batch(&shared, qos, &pipe, &mut waiters, send_timeout, &seq).await;
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }
}

async fn write_batch(
    shared: &Shared,
    qos: Qos,
    pipe: &Pipeline,
    waiters: &mut Vec<oneshot::Sender<Result<MessageId>>>,
    send_timeout: Duration,
    seq: &AtomicU64,
) {
    let n = waiters.len();
    let deadline = Instant::now() + send_timeout;
    let mut conn = shared.conn();
    let mut delay = Duration::from_millis(20);
    let outcome: std::result::Result<Vec<Value>, Error> = loop {
        match tokio::time::timeout_at(deadline, conn.req_packed_commands(pipe, 0, n)).await {
            Err(_) => {
                break Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "Redis did not confirm the message within the send timeout of \
                         {send_timeout:?}; it may or may not have been stored"
                    ),
                )
                .with_context("server", &shared.server))
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
                break Ok(values);
            }
            Ok(Err(e)) if is_connection_error(&e) && Instant::now() + delay < deadline => {
                tracing::debug!(server = %shared.server, error = %e, "send failed; retrying after reconnect");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Ok(Err(e)) => break Err(shared.err(e, "sending to Redis failed")),
        }
    };
    match outcome {
        Ok(values) => {
            let mut values = values.into_iter();
            for tx in waiters.drain(..) {
                let result = match values.next() {
                    Some(Value::ServerError(e)) => Err(convert(
                        e.into(),
                        "Redis refused the message",
                        &shared.server,
                    )),
                    Some(Value::Int(_)) => {
                        Ok(MessageId::from_u64(seq.fetch_add(1, Ordering::Relaxed)))
                    }
                    Some(v) => match into_string(v) {
                        Some(id) => Ok(MessageId::from_text(id)),
                        None => Err(Error::new(
                            ErrorKind::Unexpected,
                            "unexpected reply to a send",
                        )),
                    },
                    None => Err(Error::new(ErrorKind::Unexpected, "missing reply to a send")),
                };
                let _ = tx.send(result);
            }
        }
        Err(e) => {
            for tx in waiters.drain(..) {
                let copy = Error::new(e.kind(), e.message().to_owned())
                    .with_context("server", &shared.server);
                let _ = tx.send(Err(copy));
            }
        }
    }
}
