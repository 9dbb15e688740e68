//! q0: `NOTIFY` carrying the message; only listeners connected now receive it. The notification
//! text is `id \n header \n base64(payload)`, the header empty or a JSON object
//! `{"p": properties, "k": key}`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use tg_backend_api::kit::{RawConsumer, RawProducer};
use tg_backend_api::{
    receive_timeout, AckHandle, Backoff, ConsumerOptions, Error, ErrorKind, Message, MessageId,
    OutboundMessage, Properties, Result, SendReceipt, Topic,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::core::Core;
use crate::error::{clone_error, retryable};
use crate::listener::Registration;
use crate::properties;

/// Most notifications one statement sends.
const Q0_BATCH: usize = 1000;

/// Waits before the retries of a `NOTIFY` statement that lost its connection.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));

/// Retries of one `NOTIFY` statement.
const RETRIES: u32 = 3;

/// Longest `NOTIFY` payload PostgreSQL accepts with the default block size: the payload string
/// must be shorter than 8000 bytes.
pub const NOTIFY_MAX: usize = 7999;

/// Longest q0 message id: 8 hex digits, `-`, and a decimal `u64`.
const ID_MAX: usize = 8 + 1 + 20;

/// Largest q0 payload that always fits a notification when it has no properties and no key:
/// base64 needs 4 bytes per 3, after the id and two newlines.
pub const Q0_MAX_PAYLOAD: usize = (NOTIFY_MAX - ID_MAX - 2) / 4 * 3;

struct Note {
    id: String,
    text: String,
    reply: oneshot::Sender<Result<MessageId>>,
}

enum Item {
    Note(Note),
    /// A `send_batch`, encoded whole before any of it was queued.
    Notes(Vec<Note>),
    Flush(oneshot::Sender<()>),
}

/// The q0 producer: a bounded channel into a task that sends batches of notifications.
pub(crate) struct Q0Producer {
    topic: Topic,
    prefix: String,
    counter: AtomicU64,
    tx: mpsc::Sender<Item>,
}

impl Q0Producer {
    pub(crate) fn new(core: Arc<Core>, topic: Topic) -> Self {
        let (tx, rx) = mpsc::channel(Q0_BATCH * 2);
        let channel = core.channel(&topic);
        tokio::spawn(writer(core, channel, rx));
        let prefix = format!("{:08x}", rand::random::<u32>());
        Self {
            topic,
            prefix,
            counter: AtomicU64::new(0),
            tx,
        }
    }

    fn gone(&self) -> Error {
        Error::closed("producer").with_context("topic", &self.topic)
    }
}

/// Sends what the producer queues, up to [`Q0_BATCH`] notifications per statement; ends when the
/// producer is gone.
async fn writer(core: Arc<Core>, channel: String, mut rx: mpsc::Receiver<Item>) {
    let mut notes: Vec<Note> = Vec::with_capacity(Q0_BATCH);
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Item::Note(n) => notes.push(n),
                Item::Notes(batch) => notes.extend(batch),
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
        while !notes.is_empty() {
            let rest = if notes.len() > Q0_BATCH {
                notes.split_off(Q0_BATCH)
            } else {
                Vec::new()
            };
            let texts: Vec<&str> = notes.iter().map(|n| n.text.as_str()).collect();
            let mut attempt = 0;
            let result = loop {
                let r = async {
                    let client = core.conn().await?;
                    let stmt = client
                        .run(
                            "prepare",
                            client.prepare_cached(
                                "SELECT pg_notify($1, x) FROM unnest($2::text[]) AS x",
                            ),
                        )
                        .await?;
                    client
                        .run("NOTIFY", client.query(&stmt, &[&channel, &texts]))
                        .await?;
                    Ok::<_, Error>(())
                }
                .await;
                match r {
                    Err(e) if retryable(&e) && attempt < RETRIES && !core.life.is_closed() => {
                        attempt += 1;
                        tokio::time::sleep(RETRY.ceiling(attempt)).await;
                    }
                    other => break other,
                }
            };
            drop(texts);
            for n in std::mem::replace(&mut notes, rest) {
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

impl Q0Producer {
    /// The notification of `message` and its receipt; fails when it does not fit `NOTIFY`.
    fn note(&self, message: &OutboundMessage) -> Result<(Note, SendReceipt)> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", self.prefix);
        let text = encode(
            &id,
            message.payload(),
            message.properties(),
            message.key_str(),
        )
        .map_err(|e| e.with_context("topic", &self.topic))?;
        let (reply, rx) = oneshot::channel();
        Ok((Note { id, text, reply }, SendReceipt::from_channel(rx)))
    }
}

impl RawProducer for Q0Producer {
    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        let (note, receipt) = self.note(&message)?;
        self.tx
            .send(Item::Note(note))
            .await
            .map_err(|_| self.gone())?;
        Ok(receipt)
    }

    /// Encodes every message first, so that one too large for `NOTIFY` (payload, properties
    /// and key together: a limit the kit's payload check cannot see) fails the batch with
    /// nothing sent; then sends them in one statement.
    async fn send_batch(&self, messages: Vec<OutboundMessage>) -> Result<Vec<SendReceipt>> {
        let mut notes = Vec::with_capacity(messages.len());
        let mut receipts = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            let (note, receipt) = self
                .note(message)
                .map_err(|e| e.with_context("batch_index", index))?;
            notes.push(note);
            receipts.push(receipt);
        }
        self.tx
            .send(Item::Notes(notes))
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

    async fn close(&self) -> Result<()> {
        // what was sent before the close still goes out; a failure is in its receipt
        let _ = self.flush().await;
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

/// The q0 consumer: the notifications of its topic's channel, fanned out in this process. One
/// per subscription and process: `NOTIFY` reaches every listener, so consumers cannot compete.
pub(crate) struct Q0Consumer {
    id: u64,
    core: Arc<Core>,
    topic: Topic,
    subscription: String,
    rx: tokio::sync::Mutex<broadcast::Receiver<Arc<str>>>,
    registration: parking_lot::Mutex<Option<Registration>>,
    /// Whether this consumer gave its subscription up (subscription state; the kit keeps the
    /// consumer's lifecycle).
    detached: AtomicBool,
}

impl Q0Consumer {
    pub(crate) async fn create(
        core: Arc<Core>,
        topic: Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<Self> {
        let key = (topic.as_str().to_owned(), options.subscription.clone());
        if !core.q0_subs.lock().insert(key.clone()) {
            return Err(Error::unsupported(
                "q0 subscriptions on PostgreSQL take one consumer: NOTIFY cannot make consumers compete",
            )
            .with_context("topic", &topic)
            .with_context("subscription", &options.subscription));
        }
        let channel = core.channel(&topic);
        let mut registration = match core.listener.register(&channel, true, true).await {
            Ok(r) => r,
            Err(e) => {
                core.q0_subs.lock().remove(&key);
                return Err(e.with_context("topic", &topic));
            }
        };
        let rx = registration
            .q0
            .take()
            .ok_or_else(|| Error::connection("no q0 channel"))?;
        Ok(Self {
            id,
            core,
            topic,
            subscription: options.subscription.clone(),
            rx: tokio::sync::Mutex::new(rx),
            registration: parking_lot::Mutex::new(Some(registration)),
            detached: AtomicBool::new(false),
        })
    }

    fn decode(&self, text: &str) -> Option<Message> {
        match decode(text) {
            Ok(m) => Some({
                m.properties.warn(self.topic.as_str());
                Message::new(
                    m.payload,
                    m.properties.properties,
                    MessageId::from_text(m.id),
                    AckHandle::new(self.id, 0),
                )
                .with_key(m.key)
                .with_publish_time(m.received)
            }),
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "skipping a foreign notification");
                None
            }
        }
    }

    fn lagged(&self, n: u64) {
        tracing::warn!(topic = %self.topic, lost = n, "q0 consumer fell behind; notifications dropped");
    }

    /// Stops listening and frees the subscription for another consumer; once.
    fn detach(&self) {
        if !self.detached.swap(true, Ordering::AcqRel) {
            self.registration.lock().take();
            self.core
                .q0_subs
                .lock()
                .remove(&(self.topic.as_str().to_owned(), self.subscription.clone()));
        }
    }
}

impl RawConsumer for Q0Consumer {
    async fn receive(&self, timeout: Duration) -> Result<Message> {
        let gone = || Error::closed("consumer");
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
                Err(broadcast::error::TryRecvError::Closed) => return Err(gone()),
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let next = tokio::select! {
                r = rx.recv() => r,
                () = tokio::time::sleep_until(deadline) => return Err(receive_timeout(timeout)),
            };
            match next {
                Ok(text) => {
                    if let Some(m) = self.decode(&text) {
                        return Ok(m);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => self.lagged(n),
                Err(broadcast::error::RecvError::Closed) => return Err(gone()),
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
        self.detach();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.detach();
        Ok(())
    }

    fn close_sync(&self) -> bool {
        self.detach();
        true
    }
}

impl fmt::Debug for Q0Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Q0Consumer")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("subscription", &self.subscription)
            .finish()
    }
}

/// Encodes a q0 message as a notification payload: `id \n header \n base64(payload)`, where the
/// header is empty or a JSON object `{"p": properties, "k": key}`.
pub fn encode(
    id: &str,
    payload: &[u8],
    properties: &Properties,
    key: Option<&str>,
) -> Result<String> {
    let header = if properties.is_empty() && key.is_none() {
        String::new()
    } else {
        let mut obj = serde_json::Map::new();
        if !properties.is_empty() {
            obj.insert(
                "p".to_owned(),
                serde_json::to_value(properties)
                    .map_err(|e| Error::new(ErrorKind::Encode, e.to_string()))?,
            );
        }
        if let Some(k) = key {
            obj.insert("k".to_owned(), serde_json::Value::String(k.to_owned()));
        }
        serde_json::Value::Object(obj).to_string()
    };
    let b64_len = payload.len().div_ceil(3) * 4;
    let total = id.len() + 1 + header.len() + 1 + b64_len;
    if total > NOTIFY_MAX {
        return Err(Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "q0 message of {} payload bytes encodes to a {total}-byte notification; \
                 PostgreSQL NOTIFY carries at most {NOTIFY_MAX} bytes (payload, properties and \
                 key together; a payload alone may have {Q0_MAX_PAYLOAD} bytes)",
                payload.len()
            ),
        ));
    }
    let mut out = String::with_capacity(total);
    out.push_str(id);
    out.push('\n');
    out.push_str(&header);
    out.push('\n');
    base64::engine::general_purpose::STANDARD.encode_string(payload, &mut out);
    Ok(out)
}

/// The header of a q0 notification, as [`encode`] writes it (another writer may repeat a
/// property name, or give a non-string value: [`properties`] says what becomes of those).
#[derive(serde::Deserialize)]
struct Header {
    p: Option<properties::Pairs>,
    k: Option<serde_json::Value>,
}

/// A decoded q0 notification.
#[derive(Debug)]
pub struct Decoded {
    /// The message id (the producer's).
    pub id: String,
    /// The payload.
    pub payload: Bytes,
    /// The properties, with what reading them changed.
    pub properties: properties::Read,
    /// The key.
    pub key: Option<String>,
    /// When this process received it.
    pub received: SystemTime,
}

/// Decodes [`encode`]'s format.
pub fn decode(text: &str) -> Result<Decoded> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::Decode,
            format!("malformed q0 notification: {why}"),
        )
    };
    let (id, rest) = text.split_once('\n').ok_or_else(|| bad("no id line"))?;
    let (header, body) = rest.split_once('\n').ok_or_else(|| bad("no header line"))?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| bad(&format!("payload is not base64: {e}")))?;
    let mut properties = properties::Read::default();
    let mut key = None;
    if !header.is_empty() {
        let h: Header = serde_json::from_str(header).map_err(|e| bad(&format!("header: {e}")))?;
        if let Some(p) = h.p {
            properties = p.read();
        }
        key = h.k.as_ref().and_then(|k| k.as_str()).map(str::to_owned);
    }
    Ok(Decoded {
        id: id.to_owned(),
        payload: Bytes::from(payload),
        properties,
        key,
        received: SystemTime::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let mut props = Properties::new();
        props.insert("id".into(), "x\ny\"z".into());
        let text = encode("abcd0123-7", b"\0\xffhello", &props, Some("k\n")).unwrap();
        let m = decode(&text).unwrap();
        assert_eq!(m.id, "abcd0123-7");
        assert_eq!(m.payload.as_ref(), b"\0\xffhello");
        assert_eq!(m.properties.properties, props);
        assert_eq!(m.key.as_deref(), Some("k\n"));

        let max_id = format!("ffffffff-{}", u64::MAX);
        let at = vec![7u8; Q0_MAX_PAYLOAD];
        let text = encode(&max_id, &at, &Properties::new(), None).unwrap();
        assert!(text.len() <= NOTIFY_MAX);
        let over = vec![7u8; Q0_MAX_PAYLOAD + 3];
        let err = encode(&max_id, &over, &Properties::new(), None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
        let err = encode("a-1", &at, &props, Some(&"k".repeat(100))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    }

    /// A header another writer made: a repeated name keeps its last value, a number is kept as
    /// its JSON text, both named for the consumer's warning.
    #[test]
    fn foreign_header_properties_follow_the_rules() {
        let m =
            decode("x-1\n{\"p\":{\"a\":\"1\",\"n\":5,\"a\":\"2\"},\"k\":\"key\"}\nAA==").unwrap();
        assert_eq!(m.properties.properties["a"], "2");
        assert_eq!(m.properties.properties["n"], "5");
        assert_eq!(m.properties.repeated, ["a"]);
        assert_eq!(m.properties.converted, ["n"]);
        assert_eq!(m.key.as_deref(), Some("key"));
        assert_eq!(m.payload.as_ref(), b"\0");
    }

    #[test]
    fn foreign_notifications_are_refused() {
        for text in [
            "",
            "just one line",
            "id\n\nnot base64!",
            "id\n{not json\nAA==",
        ] {
            assert_eq!(
                decode(text).unwrap_err().kind(),
                ErrorKind::Decode,
                "{text:?}"
            );
        }
    }
}
