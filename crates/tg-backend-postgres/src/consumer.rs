//! The consumer: for q1/q2 claims batches with `FOR UPDATE SKIP LOCKED`, waits on `NOTIFY`,
//! coalesces acknowledgements; for q0 the notifications themselves ([`crate::q0`]).
//!
//! A q1/q2 consumer claims only when a claim may find something: at its start, after a
//! notification of its channel (a publish, a nack, claims given back, the `LISTEN` connection
//! re-established), after a claim that filled its limit (more may be waiting), when a claimed
//! message of the subscription becomes visible again, and on the safety timer. Between those an
//! idle consumer sends no statement, however often the application calls `receive`.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tg_backend_api::kit::RawConsumer;
use tg_backend_api::{
    receive_timeout, AckHandle, Backoff, ConsumerOptions, ConsumerType, Error, ErrorKind,
    InitialPosition, Message, MessageId, Properties, Qos, Result, Topic,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::core::Core;
use crate::error::{clone_error, retryable};
use crate::listener::Registration;
use crate::properties;
use crate::q0::Q0Consumer;

/// Most acknowledgements one statement carries.
const ACK_BATCH: usize = 1024;

/// Longest wait for more acknowledgements to join a batch.
const ACK_LINGER: Duration = Duration::from_millis(1);

/// Waits before the retries of an acknowledgement statement that lost its connection.
const ACK_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1600));

/// Retries of one acknowledgement statement.
const ACK_RETRIES: u32 = 5;

/// Waits before the retries of a claim that lost its connection, within the receive timeout.
const CLAIM_RETRY: Backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));

/// The PostgreSQL consumer (as the kit sees it; applications get it as a `Box<dyn Consumer>`).
pub struct PostgresConsumer(Kind);

/// The two kinds, one per path.
enum Kind {
    /// q1/q2: claims rows of the deliveries table.
    Table(Box<TableConsumer>),
    /// q0: `NOTIFY`.
    Notify(Q0Consumer),
}

impl PostgresConsumer {
    pub(crate) async fn open(
        core: &Arc<Core>,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<Self> {
        Ok(if topic.qos() == Qos::Q0 {
            Self(Kind::Notify(
                Q0Consumer::create(core.clone(), topic.clone(), options, id).await?,
            ))
        } else {
            Self(Kind::Table(Box::new(
                TableConsumer::create(core.clone(), id, topic.clone(), options).await?,
            )))
        })
    }
}

impl RawConsumer for PostgresConsumer {
    async fn receive(&self, timeout: Duration) -> Result<Message> {
        match &self.0 {
            Kind::Table(c) => c.receive(timeout).await,
            Kind::Notify(c) => c.receive(timeout).await,
        }
    }

    async fn receive_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        match &self.0 {
            Kind::Table(c) => c.receive_batch(max, timeout).await,
            // notifications are already in this process: the kit's loop over `receive`
            Kind::Notify(c) => c.receive_batch(max, timeout).await,
        }
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        match &self.0 {
            Kind::Table(c) => c.acknowledge(message).await,
            Kind::Notify(c) => c.acknowledge(message).await,
        }
    }

    async fn acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        match &self.0 {
            Kind::Table(c) => c.acknowledge_batch(messages).await,
            // nothing to acknowledge on q0
            Kind::Notify(_) => Ok(()),
        }
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        match &self.0 {
            Kind::Table(c) => c.negative_acknowledge(message).await,
            Kind::Notify(c) => c.negative_acknowledge(message).await,
        }
    }

    async fn negative_acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        match &self.0 {
            Kind::Table(c) => c.negative_acknowledge_batch(messages).await,
            Kind::Notify(_) => Ok(()),
        }
    }

    async fn unsubscribe(&self) -> Result<()> {
        match &self.0 {
            Kind::Table(c) => c.unsubscribe().await,
            Kind::Notify(c) => c.unsubscribe().await,
        }
    }

    async fn close(&self) -> Result<()> {
        match &self.0 {
            Kind::Table(c) => c.release().await,
            Kind::Notify(c) => c.close().await,
        }
    }

    fn close_sync(&self) -> bool {
        match &self.0 {
            // giving the claims back takes a statement: the kit runs `close` in the background
            Kind::Table(_) => false,
            Kind::Notify(c) => c.close_sync(),
        }
    }
}

impl fmt::Debug for PostgresConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Table(c) => c.fmt(f),
            Kind::Notify(c) => c.fmt(f),
        }
    }
}

/// Acknowledgements for the ack task: one message (`more` empty, no allocation) or a batch.
struct AckReq {
    seq: i64,
    more: Vec<i64>,
    reply: oneshot::Sender<Result<()>>,
}

impl AckReq {
    fn len(&self) -> usize {
        1 + self.more.len()
    }

    fn seqs(&self) -> impl Iterator<Item = i64> + '_ {
        std::iter::once(self.seq).chain(self.more.iter().copied())
    }
}

/// When a q1/q2 consumer must claim next; kept across `receive` calls.
struct Poll {
    /// The wake-up count the last claim statement started after (`None`: no claim yet). A
    /// different count now means a notification came since.
    seen: Option<u64>,
    /// The last claim filled its limit: more may be waiting.
    more: bool,
    /// Claim at this time even without a notification: the safety timer, or a claimed message
    /// of the subscription becoming visible again.
    recheck_at: Instant,
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

/// The q1/q2 consumer.
pub(crate) struct TableConsumer {
    id: u64,
    /// Marks this consumer's claims in the deliveries table.
    token: i64,
    core: Arc<Core>,
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
    poll: Mutex<Poll>,
    /// When [`TableConsumer::next_visible_at`] last asked, and what it learnt.
    visible_check: Mutex<Option<(Instant, Option<Instant>)>>,
    lease: tokio::sync::Mutex<Option<Lease>>,
    acks: mpsc::Sender<AckReq>,
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

impl TableConsumer {
    async fn create(
        core: Arc<Core>,
        id: u64,
        topic: Topic,
        options: &ConsumerOptions,
    ) -> Result<Self> {
        let topic_id = core.topic_id(&topic).await?;
        let channel = core.channel(&topic);
        // listen first, so nothing committed after the subscription exists goes unnoticed
        let registration = core.listener.register(&channel, false, false).await?;
        let sub_id = {
            let mut conn = core.conn().await?;
            let (client, guard) = conn.parts();
            guard
                .bounded("subscribe", async {
                    let tx = client
                        .transaction()
                        .await
                        .map_err(|e| core.pg(e, "subscribe"))?;
                    let row = tx
                        .query_one(&core.sql.subscription, &[&topic_id, &options.subscription])
                        .await
                        .map_err(|e| core.pg(e, "subscribe"))?;
                    let (sub_id, created): (i64, bool) = (row.get(0), row.get(1));
                    if created && options.initial_position == InitialPosition::Earliest {
                        tx.execute(&core.sql.replay, &[&sub_id, &topic_id])
                            .await
                            .map_err(|e| core.pg(e, "replay retained messages"))?;
                    }
                    tx.commit().await.map_err(|e| core.pg(e, "subscribe"))?;
                    Ok(sub_id)
                })
                .await?
        };
        let lease = match options.consumer_type {
            ConsumerType::Shared => None,
            ConsumerType::Exclusive | ConsumerType::Failover => {
                let mut lease = Lease {
                    key: lock_key(&core.config.schema, sub_id),
                    conn: None,
                    held: false,
                    last_try: None,
                };
                let got = try_lock(&core, &mut lease).await?;
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
        tokio::spawn(ack_task(core.clone(), sub_id, ack_rx, outstanding.clone()));
        let wake = registration.wake.clone();
        Ok(Self {
            id,
            token,
            core,
            topic,
            subscription: options.subscription.clone(),
            sub_id,
            channel,
            kind: options.consumer_type,
            registration: Mutex::new(Some(registration)),
            wake,
            buffer: Mutex::new(VecDeque::new()),
            outstanding,
            fetch: tokio::sync::Mutex::new(()),
            poll: Mutex::new(Poll {
                seen: None,
                more: false,
                recheck_at: Instant::now(),
            }),
            visible_check: Mutex::new(None),
            lease: tokio::sync::Mutex::new(lease),
            acks,
        })
    }

    /// Takes a buffered message whose claim has not expired.
    fn pop(&self) -> Option<Message> {
        let vt = self.core.config.visibility_timeout;
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

    /// Moves buffered messages into `out` until it holds `max`.
    fn pop_into(&self, out: &mut Vec<Message>, max: usize) {
        while out.len() < max {
            match self.pop() {
                Some(m) => out.push(m),
                None => return,
            }
        }
    }

    /// `None` when a claim is due now, given the current wake-up count `version`; otherwise
    /// when it will be without a notification.
    fn not_due(&self, version: u64) -> Option<Instant> {
        let poll = self.poll.lock();
        if poll.seen != Some(version) || poll.more || Instant::now() >= poll.recheck_at {
            None
        } else {
            Some(poll.recheck_at)
        }
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
        let interval = self.core.config.lease_interval;
        if let Some(last) = lease.last_try {
            let since = last.elapsed();
            if since < interval {
                return Ok(Some(interval - since));
            }
        }
        if try_lock(&self.core, lease).await? {
            Ok(None)
        } else {
            Ok(Some(interval))
        }
    }

    /// Claims up to `limit` messages into the buffer with one statement, started after wake-up
    /// count `version`; then works out when the next claim is due without a notification.
    /// Runs nothing when another `receive` of this consumer claimed meanwhile (concurrent
    /// receives share one claim per notification).
    async fn claim(&self, limit: usize, version: u64) -> Result<()> {
        let fetch = self.fetch.lock().await;
        if !self.buffer.lock().is_empty() || self.not_due(version).is_some() {
            return Ok(());
        }
        let client = self.core.conn().await?;
        let stmt = client
            .run("prepare", client.prepare_cached(&self.core.sql.claim))
            .await?;
        let limit_param = limit as i64;
        let vt_ms = self.core.config.visibility_timeout.as_secs_f64() * 1000.0;
        let rows = client
            .run(
                "claim",
                client.query(
                    &stmt,
                    &[
                        &self.sub_id,
                        &limit_param,
                        &vt_ms,
                        &self.token,
                        &self.core.synchronous(),
                    ],
                ),
            )
            .await?;
        drop(client);
        let now = Instant::now();
        let n = rows.len();
        let safety = now + self.core.config.safety_interval;
        {
            let mut poll = self.poll.lock();
            poll.seen = Some(version);
            poll.more = n >= limit;
            // made sooner below when a claimed message becomes visible again before
            poll.recheck_at = safety;
        }
        {
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
                    props.map_or_else(Properties::new, |text| {
                        properties::from_json_logged(self.topic.as_str(), text)
                    }),
                    MessageId::from_u64(seq as u64),
                    AckHandle::new(self.id, seq as u64),
                )
                .with_redelivery_count(count.max(0) as u32)
                .with_key(key)
                .with_publish_time(UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64));
                buf.push_back((msg, now));
            }
        }
        drop(fetch);
        if n < limit {
            // the subscription is drained for now: without a notification, claim again on the
            // safety timer, or when a claimed message becomes visible again if that is sooner
            match self.next_visible_at().await {
                Ok(at) => self.poll.lock().recheck_at = at.min(safety),
                Err(e) => {
                    self.poll.lock().recheck_at = now;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// When a claimed message of the subscription may become visible again (an upper bound on
    /// how long to sleep without a notification). Asks the server at most once a second.
    async fn next_visible_at(&self) -> Result<Instant> {
        let now = Instant::now();
        let vt = self.core.config.visibility_timeout;
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
        let client = self.core.conn().await?;
        let stmt = client
            .run(
                "prepare",
                client.prepare_cached(&self.core.sql.next_visible),
            )
            .await?;
        let row = client
            .run("claim", client.query_one(&stmt, &[&self.sub_id]))
            .await?;
        let ms: Option<i64> = row.get(0);
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0) as u64 + 5)))
    }

    /// Gives back every claim of this consumer (count + 1 for those handed out), drops the lease.
    async fn release(&self) -> Result<()> {
        let delivered: Vec<i64> = self.outstanding.lock().drain().collect();
        self.buffer.lock().clear();
        let result = async {
            let client = self.core.conn().await?;
            client
                .run(
                    "release claims",
                    client.query(
                        &self.core.sql.release,
                        &[&self.sub_id, &self.token, &delivered, &self.channel],
                    ),
                )
                .await?;
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

async fn try_lock(core: &Core, lease: &mut Lease) -> Result<bool> {
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
        None => lease.conn.insert(core.dedicated().await?),
    };
    let got = core
        .bounded(
            "advisory lock",
            client.query_one("SELECT pg_try_advisory_lock($1)", &[&lease.key]),
        )
        .await
        .map(|row| row.get::<_, bool>(0));
    match got {
        Ok(got) => {
            lease.held = got;
            Ok(got)
        }
        Err(e) => {
            // (closing the connection frees a lock it might hold)
            lease.release();
            Err(e.unwrap_or_else(|| core.unanswered("advisory lock")))
        }
    }
}

/// Coalesces acknowledgements into one `DELETE`. When the application holds more received
/// messages than the batch acknowledges, more acknowledgements are on their way: wait up to
/// [`ACK_LINGER`] for them. A consumer that acknowledges each message before receiving the next
/// never waits. Ends with the consumer, or when the backend closes.
async fn ack_task(
    core: Arc<Core>,
    sub_id: i64,
    mut rx: mpsc::Receiver<AckReq>,
    outstanding: Arc<Mutex<HashSet<i64>>>,
) {
    let mut batch: Vec<AckReq> = Vec::with_capacity(64);
    loop {
        let first = tokio::select! {
            first = rx.recv() => first,
            () = core.life.closed() => None,
        };
        let Some(first) = first else { return };
        // acknowledgements in the batch (a request may carry many)
        let mut count = first.len();
        batch.push(first);
        let linger_until = Instant::now() + ACK_LINGER;
        loop {
            while count < ACK_BATCH {
                match rx.try_recv() {
                    Ok(r) => {
                        count += r.len();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            if count >= ACK_BATCH || count >= outstanding.lock().len() {
                break;
            }
            match tokio::time::timeout_at(linger_until, rx.recv()).await {
                Ok(Some(r)) => {
                    count += r.len();
                    batch.push(r);
                }
                _ => break,
            }
        }
        let seqs: Vec<i64> = batch.iter().flat_map(AckReq::seqs).collect();
        let mut attempt = 0;
        let result = loop {
            let r = async {
                let client = core.conn().await?;
                let stmt = client
                    .run("prepare", client.prepare_cached(&core.sql.ack))
                    .await?;
                client
                    .run(
                        "acknowledge",
                        client.execute(&stmt, &[&sub_id, &seqs, &core.synchronous()]),
                    )
                    .await?;
                Ok::<_, Error>(())
            }
            .await;
            match r {
                Err(e) if retryable(&e) && attempt < ACK_RETRIES && !core.life.is_closed() => {
                    attempt += 1;
                    tokio::time::sleep(ACK_RETRY.ceiling(attempt)).await;
                }
                other => break other,
            }
        };
        if result.is_ok() {
            let mut outstanding = outstanding.lock();
            for seq in &seqs {
                outstanding.remove(seq);
            }
        }
        for req in batch.drain(..) {
            let _ = req.reply.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(clone_error(e)),
            });
        }
    }
}

impl TableConsumer {
    async fn receive(&self, timeout: Duration) -> Result<Message> {
        // the common case under load, without the batch's allocation
        if let Some(m) = self.pop() {
            return Ok(m);
        }
        self.take(1, timeout)
            .await?
            .pop()
            .ok_or_else(|| receive_timeout(timeout))
    }

    /// Up to `max` messages: the buffered ones and, when a claim is due, those of one claim
    /// statement of up to `max(max - buffered, prefetch)` rows; when there are none, waits up to
    /// `timeout` for the first (for a notification or the next due claim, without statements).
    /// An empty batch means none came.
    async fn receive_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        self.take(max, timeout).await
    }

    async fn take(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        self.pop_into(&mut out, max);
        if out.len() >= max {
            return Ok(out);
        }
        let deadline = Instant::now() + timeout;
        let mut wake = self.wake.clone();
        // failed claims in a row
        let mut retry = 0;
        loop {
            // read before the claim: a notification from now on makes the next claim due
            let version = *wake.borrow_and_update();
            let mut wait_until = deadline;
            let mut claimed = false;
            if self.not_due(version).is_none() {
                let step: Result<Option<Duration>> = async {
                    match self.active().await? {
                        // a failover standby: try the lock again then
                        Some(standby) => Ok(Some(standby)),
                        None => {
                            let limit = (max - out.len()).max(self.core.config.prefetch);
                            self.claim(limit, version).await?;
                            Ok(None)
                        }
                    }
                }
                .await;
                match step {
                    Ok(Some(standby)) => {
                        retry = 0;
                        wait_until = wait_until.min(Instant::now() + standby);
                    }
                    Ok(None) => {
                        retry = 0;
                        claimed = true;
                    }
                    Err(e) if retryable(&e) && Instant::now() < deadline => {
                        tracing::debug!(subscription = %self.subscription, error = %e, "claim failed; retrying");
                        retry += 1;
                        wait_until = wait_until.min(Instant::now() + CLAIM_RETRY.ceiling(retry));
                    }
                    // what was taken is handed out; a lasting failure shows at the next call
                    Err(_) if !out.is_empty() => return Ok(out),
                    Err(e) => return Err(e.with_context("subscription", &self.subscription)),
                }
            }
            self.pop_into(&mut out, max);
            if !out.is_empty() || Instant::now() >= deadline {
                return Ok(out);
            }
            match self.not_due(version) {
                Some(recheck) => wait_until = wait_until.min(recheck),
                // due again after a claim that found nothing to hand out (another receive of
                // this consumer took it, or it filled its limit with claims about to expire)
                None if claimed => continue,
                None => {}
            }
            tokio::select! {
                _ = wake.changed() => {}
                () = tokio::time::sleep_until(wait_until) => {}
            }
        }
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        let seq = message.ack_handle().seq() as i64;
        self.ack(seq, Vec::new()).await
    }

    /// One `DELETE` for the whole batch (with whatever other acknowledgements join it).
    async fn acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        let mut seqs = messages.iter().map(|m| m.ack_handle().seq() as i64);
        let Some(seq) = seqs.next() else {
            return Ok(());
        };
        self.ack(seq, seqs.collect()).await
    }

    async fn ack(&self, seq: i64, more: Vec<i64>) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.acks
            .send(AckReq { seq, more, reply })
            .await
            .map_err(|_| Error::closed("consumer"))?;
        // the ack task took the acknowledged ones off `outstanding`
        let result = rx.await.map_err(|_| Error::closed("consumer"))?;
        result.map_err(|e| e.with_context("subscription", &self.subscription))
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        self.nack(vec![message.ack_handle().seq() as i64]).await
    }

    /// One `UPDATE` for the whole batch.
    async fn negative_acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        self.nack(
            messages
                .iter()
                .map(|m| m.ack_handle().seq() as i64)
                .collect(),
        )
        .await
    }

    async fn nack(&self, seqs: Vec<i64>) -> Result<()> {
        let client = self.core.conn().await?;
        client
            .run(
                "negative acknowledge",
                client.query(
                    &self.core.sql.nack,
                    &[
                        &self.sub_id,
                        &seqs,
                        &self.token,
                        &self.core.synchronous(),
                        &self.channel,
                    ],
                ),
            )
            .await?;
        drop(client);
        {
            let mut outstanding = self.outstanding.lock();
            for seq in &seqs {
                outstanding.remove(seq);
            }
        }
        self.core.listener.wake_local(&self.channel);
        Ok(())
    }

    /// Deletes the subscription with its delivery rows, and lets go of everything else.
    async fn unsubscribe(&self) -> Result<()> {
        let client = self.core.conn().await?;
        client
            .run(
                "unsubscribe",
                client.execute(&self.core.sql.unsubscribe, &[&self.sub_id]),
            )
            .await?;
        drop(client);
        self.buffer.lock().clear();
        self.outstanding.lock().clear();
        if let Some(lease) = self.lease.lock().await.as_mut() {
            lease.release();
        }
        self.registration.lock().take();
        Ok(())
    }
}

impl fmt::Debug for TableConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableConsumer")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("subscription", &self.subscription)
            .field("type", &self.kind)
            .finish()
    }
}
