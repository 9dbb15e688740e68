//! The q1/q2 consumer: claims batches with `FOR UPDATE SKIP LOCKED`, waits on `NOTIFY`,
//! coalesces acknowledgements.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tg_backend_api::{
    receive_timeout, AckHandle, Consumer, ConsumerOptions, ConsumerType, Error, ErrorKind,
    InitialPosition, Message, MessageId, Result, Topic,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::Shared;
use crate::error::retryable;
use crate::listener::Registration;
use crate::producer::clone_error;
use crate::topic::properties_from_json;

/// Most acknowledgements one statement carries.
const ACK_BATCH: usize = 1024;

/// Longest wait for more acknowledgements to join a batch.
const ACK_LINGER: Duration = Duration::from_millis(1);

struct AckReq {
    seq: i64,
    reply: oneshot::Sender<Result<()>>,
}

/// The advisory lock of an exclusive or failover consumer, on its own connection.
/// A standby keeps its connection between attempts; closing the connection frees the lock.
struct Lease {
    key: i64,
    conn: Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>,
    held: bool,
    last_try: Option<Instant>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}

impl Lease {
    fn release(&mut self) {
        self.held = false;
        if let Some((client, task)) = self.conn.take() {
            drop(client);
            task.abort();
        }
    }
}

pub(crate) struct PgConsumer {
    id: u64,
    token: i64,
    shared: Arc<Shared>,
    topic: Topic,
    subscription: String,
    sub_id: i64,
    channel: String,
    kind: ConsumerType,
    registration: Mutex<Option<Registration>>,
    wake: tokio::sync::watch::Receiver<u64>,
    buffer: Mutex<VecDeque<(Message, Instant)>>,
    /// Seqs handed to the application and not yet acknowledged.
    outstanding: Arc<Mutex<HashSet<i64>>>,
    fetch: tokio::sync::Mutex<()>,
    /// When [`PgConsumer::next_visible_at`] last asked, and what it learnt.
    visible_check: Mutex<Option<(Instant, Option<Instant>)>>,
    lease: tokio::sync::Mutex<Option<Lease>>,
    acks: mpsc::Sender<AckReq>,
    closed: AtomicBool,
    closing: tokio::sync::watch::Sender<bool>,
}

fn lock_key(schema: &str, sub_id: i64) -> i64 {
    let mut h = Sha256::new();
    h.update(b"tgps-lease\0");
    h.update(schema.as_bytes());
    h.update([0u8]);
    h.update(sub_id.to_be_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

impl PgConsumer {
    pub(crate) async fn create(
        shared: Arc<Shared>,
        id: u64,
        topic: Topic,
        options: ConsumerOptions,
    ) -> Result<Self> {
        let topic_id = shared.topic_id(&topic).await?;
        let channel = shared.channel(&topic);
        // listen first, so nothing committed after the subscription exists goes unnoticed
        let registration = shared.listener.register(&channel, false, false).await?;
        let sub_id = {
            let mut client = shared.conn().await?;
            let tx = client
                .transaction()
                .await
                .map_err(|e| shared.pg(e, "subscribe"))?;
            let row = tx
                .query_one(
                    &shared.sql.subscription,
                    &[&topic_id, &options.subscription],
                )
                .await
                .map_err(|e| shared.pg(e, "subscribe"))?;
            let (sub_id, created): (i64, bool) = (row.get(0), row.get(1));
            if created && options.initial_position == InitialPosition::Earliest {
                tx.execute(&shared.sql.replay, &[&sub_id, &topic_id])
                    .await
                    .map_err(|e| shared.pg(e, "replay retained messages"))?;
            }
            tx.commit().await.map_err(|e| shared.pg(e, "subscribe"))?;
            sub_id
        };
        let lease = match options.consumer_type {
            ConsumerType::Shared => None,
            ConsumerType::Exclusive | ConsumerType::Failover => {
                let mut lease = Lease {
                    key: lock_key(&shared.config.schema, sub_id),
                    conn: None,
                    held: false,
                    last_try: None,
                };
                let got = try_lock(&shared, &mut lease).await?;
                if !got && options.consumer_type == ConsumerType::Exclusive {
                    return Err(Error::new(
                        ErrorKind::ConsumerBusy,
                        "the exclusive subscription already has a consumer",
                    )
                    .with_context("topic", &topic)
                    .with_context("subscription", &options.subscription));
                }
                Some(lease)
            }
        };
        let mut token_bytes = [0u8; 8];
        rand::Rng::fill(&mut rand::thread_rng(), &mut token_bytes);
        let token = i64::from_be_bytes(token_bytes) & i64::MAX;
        let (acks, ack_rx) = mpsc::channel(ACK_BATCH * 4);
        let outstanding = Arc::new(Mutex::new(HashSet::new()));
        tokio::spawn(ack_task(
            shared.clone(),
            sub_id,
            ack_rx,
            outstanding.clone(),
        ));
        let wake = registration.wake.clone();
        Ok(Self {
            id,
            token,
            shared,
            topic,
            subscription: options.subscription,
            sub_id,
            channel,
            kind: options.consumer_type,
            registration: Mutex::new(Some(registration)),
            wake,
            buffer: Mutex::new(VecDeque::new()),
            outstanding,
            fetch: tokio::sync::Mutex::new(()),
            visible_check: Mutex::new(None),
            lease: tokio::sync::Mutex::new(lease),
            acks,
            closed: AtomicBool::new(false),
            closing: tokio::sync::watch::channel(false).0,
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("consumer")
                .with_context("topic", &self.topic)
                .with_context("subscription", &self.subscription));
        }
        self.shared.check_open()
    }

    /// Takes a buffered message whose claim has not expired.
    fn pop(&self) -> Option<Message> {
        let vt = self.shared.config.visibility_timeout;
        let mut buf = self.buffer.lock();
        while let Some((m, claimed)) = buf.pop_front() {
            // a claim near its expiry may already be someone else's: skip it, it comes back
            if claimed.elapsed() + Duration::from_millis(500) < vt {
                self.outstanding.lock().insert(m.ack_handle().seq() as i64);
                return Some(m);
            }
        }
        None
    }

    /// Whether this consumer may take messages now (always, unless failover standby).
    /// Returns the time to check again when not.
    async fn active(&self) -> Result<Option<Duration>> {
        let mut guard = self.lease.lock().await;
        let Some(lease) = guard.as_mut() else {
            return Ok(None);
        };
        if lease.held {
            if lease
                .conn
                .as_ref()
                .is_some_and(|(client, _)| !client.is_closed())
            {
                return Ok(None);
            }
            tracing::warn!(subscription = %self.subscription, "lost the advisory-lock connection; re-acquiring");
            lease.release();
        }
        let interval = self.shared.config.lease_interval;
        if let Some(last) = lease.last_try {
            let since = last.elapsed();
            if since < interval {
                return Ok(Some(interval - since));
            }
        }
        if try_lock(&self.shared, lease).await? {
            Ok(None)
        } else {
            Ok(Some(interval))
        }
    }

    /// Claims a batch into the buffer; returns how many.
    async fn claim(&self) -> Result<usize> {
        let _fetch = self.fetch.lock().await;
        if !self.buffer.lock().is_empty() {
            return Ok(1);
        }
        let client = self.shared.conn().await?;
        let stmt = client
            .prepare_cached(&self.shared.sql.claim)
            .await
            .map_err(|e| self.shared.pg(e, "prepare"))?;
        let limit = self.shared.config.prefetch as i64;
        let vt_ms = self.shared.config.visibility_timeout.as_secs_f64() * 1000.0;
        let rows = client
            .query(
                &stmt,
                &[
                    &self.sub_id,
                    &limit,
                    &vt_ms,
                    &self.token,
                    &self.shared.synchronous(),
                ],
            )
            .await
            .map_err(|e| self.shared.pg(e, "claim"))?;
        let now = Instant::now();
        let n = rows.len();
        let mut buf = self.buffer.lock();
        for row in rows {
            let seq: i64 = row.get(0);
            let count: i32 = row.get(1);
            let payload: Vec<u8> = row.get(2);
            let props: Option<&str> = row.get(3);
            let key: Option<String> = row.get(4);
            let micros: i64 = row.get(5);
            let msg = Message::new(
                Bytes::from(payload),
                properties_from_json(props),
                MessageId::from_u64(seq as u64),
                AckHandle::new(self.id, seq as u64),
            )
            .with_redelivery_count(count.max(0) as u32)
            .with_key(key)
            .with_publish_time(UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64));
            buf.push_back((msg, now));
        }
        Ok(n)
    }

    /// When a claimed message of the subscription may become visible again (an upper bound on
    /// how long to sleep without a notification). Asks the server at most once a second.
    async fn next_visible_at(&self) -> Result<Instant> {
        let now = Instant::now();
        let vt = self.shared.config.visibility_timeout;
        if let Some((checked, next)) = *self.visible_check.lock() {
            let fresh = now.duration_since(checked) < Duration::from_secs(1);
            let not_passed = match next {
                Some(n) => n > now,
                None => true,
            };
            if fresh && not_passed {
                return Ok(next.map_or(checked + vt, |n| n.min(checked + vt)));
            }
        }
        let next = self.next_visible().await?.map(|d| now + d);
        *self.visible_check.lock() = Some((now, next));
        Ok(next.map_or(now + vt, |n| n.min(now + vt)))
    }

    /// How long until a claimed message of the subscription becomes visible again.
    async fn next_visible(&self) -> Result<Option<Duration>> {
        let client = self.shared.conn().await?;
        let stmt = client
            .prepare_cached(&self.shared.sql.next_visible)
            .await
            .map_err(|e| self.shared.pg(e, "prepare"))?;
        let row = client
            .query_one(&stmt, &[&self.sub_id])
            .await
            .map_err(|e| self.shared.pg(e, "claim"))?;
        let ms: Option<i64> = row.get(0);
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0) as u64 + 5)))
    }

    fn own_seq(&self, message: &Message) -> Result<i64> {
        let handle = message.ack_handle();
        if handle.consumer() != self.id {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the message was received by another consumer; acknowledge it there",
            )
            .with_context("message_id", message.id()));
        }
        Ok(handle.seq() as i64)
    }

    /// Gives back every claim of this consumer (count + 1 for those handed out), drops the lease.
    async fn release(&self) -> Result<()> {
        let delivered: Vec<i64> = self.outstanding.lock().drain().collect();
        self.buffer.lock().clear();
        let result = async {
            let client = self.shared.conn().await?;
            client
                .query(
                    &self.shared.sql.release,
                    &[&self.sub_id, &self.token, &delivered, &self.channel],
                )
                .await
                .map_err(|e| self.shared.pg(e, "release claims"))?;
            Ok::<_, Error>(())
        }
        .await;
        if let Some(lease) = self.lease.lock().await.as_mut() {
            lease.release();
        }
        self.registration.lock().take();
        result
    }
}

async fn try_lock(shared: &Shared, lease: &mut Lease) -> Result<bool> {
    lease.last_try = Some(Instant::now());
    if lease
        .conn
        .as_ref()
        .is_some_and(|(client, _)| client.is_closed())
    {
        lease.release();
    }
    let (client, _) = match &lease.conn {
        Some(conn) => conn,
        None => lease.conn.insert(shared.dedicated().await?),
    };
    let got: std::result::Result<bool, _> = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&lease.key])
        .await
        .map(|row| row.get(0));
    match got {
        Ok(got) => {
            lease.held = got;
            Ok(got)
        }
        Err(e) => {
            lease.release();
            Err(shared.pg(e, "advisory lock"))
        }
    }
}

/// Coalesces acknowledgements into one `DELETE`. When the application holds more received
/// messages than the batch acknowledges, more acknowledgements are on their way: wait up to
/// [`ACK_LINGER`] for them. A consumer that acknowledges each message before receiving the next
/// never waits.
async fn ack_task(
    shared: Arc<Shared>,
    sub_id: i64,
    mut rx: mpsc::Receiver<AckReq>,
    outstanding: Arc<Mutex<HashSet<i64>>>,
) {
    let mut batch: Vec<AckReq> = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let linger_until = Instant::now() + ACK_LINGER;
        loop {
            while batch.len() < ACK_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if batch.len() >= ACK_BATCH || batch.len() >= outstanding.lock().len() {
                break;
            }
            match tokio::time::timeout_at(linger_until, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                _ => break,
            }
        }
        let seqs: Vec<i64> = batch.iter().map(|r| r.seq).collect();
        let mut attempt = 0;
        let result = loop {
            let r = async {
                let client = shared.conn().await?;
                let stmt = client
                    .prepare_cached(&shared.sql.ack)
                    .await
                    .map_err(|e| shared.pg(e, "prepare"))?;
                client
                    .execute(&stmt, &[&sub_id, &seqs, &shared.synchronous()])
                    .await
                    .map_err(|e| shared.pg(e, "acknowledge"))?;
                Ok::<_, Error>(())
            }
            .await;
            match r {
                Err(e) if retryable(&e) && attempt < 5 && shared.check_open().is_ok() => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                other => break other,
            }
        };
        for req in batch.drain(..) {
            let _ = req.reply.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(clone_error(e)),
            });
        }
    }
}

#[async_trait]
impl Consumer for PgConsumer {
    fn topic(&self) -> &Topic {
        &self.topic
    }

    fn subscription(&self) -> &str {
        &self.subscription
    }

    async fn receive(&self, timeout: Duration) -> Result<Message> {
        self.check_open()?;
        if let Some(m) = self.pop() {
            return Ok(m);
        }
        let deadline = Instant::now() + timeout;
        let mut closing = self.closing.subscribe();
        let mut wake = self.wake.clone();
        let mut backoff = Duration::from_millis(20);
        loop {
            self.check_open()?;
            wake.borrow_and_update();
            if let Some(m) = self.pop() {
                return Ok(m);
            }
            let mut wait_until = deadline.min(Instant::now() + self.shared.config.safety_interval);
            let step: Result<()> = async {
                match self.active().await? {
                    Some(retry) => {
                        wait_until = wait_until.min(Instant::now() + retry);
                        Ok(())
                    }
                    None => {
                        if self.claim().await? > 0 {
                            return Ok(());
                        }
                        wait_until = wait_until.min(self.next_visible_at().await?);
                        Ok(())
                    }
                }
            }
            .await;
            match step {
                Ok(()) => backoff = Duration::from_millis(20),
                Err(e) if retryable(&e) && Instant::now() < deadline => {
                    tracing::debug!(subscription = %self.subscription, error = %e, "claim failed; retrying");
                    wait_until = wait_until.min(Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e.with_context("subscription", &self.subscription)),
            }
            if let Some(m) = self.pop() {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                return Err(receive_timeout(timeout));
            }
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep_until(wait_until) => {}
                _ = closing.changed() => {}
            }
        }
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        let seq = self.own_seq(message)?;
        self.check_open()?;
        let (reply, rx) = oneshot::channel();
        self.acks
            .send(AckReq { seq, reply })
            .await
            .map_err(|_| Error::closed("consumer"))?;
        let result = rx.await.map_err(|_| Error::closed("consumer"))?;
        if result.is_ok() {
            self.outstanding.lock().remove(&seq);
        }
        result.map_err(|e| e.with_context("subscription", &self.subscription))
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        let seq = self.own_seq(message)?;
        self.check_open()?;
        let client = self.shared.conn().await?;
        client
            .query(
                &self.shared.sql.nack,
                &[
                    &self.sub_id,
                    &vec![seq],
                    &self.token,
                    &self.shared.synchronous(),
                    &self.channel,
                ],
            )
            .await
            .map_err(|e| self.shared.pg(e, "negative acknowledge"))?;
        self.outstanding.lock().remove(&seq);
        self.shared.listener.wake_local(&self.channel);
        Ok(())
    }

    async fn unsubscribe(&self) -> Result<()> {
        self.check_open()?;
        let client = self.shared.conn().await?;
        client
            .execute(&self.shared.sql.unsubscribe, &[&self.sub_id])
            .await
            .map_err(|e| self.shared.pg(e, "unsubscribe"))?;
        drop(client);
        self.closed.store(true, Ordering::Release);
        self.closing.send_replace(true);
        self.buffer.lock().clear();
        self.outstanding.lock().clear();
        if let Some(lease) = self.lease.lock().await.as_mut() {
            lease.release();
        }
        self.registration.lock().take();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.closing.send_replace(true);
        if self.shared.check_open().is_err() {
            return Ok(());
        }
        self.release().await
    }
}

impl Drop for PgConsumer {
    fn drop(&mut self) {
        if self.closed.swap(true, Ordering::AcqRel) || self.shared.check_open().is_err() {
            return;
        }
        // dropped without close: give the claims back in the background
        let shared = self.shared.clone();
        let (sub_id, token, channel) = (self.sub_id, self.token, self.channel.clone());
        let delivered: Vec<i64> = self.outstanding.lock().drain().collect();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Ok(client) = shared.conn().await {
                    let _ = client
                        .query(
                            &shared.sql.release,
                            &[&sub_id, &token, &delivered, &channel],
                        )
                        .await;
                }
            });
        }
    }
}

impl fmt::Debug for PgConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConsumer")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("subscription", &self.subscription)
            .field("type", &self.kind)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}
