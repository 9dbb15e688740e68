//! q0, the best-effort path: `PUBLISH` to a channel per topic (the producer writes the frames,
//! see `frame.rs`), and one RESP3 pub/sub connection per backend ([`PubSubHub`]) fanned out
//! in-process to its consumers ([`Q0Consumer`]).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use redis::aio::{AsyncPushSender, MultiplexedConnection, SendError};
use redis::{PushInfo, PushKind, Value};
use tg_backend_api::kit::{warn_repeated, RawConsumer};
use tg_backend_api::{
    AckHandle, Backoff, ConsumerOptions, Error, Message, MessageId, Result, Topic,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::frame::decode_frame;
use crate::inbox::Inbox;
use crate::topic::TopicKeys;

struct Route {
    consumer: u64,
    subscription: String,
    inbox: Arc<Inbox>,
    capacity: usize,
    dropped: AtomicU64,
}

/// A cheap multiplicative hash (FxHash-like, 8 bytes a step) for the channel lookup of every
/// pushed message; channel names are ours, so no protection against chosen collisions is needed.
#[derive(Default)]
struct ChannelHasher(u64);

impl Hasher for ChannelHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (self.0.rotate_left(5) ^ n as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Routes = Arc<RwLock<HashMap<Vec<u8>, Vec<Arc<Route>>, BuildHasherDefault<ChannelHasher>>>>;

/// Hands pushed messages to the consumers of their channel without blocking the connection.
struct Dispatcher {
    routes: Routes,
    seq: Arc<AtomicU64>,
    disconnected: Arc<Notify>,
}

impl AsyncPushSender for Dispatcher {
    fn send(&self, info: PushInfo) -> std::result::Result<(), SendError> {
        if info.kind == PushKind::Disconnection {
            self.disconnected.notify_one();
            return Ok(());
        }
        if info.kind != PushKind::Message {
            return Ok(());
        }
        let mut data = info.data.into_iter();
        let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
            (data.next(), data.next())
        else {
            return Ok(());
        };
        let routes = self.routes.read();
        let Some(list) = routes.get(&channel) else {
            return Ok(());
        };
        let Some(frame) = decode_frame(Bytes::from(payload)) else {
            tracing::debug!(channel = %String::from_utf8_lossy(&channel), "ignoring a q0 message that is not a tg-pubsub frame");
            return Ok(());
        };
        if !frame.repeated.is_empty() {
            warn_repeated(&channel_topic(&channel), &frame.repeated);
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (last, others) = match list.split_last() {
            Some(x) => x,
            None => return Ok(()),
        };
        for route in others {
            let msg = Message::new(
                frame.payload.clone(),
                frame.properties.clone(),
                MessageId::from_u64(seq),
                AckHandle::new(route.consumer, 0),
            )
            .with_key(frame.key.clone())
            .with_publish_time(frame.time);
            route.deliver(msg);
        }
        // the last (usually only) consumer gets the decoded parts themselves, not copies
        let mut msg = Message::new(
            frame.payload,
            frame.properties,
            MessageId::from_u64(seq),
            AckHandle::new(last.consumer, 0),
        )
        .with_publish_time(frame.time);
        if frame.key.is_some() {
            msg = msg.with_key(frame.key);
        }
        last.deliver(msg);
        Ok(())
    }
}

/// The topic a channel name `<prefix>/{<topic>}` carries (the whole name if it has no braces).
fn channel_topic(channel: &[u8]) -> String {
    let name = String::from_utf8_lossy(channel);
    match (name.find('{'), name.rfind('}')) {
        (Some(open), Some(close)) if open < close => name[open + 1..close].to_owned(),
        _ => name.into_owned(),
    }
}

impl Route {
    /// Buffers a message for the consumer, or drops it when the buffer is full (best effort).
    fn deliver(&self, msg: Message) {
        if !self.inbox.push_bounded(msg, self.capacity) {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    subscription = %self.subscription,
                    dropped = n + 1,
                    "q0 consumer buffer full: dropping messages (best effort)"
                );
            }
        }
    }
}

/// The backend's pub/sub connection (RESP3, pushes handled in the connection's own task) and
/// who listens on which channel. A supervisor task reconnects and subscribes again after the
/// connection drops; messages published meanwhile are lost (q0 is best effort).
pub(crate) struct PubSubHub {
    core: Arc<Core>,
    conn: parking_lot::Mutex<Option<MultiplexedConnection>>,
    routes: Routes,
    seq: Arc<AtomicU64>,
    disconnected: Arc<Notify>,
    ops: tokio::sync::Mutex<()>,
}

impl PubSubHub {
    pub(crate) async fn connect(core: Arc<Core>) -> Result<Arc<Self>> {
        let hub = Arc::new(Self {
            core,
            conn: parking_lot::Mutex::new(None),
            routes: Arc::default(),
            seq: Arc::default(),
            disconnected: Arc::new(Notify::new()),
            ops: tokio::sync::Mutex::new(()),
        });
        let conn = hub.open().await?;
        *hub.conn.lock() = Some(conn);
        tokio::spawn(supervise(
            Arc::downgrade(&hub),
            hub.disconnected.clone(),
            hub.core.life.token(),
        ));
        Ok(hub)
    }

    async fn open(&self) -> Result<MultiplexedConnection> {
        let core = &self.core;
        let mut info = core.config.connection_info()?;
        info.redis.protocol = redis::ProtocolVersion::RESP3;
        let client =
            redis::Client::open(info).map_err(|e| core.err(e, "invalid Redis settings"))?;
        let cfg = core
            .async_config(Some(core.config.send_timeout))
            .set_push_sender(Dispatcher {
                routes: self.routes.clone(),
                seq: self.seq.clone(),
                disconnected: self.disconnected.clone(),
            });
        match tokio::time::timeout(
            core.config.connect_timeout,
            client.get_multiplexed_async_connection_with_config(&cfg),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(core.err(
                e,
                "cannot open the Redis pub/sub connection (RESP3, Redis 6+)",
            )),
            Err(_) => Err(
                Error::connection("timed out opening the Redis pub/sub connection")
                    .with_context("server", &core.server),
            ),
        }
    }

    fn current(&self) -> Result<MultiplexedConnection> {
        self.conn.lock().clone().ok_or_else(|| {
            Error::connection("the Redis pub/sub connection is down; reconnecting")
                .with_context("server", &self.core.server)
        })
    }

    async fn add(&self, channel: &str, route: Arc<Route>) -> Result<()> {
        let _guard = self.ops.lock().await;
        let first = {
            let mut routes = self.routes.write();
            let list = routes.entry(channel.as_bytes().to_vec()).or_default();
            if list.iter().any(|r| r.subscription == route.subscription) {
                return Err(Error::unsupported(format!(
                    "subscription {:?} already has a consumer: q0 topics (Redis PUBLISH/SUBSCRIBE) \
                     give every consumer every message, so consumers cannot share a subscription; \
                     use another subscription name or a q1 topic",
                    route.subscription
                )));
            }
            list.push(route.clone());
            list.len() == 1
        };
        if first {
            let res = match self.current() {
                Ok(mut conn) => {
                    match tokio::time::timeout(
                        self.core.config.send_timeout,
                        conn.subscribe(channel),
                    )
                    .await
                    {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(self.core.err(e, "SUBSCRIBE failed")),
                        Err(_) => Err(self.core.timeout("SUBSCRIBE was not confirmed in time")),
                    }
                }
                Err(e) => Err(e),
            };
            if let Err(err) = res {
                self.remove_route(channel, route.consumer);
                return Err(err);
            }
        }
        Ok(())
    }

    fn remove_route(&self, channel: &str, consumer: u64) -> bool {
        let mut routes = self.routes.write();
        let Some(list) = routes.get_mut(channel.as_bytes()) else {
            return false;
        };
        list.retain(|r| r.consumer != consumer);
        if list.is_empty() {
            routes.remove(channel.as_bytes());
            true
        } else {
            false
        }
    }

    async fn remove(&self, channel: &str, consumer: u64) {
        let _guard = self.ops.lock().await;
        if self.remove_route(channel, consumer) {
            if let Ok(mut conn) = self.current() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), conn.unsubscribe(channel)).await;
            }
        }
    }

    /// Drops every route and the connection (the backend closed, after its consumers): any
    /// consumer left sees its channel close.
    pub(crate) fn close(&self) {
        for (_, list) in self.routes.write().drain() {
            for route in list {
                route.inbox.close();
            }
        }
        self.conn.lock().take();
    }
}

/// Reconnects the pub/sub connection after it dropped and subscribes to every channel again,
/// until the backend closes. Every `keep_alive` it also checks that the connection answers a
/// `PING` within `keep_alive` (RESP3 allows commands on a subscribed connection), and replaces
/// one that does not: on a silent network (bytes vanish, no FIN, no RST) nothing else would
/// tell, and its consumers would receive nothing for as long as it lasts.
async fn supervise(hub: Weak<PubSubHub>, disconnected: Arc<Notify>, closed: CancellationToken) {
    let keep_alive = match hub.upgrade() {
        Some(hub) => hub.core.config.keep_alive,
        None => return,
    };
    loop {
        tokio::select! {
            () = disconnected.notified() => {}
            () = closed.cancelled() => return,
            answered = ping_after(&hub, keep_alive) => {
                if answered {
                    continue;
                }
                tracing::warn!(keep_alive = ?keep_alive,
                    "the Redis pub/sub connection did not answer a PING in time; replacing it");
            }
        }
        let mut retry = 0;
        loop {
            let Some(hub) = hub.upgrade() else { return };
            if closed.is_cancelled() {
                return;
            }
            hub.conn.lock().take();
            let _guard = hub.ops.lock().await;
            let attempt = async {
                let mut conn = hub.open().await?;
                let channels: Vec<Vec<u8>> = hub.routes.read().keys().cloned().collect();
                if !channels.is_empty() {
                    conn.subscribe(&channels)
                        .await
                        .map_err(|e| hub.core.err(e, "SUBSCRIBE failed"))?;
                }
                Ok::<_, Error>(conn)
            };
            match attempt.await {
                Ok(conn) => {
                    tracing::info!(server = %hub.core.server, "pub/sub connection restored");
                    *hub.conn.lock() = Some(conn);
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "pub/sub reconnect failed; retrying"),
            }
            drop(_guard);
            drop(hub);
            retry += 1;
            tokio::select! {
                () = tokio::time::sleep(Backoff::reconnect().delay(retry)) => {}
                () = closed.cancelled() => return,
            }
        }
    }
}

/// Waits `every`, then sends a `PING` on the hub's pub/sub connection: false when it is not
/// answered within `every`; true when it is, or when there is nothing to ask (the hub closed
/// or is gone: the supervisor then ends on its own).
async fn ping_after(hub: &Weak<PubSubHub>, every: Duration) -> bool {
    tokio::time::sleep(every).await;
    let conn = match hub.upgrade() {
        Some(hub) => hub.conn.lock().clone(),
        None => return true,
    };
    let Some(mut conn) = conn else {
        return true;
    };
    let ping = redis::cmd("PING");
    matches!(
        tokio::time::timeout(every, ping.query_async::<Value>(&mut conn)).await,
        Ok(Ok(_))
    )
}

/// A q0 consumer: a route of the hub's pub/sub connection into its own bounded inbox.
pub(crate) struct Q0Consumer {
    id: u64,
    hub: Arc<PubSubHub>,
    topic: Topic,
    subscription: String,
    channel: String,
    inbox: Arc<Inbox>,
}

impl Q0Consumer {
    /// Subscribes (the first consumer of a channel in this backend sends `SUBSCRIBE` and waits
    /// for its confirmation); a second consumer of one subscription is refused as `Unsupported`.
    pub(crate) async fn subscribe(
        hub: Arc<PubSubHub>,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<Self> {
        let channel = TopicKeys::new(&hub.core.config.prefix, topic).main;
        let capacity = hub.core.config.q0_buffer;
        let inbox = Arc::new(Inbox::new(capacity.min(256)));
        let route = Arc::new(Route {
            consumer: id,
            subscription: options.subscription.clone(),
            inbox: inbox.clone(),
            capacity,
            dropped: AtomicU64::new(0),
        });
        hub.add(&channel, route)
            .await
            .map_err(|e| e.with_context("topic", topic))?;
        Ok(Self {
            id,
            hub,
            topic: topic.clone(),
            subscription: options.subscription.clone(),
            channel,
            inbox,
        })
    }
}

impl Q0Consumer {
    /// The consumer's buffer, which `receive` takes from.
    pub(crate) fn inbox(&self) -> &Inbox {
        &self.inbox
    }
}

impl RawConsumer for Q0Consumer {
    async fn receive(&self, timeout: Duration) -> Result<Message> {
        self.inbox.receive(timeout).await
    }

    async fn acknowledge(&self, _message: &Message) -> Result<()> {
        // best effort: nothing to acknowledge
        Ok(())
    }

    async fn acknowledge_batch(&self, _messages: &[Message]) -> Result<()> {
        Ok(())
    }

    async fn negative_acknowledge(&self, _message: &Message) -> Result<()> {
        // best effort: nothing is redelivered
        Ok(())
    }

    async fn negative_acknowledge_batch(&self, _messages: &[Message]) -> Result<()> {
        Ok(())
    }

    async fn unsubscribe(&self) -> Result<()> {
        // the subscription is this consumer's route: nothing outlives it
        self.close().await
    }

    async fn close(&self) -> Result<()> {
        self.hub.remove(&self.channel, self.id).await;
        Ok(())
    }

    /// Without a runtime (nothing can await the `UNSUBSCRIBE`) the route goes at once, so the
    /// dispatcher stops filling this consumer's inbox.
    fn close_sync(&self) -> bool {
        if tokio::runtime::Handle::try_current().is_ok() {
            return false;
        }
        self.hub.remove_route(&self.channel, self.id);
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
