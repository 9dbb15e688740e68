//! q0: `NOTIFY` carrying the message; only listeners connected now receive it.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tg_backend_api::{
    next_consumer_id, receive_timeout, AckHandle, Consumer, ConsumerOptions, Error, Message,
    MessageId, OutboundMessage, Producer, Result, SendReceipt, Topic,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::Shared;
use crate::error::retryable;
use crate::listener::Registration;
use crate::producer::clone_error;
use crate::topic::{decode_q0, encode_q0, Q0_MAX_PAYLOAD};

/// Most notifications one statement sends.
const Q0_BATCH: usize = 1000;

struct Note {
    id: String,
    text: String,
    reply: oneshot::Sender<Result<MessageId>>,
}

enum Item {
    Note(Note),
    Flush(oneshot::Sender<()>),
}

pub(crate) struct Q0Producer {
    shared: Arc<Shared>,
    topic: Topic,
    prefix: String,
    counter: AtomicU64,
    tx: mpsc::Sender<Item>,
    closed: AtomicBool,
}

impl Q0Producer {
    pub(crate) fn new(shared: Arc<Shared>, topic: Topic) -> Self {
        let (tx, rx) = mpsc::channel(Q0_BATCH * 2);
        let channel = shared.channel(&topic);
        tokio::spawn(writer(shared.clone(), channel, rx));
        let prefix = format!("{:08x}", rand::random::<u32>());
        Self {
            shared,
            topic,
            prefix,
            counter: AtomicU64::new(0),
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

async fn writer(shared: Arc<Shared>, channel: String, mut rx: mpsc::Receiver<Item>) {
    let mut notes: Vec<Note> = Vec::with_capacity(Q0_BATCH);
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Item::Note(n) => notes.push(n),
                Item::Flush(f) => {
                    flushes.push(f);
                    break;
                }
            }
            if notes.len() >= Q0_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !notes.is_empty() {
            let texts: Vec<&str> = notes.iter().map(|n| n.text.as_str()).collect();
            let mut attempt = 0;
            let result = loop {
                let r = async {
                    let client = shared.conn().await?;
                    let stmt = client
                        .prepare_cached("SELECT pg_notify($1, x) FROM unnest($2::text[]) AS x")
                        .await
                        .map_err(|e| shared.pg(e, "prepare"))?;
                    client
                        .query(&stmt, &[&channel, &texts])
                        .await
                        .map_err(|e| shared.pg(e, "NOTIFY"))?;
                    Ok::<_, Error>(())
                }
                .await;
                match r {
                    Err(e) if retryable(&e) && attempt < 3 && shared.check_open().is_ok() => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    }
                    other => break other,
                }
            };
            drop(texts);
            for n in notes.drain(..) {
                let _ = n.reply.send(match &result {
                    Ok(()) => Ok(MessageId::from_text(n.id)),
                    Err(e) => Err(clone_error(e)),
                });
            }
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }
}

#[async_trait]
impl Producer for Q0Producer {
    fn topic(&self) -> &Topic {
        &self.topic
    }

    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        self.check_open()?;
        if message.payload().len() > Q0_MAX_PAYLOAD {
            return Err(
                Error::payload_too_large(message.payload().len(), Q0_MAX_PAYLOAD)
                    .with_context("topic", &self.topic),
            );
        }
        if message.is_retained() {
            return Err(
                Error::unsupported("the PostgreSQL backend keeps no retained messages")
                    .with_context("topic", &self.topic),
            );
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", self.prefix);
        let text = encode_q0(
            &id,
            message.payload(),
            message.properties(),
            message.key_str(),
        )
        .map_err(|e| e.with_context("topic", &self.topic))?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Item::Note(Note { id, text, reply }))
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
            .map_err(|_| Error::closed("producer"))?;
        rx.await.map_err(|_| Error::closed("producer"))
    }

    async fn close(&self) -> Result<()> {
        if !self.closed.load(Ordering::Acquire) && self.shared.check_open().is_ok() {
            let (tx, rx) = oneshot::channel();
            if self.tx.send(Item::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        }
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

impl fmt::Debug for Q0Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Q0Producer")
            .field("topic", &self.topic)
            .finish()
    }
}

pub(crate) struct Q0Consumer {
    id: u64,
    shared: Arc<Shared>,
    topic: Topic,
    subscription: String,
    rx: tokio::sync::Mutex<broadcast::Receiver<Arc<str>>>,
    registration: parking_lot::Mutex<Option<Registration>>,
    closed: AtomicBool,
    closing: tokio::sync::watch::Sender<bool>,
}

impl Q0Consumer {
    pub(crate) async fn create(
        shared: Arc<Shared>,
        topic: Topic,
        options: ConsumerOptions,
    ) -> Result<Self> {
        let key = (topic.as_str().to_owned(), options.subscription.clone());
        if !shared.q0_subs.lock().insert(key.clone()) {
            return Err(Error::unsupported(
                "q0 subscriptions on PostgreSQL take one consumer: NOTIFY cannot make consumers compete",
            )
            .with_context("topic", &topic)
            .with_context("subscription", &options.subscription));
        }
        let channel = shared.channel(&topic);
        let registration = match shared.listener.register(&channel, true, true).await {
            Ok(r) => r,
            Err(e) => {
                shared.q0_subs.lock().remove(&key);
                return Err(e.with_context("topic", &topic));
            }
        };
        let mut registration = registration;
        let rx = registration
            .q0
            .take()
            .ok_or_else(|| Error::connection("no q0 channel"))?;
        Ok(Self {
            id: next_consumer_id(),
            shared,
            topic,
            subscription: options.subscription,
            rx: tokio::sync::Mutex::new(rx),
            registration: parking_lot::Mutex::new(Some(registration)),
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

    fn decode(&self, text: &str) -> Option<Message> {
        match decode_q0(text) {
            Ok(m) => Some(
                Message::new(
                    m.payload,
                    m.properties,
                    MessageId::from_text(m.id),
                    AckHandle::new(self.id, 0),
                )
                .with_key(m.key)
                .with_publish_time(m.received),
            ),
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "skipping a foreign notification");
                None
            }
        }
    }

    fn lagged(&self, n: u64) {
        tracing::warn!(topic = %self.topic, lost = n, "q0 consumer fell behind; notifications dropped");
    }

    fn detach(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.closing.send_replace(true);
            self.registration.lock().take();
            self.shared
                .q0_subs
                .lock()
                .remove(&(self.topic.as_str().to_owned(), self.subscription.clone()));
        }
    }
}

#[async_trait]
impl Consumer for Q0Consumer {
    fn topic(&self) -> &Topic {
        &self.topic
    }

    fn subscription(&self) -> &str {
        &self.subscription
    }

    async fn receive(&self, timeout: Duration) -> Result<Message> {
        self.check_open()?;
        let mut rx = self.rx.lock().await;
        // what is already buffered, without arming a timer
        loop {
            match rx.try_recv() {
                Ok(text) => {
                    if let Some(m) = self.decode(&text) {
                        return Ok(m);
                    }
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Lagged(n)) => self.lagged(n),
                Err(broadcast::error::TryRecvError::Closed) => {
                    return Err(Error::closed("consumer"))
                }
            }
        }
        let deadline = Instant::now() + timeout;
        let mut closing = self.closing.subscribe();
        loop {
            let next = tokio::select! {
                r = rx.recv() => r,
                _ = tokio::time::sleep_until(deadline) => return Err(receive_timeout(timeout)),
                _ = closing.changed() => return Err(Error::closed("consumer")),
            };
            match next {
                Ok(text) => {
                    if let Some(m) = self.decode(&text) {
                        return Ok(m);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => self.lagged(n),
                Err(broadcast::error::RecvError::Closed) => return Err(Error::closed("consumer")),
            }
        }
    }

    async fn acknowledge(&self, _message: &Message) -> Result<()> {
        Ok(())
    }

    async fn negative_acknowledge(&self, _message: &Message) -> Result<()> {
        Ok(())
    }

    async fn unsubscribe(&self) -> Result<()> {
        self.check_open()?;
        self.detach();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.detach();
        Ok(())
    }
}

impl Drop for Q0Consumer {
    fn drop(&mut self) {
        self.detach();
    }
}

impl fmt::Debug for Q0Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Q0Consumer")
            .field("topic", &self.topic)
            .field("subscription", &self.subscription)
            .finish()
    }
}
