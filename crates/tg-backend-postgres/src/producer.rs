//! The q1/q2 producer: a bounded channel into a writer task that inserts batches.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tg_backend_api::{
    Error, ErrorKind, MessageId, OutboundMessage, Producer, ProducerOptions, Qos, Result,
    SendReceipt, Topic,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::Shared;
use crate::error::retryable;
use crate::topic::properties_to_json;

struct Row {
    payload: Bytes,
    properties: Option<String>,
    key: Option<String>,
    dedup_id: Option<String>,
    reply: oneshot::Sender<Result<MessageId>>,
}

enum Item {
    Row(Row),
    Flush(oneshot::Sender<()>),
}

pub(crate) struct PgProducer {
    shared: Arc<Shared>,
    topic: Topic,
    tx: mpsc::Sender<Item>,
    closed: AtomicBool,
}

impl PgProducer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        topic: Topic,
        topic_id: i64,
        options: ProducerOptions,
    ) -> Self {
        let batch = if options.batching == Some(false) {
            1
        } else {
            shared.config.batch_size
        };
        let capacity = (shared.config.batch_size * 2).max(64);
        let (tx, rx) = mpsc::channel(capacity);
        let writer = Writer {
            shared: shared.clone(),
            channel: shared.channel(&topic),
            topic: topic.clone(),
            topic_id,
            batch,
            send_timeout: options.send_timeout.unwrap_or(shared.config.send_timeout),
            commit: shared
                .config
                .producer_synchronous_commit
                .map(|on| if on { "on" } else { "off" }),
        };
        tokio::spawn(writer.run(rx));
        Self {
            shared,
            topic,
            tx,
            closed: AtomicBool::new(false),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("producer").with_context("topic", &self.topic));
        }
        self.shared.check_open()
    }
}

#[async_trait]
impl Producer for PgProducer {
    fn topic(&self) -> &Topic {
        &self.topic
    }

    async fn send(&self, mut message: OutboundMessage) -> Result<SendReceipt> {
        self.check_open()?;
        let max = self.shared.config.max_payload;
        if message.payload().len() > max {
            return Err(Error::payload_too_large(message.payload().len(), max)
                .with_context("topic", &self.topic));
        }
        if message.is_retained() {
            return Err(Error::unsupported(
                "the PostgreSQL backend keeps no retained messages; subscribe at Earliest to replay \
                 the retained history instead",
            )
            .with_context("topic", &self.topic));
        }
        let dedup_id = (self.topic.qos() == Qos::Q2).then(|| message.ensure_dedup_id().to_owned());
        let (payload, properties, key) = message.into_parts();
        let (reply, rx) = oneshot::channel();
        let row = Row {
            payload,
            properties: properties_to_json(&properties),
            key,
            dedup_id,
            reply,
        };
        self.tx
            .send(Item::Row(row))
            .await
            .map_err(|_| Error::closed("producer").with_context("topic", &self.topic))?;
        Ok(SendReceipt::from_channel(rx))
    }

    async fn flush(&self) -> Result<()> {
        self.check_open()?;
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Item::Flush(tx))
            .await
            .map_err(|_| Error::closed("producer").with_context("topic", &self.topic))?;
        rx.await
            .map_err(|_| Error::closed("producer").with_context("topic", &self.topic))
    }

    async fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let flushed = if self.shared.check_open().is_ok() {
            let (tx, rx) = oneshot::channel();
            if self.tx.send(Item::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
            Ok(())
        } else {
            Ok(())
        };
        self.closed.store(true, Ordering::Release);
        flushed
    }
}

impl fmt::Debug for PgProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgProducer")
            .field("topic", &self.topic)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

struct Writer {
    shared: Arc<Shared>,
    topic: Topic,
    channel: String,
    topic_id: i64,
    batch: usize,
    send_timeout: Duration,
    commit: Option<&'static str>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Item>) {
        let mut rows: Vec<Row> = Vec::with_capacity(self.batch);
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Item::Row(r) => rows.push(r),
                    Item::Flush(f) => {
                        // everything before the flush marker is in `rows`: write it first
                        flushes.push(f);
                        break;
                    }
                }
                if rows.len() >= self.batch {
                    break;
                }
                next = rx.try_recv().ok();
            }
            if !rows.is_empty() {
                self.write(std::mem::take(&mut rows)).await;
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
        }
    }

    async fn write(&self, rows: Vec<Row>) {
        let deadline = Instant::now() + self.send_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            match self.try_write(&rows).await {
                Ok(ids) => {
                    self.shared.listener.wake_local(&self.channel);
                    for (row, id) in rows.into_iter().zip(ids) {
                        let _ = row.reply.send(id);
                    }
                    return;
                }
                Err(e) if retryable(&e) && Instant::now() + backoff < deadline => {
                    tracing::debug!(topic = %self.topic, error = %e, "publish failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    let e = e.with_context("topic", &self.topic);
                    for row in rows {
                        let _ = row.reply.send(Err(clone_error(&e)));
                    }
                    return;
                }
            }
        }
    }

    async fn try_write(&self, rows: &[Row]) -> Result<Vec<Result<MessageId>>> {
        let client = self.shared.conn().await?;
        let stmt = client
            .prepare_cached(&self.shared.sql.publish)
            .await
            .map_err(|e| self.shared.pg(e, "prepare"))?;
        let payloads: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_ref()).collect();
        let props: Vec<Option<&str>> = rows.iter().map(|r| r.properties.as_deref()).collect();
        let keys: Vec<Option<&str>> = rows.iter().map(|r| r.key.as_deref()).collect();
        let dedup: Vec<Option<&str>> = rows.iter().map(|r| r.dedup_id.as_deref()).collect();
        let result = client
            .query(
                &stmt,
                &[
                    &self.topic_id,
                    &payloads,
                    &props,
                    &keys,
                    &dedup,
                    &self.channel,
                    &self.commit,
                ],
            )
            .await
            .map_err(|e| self.shared.pg(e, "publish"))?;
        let dedup_mode = rows.iter().any(|r| r.dedup_id.is_some());
        if !dedup_mode {
            let mut seqs: Vec<i64> = result.iter().map(|r| r.get(0)).collect();
            seqs.sort_unstable();
            if seqs.len() != rows.len() {
                return Err(Error::new(
                    ErrorKind::Unexpected,
                    format!("inserted {} rows for {} messages", seqs.len(), rows.len()),
                ));
            }
            return Ok(seqs
                .into_iter()
                .map(|s| Ok(MessageId::from_u64(s as u64)))
                .collect());
        }
        let mut by_dedup: HashMap<String, i64> = result
            .iter()
            .filter_map(|r| {
                r.get::<_, Option<String>>(1)
                    .map(|d| (d, r.get::<_, i64>(0)))
            })
            .collect();
        let missing: Vec<&str> = rows
            .iter()
            .filter_map(|r| r.dedup_id.as_deref())
            .filter(|d| !by_dedup.contains_key(*d))
            .collect();
        if !missing.is_empty() {
            let found = client
                .query(&self.shared.sql.dedup_lookup, &[&self.topic_id, &missing])
                .await
                .map_err(|e| self.shared.pg(e, "de-duplication lookup"))?;
            for r in found {
                by_dedup.insert(r.get(0), r.get(1));
            }
        }
        Ok(rows
            .iter()
            .map(|r| {
                let seq = r.dedup_id.as_deref().and_then(|d| by_dedup.get(d).copied());
                Ok(match seq {
                    Some(s) => MessageId::from_u64(s as u64),
                    None => MessageId::from_text("duplicate"),
                })
            })
            .collect())
    }
}

/// [`Error`] is not `Clone`; rebuild one per receipt with the same kind, message and context.
pub(crate) fn clone_error(e: &Error) -> Error {
    let mut out = Error::new(e.kind(), e.message().to_owned()).set_temporary(e.is_temporary());
    for (k, v) in e.context() {
        out = out.with_context(k, v);
    }
    out
}
