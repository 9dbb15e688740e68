//! The producer: for q1/q2 a bounded channel into a writer task that inserts batches, for q0
//! notifications ([`crate::q0`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tg_backend_api::kit::RawProducer;
use tg_backend_api::{
    Backoff, Error, ErrorKind, MessageId, OutboundMessage, ProducerOptions, Qos, Result,
    SendReceipt, Topic,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::core::Core;
use crate::error::{clone_error, retryable};
use crate::properties;
use crate::q0::Q0Producer;

/// Waits before the retries of a batch that lost its connection: 20 ms doubling to 1 s, until
/// the send timeout.
const RETRY: Backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));

/// The PostgreSQL producer (as the kit sees it; applications get it as a `Box<dyn Producer>`).
pub struct PostgresProducer(Kind);

/// The two kinds, one per path.
enum Kind {
    /// q1/q2: rows in the messages table.
    Table(TableProducer),
    /// q0: `NOTIFY`.
    Notify(Q0Producer),
}

impl PostgresProducer {
    pub(crate) async fn open(
        core: &Arc<Core>,
        topic: &Topic,
        options: &ProducerOptions,
    ) -> Result<Self> {
        if topic.qos() == Qos::Q0 {
            return Ok(Self(Kind::Notify(Q0Producer::new(
                core.clone(),
                topic.clone(),
            ))));
        }
        let topic_id = core.topic_id(topic).await?;
        Ok(Self(Kind::Table(TableProducer::new(
            core.clone(),
            topic.clone(),
            topic_id,
            options,
        ))))
    }
}

impl RawProducer for PostgresProducer {
    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        match &self.0 {
            Kind::Table(p) => p.send(message).await,
            Kind::Notify(p) => p.send(message).await,
        }
    }

    async fn send_batch(&self, messages: Vec<OutboundMessage>) -> Result<Vec<SendReceipt>> {
        match &self.0 {
            Kind::Table(p) => p.send_batch(messages).await,
            Kind::Notify(p) => p.send_batch(messages).await,
        }
    }

    async fn flush(&self) -> Result<()> {
        match &self.0 {
            Kind::Table(p) => p.flush().await,
            Kind::Notify(p) => p.flush().await,
        }
    }

    async fn close(&self) -> Result<()> {
        // what was sent before the close is still written; a failure is in its receipt
        let _ = self.flush().await;
        Ok(())
    }
}

impl fmt::Debug for PostgresProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Table(p) => p.fmt(f),
            Kind::Notify(p) => p.fmt(f),
        }
    }
}

struct Row {
    payload: Bytes,
    properties: Option<String>,
    key: Option<String>,
    dedup_id: Option<String>,
    reply: oneshot::Sender<Result<MessageId>>,
}

enum Item {
    Row(Row),
    /// A `send_batch`: written together, in statements of up to `batch_size` rows.
    Rows(Vec<Row>),
    Flush(oneshot::Sender<()>),
}

/// The q1/q2 producer: one batch in flight at a time, which keeps its messages in order.
pub(crate) struct TableProducer {
    topic: Topic,
    tx: mpsc::Sender<Item>,
}

impl TableProducer {
    fn new(core: Arc<Core>, topic: Topic, topic_id: i64, options: &ProducerOptions) -> Self {
        let batch = if options.batching == Some(false) {
            1
        } else {
            core.config.batch_size
        };
        let capacity = (core.config.batch_size * 2).max(64);
        let (tx, rx) = mpsc::channel(capacity);
        let writer = Writer {
            channel: core.channel(&topic),
            topic: topic.clone(),
            topic_id,
            batch,
            max_rows: core.config.batch_size,
            send_timeout: options.send_timeout.unwrap_or(core.config.send_timeout),
            commit: core
                .config
                .producer_synchronous_commit
                .map(|on| if on { "on" } else { "off" }),
            core,
        };
        tokio::spawn(writer.run(rx));
        Self { topic, tx }
    }

    fn gone(&self) -> Error {
        Error::closed("producer").with_context("topic", &self.topic)
    }

    /// The row of `message` and its receipt.
    fn row(&self, mut message: OutboundMessage) -> (Row, SendReceipt) {
        // q2 messages carry their id: the kit set it before the producer sees them
        let dedup_id = (self.topic.qos() == Qos::Q2).then(|| message.ensure_dedup_id().to_owned());
        let (payload, properties, key) = message.into_parts();
        let (reply, rx) = oneshot::channel();
        let row = Row {
            payload,
            properties: properties::to_json(&properties),
            key,
            dedup_id,
            reply,
        };
        (row, SendReceipt::from_channel(rx))
    }

    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        let (row, receipt) = self.row(message);
        self.tx
            .send(Item::Row(row))
            .await
            .map_err(|_| self.gone())?;
        Ok(receipt)
    }

    /// One multi-row `INSERT` for the batch (several of `batch_size` rows when it is larger),
    /// after what this producer queued before, in order; one receipt per message. (The kit
    /// checked every payload before this is called: nothing is queued unless all fit.)
    async fn send_batch(&self, messages: Vec<OutboundMessage>) -> Result<Vec<SendReceipt>> {
        let (rows, receipts): (Vec<Row>, Vec<SendReceipt>) =
            messages.into_iter().map(|m| self.row(m)).unzip();
        self.tx
            .send(Item::Rows(rows))
            .await
            .map_err(|_| self.gone())?;
        Ok(receipts)
    }

    async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Item::Flush(tx))
            .await
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())
    }
}

impl fmt::Debug for TableProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableProducer")
            .field("topic", &self.topic)
            .finish()
    }
}

/// Writes what a producer queues; ends when the producer is gone.
struct Writer {
    core: Arc<Core>,
    topic: Topic,
    channel: String,
    topic_id: i64,
    /// Most separate sends coalesced into one statement (1 without batching).
    batch: usize,
    /// Most rows of one statement.
    max_rows: usize,
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
                    Item::Rows(batch) if rows.is_empty() => rows = batch,
                    Item::Rows(batch) => rows.extend(batch),
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
            while !rows.is_empty() {
                let rest = if rows.len() > self.max_rows {
                    rows.split_off(self.max_rows)
                } else {
                    Vec::new()
                };
                self.write(std::mem::replace(&mut rows, rest)).await;
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
        }
    }

    /// Writes one batch, retrying a lost connection until the send timeout (or the backend
    /// closes), and completes its receipts.
    async fn write(&self, rows: Vec<Row>) {
        let deadline = Instant::now() + self.send_timeout;
        let mut retry = 0;
        loop {
            match self.try_write(&rows).await {
                Ok(ids) => {
                    self.core.listener.wake_local(&self.channel);
                    for (row, id) in rows.into_iter().zip(ids) {
                        let _ = row.reply.send(id);
                    }
                    return;
                }
                Err(e)
                    if retryable(&e)
                        && !self.core.life.is_closed()
                        && Instant::now() + RETRY.ceiling(retry + 1) < deadline =>
                {
                    retry += 1;
                    tracing::debug!(topic = %self.topic, error = %e, "publish failed; retrying");
                    tokio::time::sleep(RETRY.ceiling(retry)).await;
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
        let core = &self.core;
        let client = core.conn().await?;
        let stmt = client
            .run("prepare", client.prepare_cached(&core.sql.publish))
            .await?;
        let payloads: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_ref()).collect();
        let props: Vec<Option<&str>> = rows.iter().map(|r| r.properties.as_deref()).collect();
        let keys: Vec<Option<&str>> = rows.iter().map(|r| r.key.as_deref()).collect();
        let dedup: Vec<Option<&str>> = rows.iter().map(|r| r.dedup_id.as_deref()).collect();
        let result = client
            .run(
                "publish",
                client.query(
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
                ),
            )
            .await?;
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
                .run(
                    "de-duplication lookup",
                    client.query(&core.sql.dedup_lookup, &[&self.topic_id, &missing]),
                )
                .await?;
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
