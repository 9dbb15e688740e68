//! One MQTT connection: a rumqttc client plus the task that polls its event loop.
//!
//! The task matches rumqttc's events to what was asked of it: a publish's receipt completes on
//! PUBACK (QoS 1), PUBCOMP (QoS 2) or when it is written (QoS 0); a subscribe or unsubscribe
//! completes on SUBACK / UNSUBACK. rumqttc reports packet ids only in events, in the order it
//! takes requests from its queue, so the task keeps requests in that order and pairs them up.
//!
//! When the connection breaks, the task takes back every publish and subscribe that was not yet
//! confirmed (rumqttc drops them when the broker has no session for the client), waits (a
//! [`Backoff`] with full jitter: the n-th delay is drawn from zero to `min(100 ms × 2ⁿ⁻¹,
//! reconnect_max)`), reconnects, and queues them again first, in their original order,
//! publishes no faster than the in-flight window allows. Consumer connections resubscribe after
//! every reconnect, and get back from their [`Session`] the acknowledgements rumqttc dropped.
//!
//! After a reconnect, for `rejoin_grace`, a q1/q2 publish the broker routed to nobody is
//! published again after a delay: a restarted broker's consumers may not have resubscribed yet.
//!
//! The task never waits for the application (a consumer's receivers hand their acknowledgements
//! to it through the session): it must keep polling to write acknowledgements, ping, and notice a
//! dead connection.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::v5::{
    Filter, Packet, PubAckReason, PubRecReason, Publish, SubAck, Subscribe, SubscribeReasonCode,
    UnsubAckReason, Unsubscribe,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Request, StateError,
};
use rumqttc::Outgoing;
use tg_backend_api::{Backoff, Error, ErrorKind, MessageId, Result};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::config::{MqttConfig, MAX_PACKET};
use crate::error::{connection_closed, connection_failed, refused, unconfirmed};
use crate::session::Session;

/// How long fetching a topic's retained message may take once connected.
const RETAINED_FETCH_LIMIT: Duration = Duration::from_secs(5);

/// How long a consumer waits for the broker to close the connection after the DISCONNECT of a
/// session resume before it drops the connection itself.
const RESUME_CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// First delay before a publish routed to nobody within the rejoin grace is published again;
/// it doubles per attempt up to [`UNROUTED_RETRY_MAX`].
const UNROUTED_RETRY_FIRST: Duration = Duration::from_millis(100);
const UNROUTED_RETRY_MAX: Duration = Duration::from_secs(1);

/// The first reconnect delay's ceiling; it doubles per failed attempt up to `reconnect_max`.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);

/// Room left in a packet for the topic, properties and header when a payload is at the limit.
pub(crate) const PACKET_HEADROOM: usize = 64 * 1024;

/// How a connection is set up.
pub(crate) struct ConnectionSpec {
    pub(crate) client_id: String,
    /// `None`: clean start, no session. `Some(secs)`: persistent session kept that long.
    pub(crate) session_expiry: Option<u32>,
    /// Consumers: the session incoming publishes go to (manual acks on).
    pub(crate) session: Option<Arc<Session>>,
}

/// What the broker said about a publish.
#[derive(Debug, Clone)]
pub(crate) struct Confirmed {
    pub(crate) id: MessageId,
    /// False when the broker answered "no matching subscribers" (QoS 1/2 only).
    pub(crate) matched: bool,
}

type PublishDone = oneshot::Sender<Result<Confirmed>>;
type SubDone = oneshot::Sender<Result<()>>;

struct PubOp {
    seq: u64,
    publish: Publish,
    done: Option<PublishDone>,
    matched: bool,
    /// Times it was published again because the broker routed it to nobody.
    unrouted: u32,
}

impl PubOp {
    fn new(seq: u64, publish: Publish, done: PublishDone) -> Self {
        Self {
            seq,
            publish,
            done: Some(done),
            matched: true,
            unrouted: 0,
        }
    }
}

struct SubOp {
    seq: u64,
    request: Request,
    done: Option<SubDone>,
}

#[derive(Default)]
struct Tracker {
    next_seq: u64,
    /// Publishes handed to rumqttc that have no packet id yet, in rumqttc's queue order.
    unassigned: VecDeque<PubOp>,
    /// QoS 1/2 publishes written and waiting for PUBACK / PUBCOMP, by packet id.
    inflight: HashMap<u16, PubOp>,
    /// A publish rumqttc held back because its packet id was still in use.
    collided: Option<PubOp>,
    /// Publishes taken back after a disconnect, queued again after the next CONNACK, in order.
    resend: VecDeque<PubOp>,
    /// Publishes of `resend` handed to rumqttc's pending queue that have no packet id yet. That
    /// queue goes before its request queue, so these come before `unassigned`.
    fed: VecDeque<PubOp>,
    subs_unassigned: VecDeque<SubOp>,
    subs_inflight: HashMap<u16, SubOp>,
    subs_resend: Vec<SubOp>,
    /// Until when a q1/q2 publish the broker routed to nobody is published again (the
    /// connection was re-established; its `rejoin_grace`).
    rejoin_until: Option<Instant>,
    /// Publishes routed to nobody within the grace, with when they go again.
    unrouted: Vec<(Instant, PubOp)>,
    /// The earliest time in `unrouted`.
    unrouted_due: Option<Instant>,
}

impl Tracker {
    /// The publish rumqttc gives a packet id next: what was fed to its pending queue first.
    fn next_assigned(&mut self) -> Option<PubOp> {
        self.fed.pop_front().or_else(|| self.unassigned.pop_front())
    }

    fn lowest_outstanding(&self) -> Option<u64> {
        let mut low = self.unassigned.front().map(|o| o.seq);
        let mut take = |s: u64| low = Some(low.map_or(s, |l| l.min(s)));
        self.fed.iter().for_each(|o| take(o.seq));
        self.inflight.values().for_each(|o| take(o.seq));
        self.resend.iter().for_each(|o| take(o.seq));
        self.unrouted.iter().for_each(|(_, o)| take(o.seq));
        if let Some(o) = &self.collided {
            take(o.seq);
        }
        low
    }

    /// Keeps a publish the broker routed to nobody to publish it again later, if the connection
    /// came back within the grace and there is room; otherwise hands it back, marked as routed
    /// to nobody, to be completed.
    fn hold_unrouted(&mut self, mut op: PubOp, now: Instant, cap: usize) -> Option<PubOp> {
        let within = self.rejoin_until.is_some_and(|until| now < until);
        if !within || op.publish.retain || self.unrouted.len() >= cap {
            op.matched = false;
            return Some(op);
        }
        let delay = UNROUTED_RETRY_FIRST
            .saturating_mul(1 << op.unrouted.min(8))
            .min(UNROUTED_RETRY_MAX);
        op.unrouted += 1;
        op.matched = true;
        let due = now + delay;
        self.unrouted_due = Some(self.unrouted_due.map_or(due, |d| d.min(due)));
        self.unrouted.push((due, op));
        None
    }

    /// Whether a new publish has to wait: within the grace, `limit` publishes are held
    /// already.
    fn unrouted_full(&self, limit: usize, now: Instant) -> bool {
        self.rejoin_until.is_some_and(|until| now < until) && self.unrouted.len() >= limit
    }

    /// Moves the unrouted publishes that are due to `resend`, in their original order. True if
    /// any moved.
    fn release_unrouted(&mut self, now: Instant) -> bool {
        if self.unrouted_due.is_none_or(|d| now < d) {
            return false;
        }
        let mut next: Option<Instant> = None;
        let mut i = 0;
        while i < self.unrouted.len() {
            let due = self.unrouted[i].0;
            if due <= now {
                let (_, op) = self.unrouted.swap_remove(i);
                self.resend.push_back(op);
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
                i += 1;
            }
        }
        self.unrouted_due = next;
        self.resend.make_contiguous().sort_by_key(|o| o.seq);
        true
    }
}

struct Shared {
    client_id: String,
    address: String,
    tracker: Mutex<Tracker>,
    /// Orders "record the request" + "queue it in rumqttc" between tasks.
    submit: tokio::sync::Mutex<()>,
    /// The broker's Maximum Packet Size (MQTT's maximum when it announces none).
    broker_max_packet: AtomicU32,
    connected: AtomicBool,
    closed: AtomicBool,
    /// Consumers: a DISCONNECT to resume the session went out; the broker closes the
    /// connection, and the connection task reconnects at once. Whatever rumqttc writes after the
    /// DISCONNECT is ignored by the broker, so acknowledgements written meanwhile still count as
    /// unwritten (and go out again on the resumed session).
    resuming: AtomicBool,
    shutdown: Notify,
    progress: Notify,
    session: Option<Arc<Session>>,
    last_error: Mutex<Option<String>>,
    publish_ids: AtomicU64,
    /// `MqttConfig::rejoin_grace`.
    rejoin_grace: Duration,
    /// Publishes held for the rejoin grace at which new publishes wait
    /// (`MqttConfig::request_capacity`).
    unrouted_limit: usize,
    /// Most publishes held for the rejoin grace at once: the limit, plus what can still come
    /// back "no matching subscribers" once new publishes wait: what was taken back at the
    /// reconnect (a request queue and an in-flight window), rumqttc's request queue, and its
    /// in-flight window.
    unrouted_cap: usize,
    /// Held publishes went out again: a publish waiting for them may go on.
    unrouted_room: Notify,
}

impl Shared {
    /// Not connected yet, nothing tracked.
    fn new(config: &MqttConfig, client_id: String, session: Option<Arc<Session>>) -> Self {
        Self {
            client_id,
            address: config.address(),
            tracker: Mutex::new(Tracker::default()),
            submit: tokio::sync::Mutex::new(()),
            broker_max_packet: AtomicU32::new(MAX_PACKET),
            connected: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            resuming: AtomicBool::new(false),
            shutdown: Notify::new(),
            progress: Notify::new(),
            session,
            last_error: Mutex::new(None),
            publish_ids: AtomicU64::new(0),
            rejoin_grace: config.rejoin_grace,
            unrouted_limit: config.request_capacity,
            unrouted_cap: config.request_capacity * 3 + usize::from(config.inflight) * 2,
            unrouted_room: Notify::new(),
        }
    }
}

/// A connection to the broker. Cheap to share behind an `Arc`.
pub(crate) struct Connection {
    client: AsyncClient,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Connection {
    /// Connects and returns once the broker accepted the connection, or fails with `Auth`
    /// (refused credentials), `Connection` (unreachable) or `ConfigInvalid`.
    pub(crate) async fn open(config: &MqttConfig, spec: ConnectionSpec) -> Result<Arc<Self>> {
        let options = mqtt_options(config, &spec)?;
        let (client, eventloop) = AsyncClient::new(options, config.request_capacity);
        let shared = Arc::new(Shared::new(config, spec.client_id, spec.session));
        let (first_tx, first_rx) = oneshot::channel();
        let backoff = reconnect_backoff(config);
        let task = tokio::spawn(run(eventloop, shared.clone(), first_tx, backoff));
        let timeout = config.connect_timeout + Duration::from_secs(1);
        match tokio::time::timeout(timeout, first_rx).await {
            Ok(Ok(Ok(()))) => Ok(Arc::new(Self {
                client,
                shared,
                task: Mutex::new(Some(task)),
            })),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(
                Error::connection("the MQTT connection task ended while connecting")
                    .with_context("broker", &shared.address),
            ),
            Err(_) => {
                shared.closed.store(true, Ordering::Release);
                shared.shutdown.notify_waiters();
                Err(Error::connection(format!("no CONNACK within {timeout:?}"))
                    .with_context("broker", &shared.address))
            }
        }
    }

    pub(crate) fn client(&self) -> &AsyncClient {
        &self.client
    }

    pub(crate) fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Consumers: disconnects and reconnects at once with the same session, so that the broker
    /// sends again what it holds unacknowledged for it (see [`Session::resume_due`]). The
    /// DISCONNECT goes through the request queue, after the acknowledgements queued before it.
    /// False when it could not be queued now.
    pub(crate) fn resume_session(&self) -> bool {
        !self.is_closed() && self.client.try_disconnect().is_ok()
    }

    /// The broker's Maximum Packet Size.
    pub(crate) fn broker_max_packet(&self) -> usize {
        self.shared.broker_max_packet.load(Ordering::Acquire) as usize
    }

    pub(crate) fn status_error(&self) -> Error {
        let why = self
            .shared
            .last_error
            .lock()
            .clone()
            .unwrap_or_else(|| "not connected".into());
        Error::connection(format!("MQTT broker unreachable: {why}"))
            .with_context("broker", &self.shared.address)
    }

    /// Queues a publish; the returned channel answers when the broker confirmed it.
    pub(crate) async fn publish(
        &self,
        publish: Publish,
    ) -> Result<oneshot::Receiver<Result<Confirmed>>> {
        let (tx, rx) = oneshot::channel();
        self.wait_for_unrouted_room().await?;
        let _order = self.shared.submit.lock().await;
        if self.is_closed() {
            return Err(connection_closed());
        }
        let seq = {
            let mut t = self.shared.tracker.lock();
            t.next_seq += 1;
            let seq = t.next_seq;
            t.unassigned.push_back(PubOp::new(seq, publish.clone(), tx));
            seq
        };
        let Publish {
            topic,
            qos,
            retain,
            payload,
            properties,
            ..
        } = publish;
        let topic = String::from_utf8_lossy(&topic).into_owned();
        let queued = match properties {
            Some(p) => {
                self.client
                    .publish_with_properties(topic, qos, retain, payload, p)
                    .await
            }
            None => self.client.publish(topic, qos, retain, payload).await,
        };
        if queued.is_err() {
            let mut t = self.shared.tracker.lock();
            if t.unassigned.back().is_some_and(|o| o.seq == seq) {
                t.unassigned.pop_back();
            }
            return Err(connection_closed());
        }
        Ok(rx)
    }

    /// Within a rejoin grace, publishes the broker routed to nobody are held to go again. A
    /// producer that keeps sending meanwhile waits while `request_capacity` of them are held, as
    /// it waits for room in rumqttc's request queue: its later publishes would otherwise be
    /// routed to nobody as well, past what can be held. Wakes when held publishes go out again,
    /// and at least every 100 ms to see the grace end.
    async fn wait_for_unrouted_room(&self) -> Result<()> {
        loop {
            let room = self.shared.unrouted_room.notified();
            if !self
                .shared
                .tracker
                .lock()
                .unrouted_full(self.shared.unrouted_limit, Instant::now())
            {
                return Ok(());
            }
            if self.is_closed() {
                return Err(connection_closed());
            }
            let _ = tokio::time::timeout(UNROUTED_RETRY_FIRST, room).await;
        }
    }

    /// Subscribes and waits for the SUBACK.
    pub(crate) async fn subscribe(&self, filters: Vec<Filter>) -> Result<()> {
        self.sub_request(Request::Subscribe(Subscribe::new_many(filters, None)))
            .await
    }

    /// Unsubscribes and waits for the UNSUBACKs.
    pub(crate) async fn unsubscribe(&self, filters: Vec<String>) -> Result<()> {
        for filter in filters {
            self.sub_request(Request::Unsubscribe(Unsubscribe::new(filter, None)))
                .await?;
        }
        Ok(())
    }

    async fn sub_request(&self, request: Request) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        {
            let _order = self.shared.submit.lock().await;
            if self.is_closed() {
                return Err(connection_closed());
            }
            let seq = {
                let mut t = self.shared.tracker.lock();
                t.next_seq += 1;
                let seq = t.next_seq;
                t.subs_unassigned.push_back(SubOp {
                    seq,
                    request: request.clone(),
                    done: Some(tx),
                });
                seq
            };
            let queued = match request {
                Request::Subscribe(s) => self.client.subscribe_many(s.filters).await,
                Request::Unsubscribe(mut u) => match u.filters.pop() {
                    Some(f) => self.client.unsubscribe(f).await,
                    None => Ok(()),
                },
                _ => Ok(()),
            };
            if queued.is_err() {
                let mut t = self.shared.tracker.lock();
                if t.subs_unassigned.back().is_some_and(|o| o.seq == seq) {
                    t.subs_unassigned.pop_back();
                }
                return Err(connection_closed());
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(connection_closed()),
            Err(_) => Err(
                Error::new(ErrorKind::Timeout, "no SUBACK/UNSUBACK within 30 s")
                    .with_context("client_id", &self.shared.client_id),
            ),
        }
    }

    /// Waits until every publish queued before the call is confirmed (or failed).
    pub(crate) async fn flush(&self) -> Result<()> {
        let target = self.shared.tracker.lock().next_seq;
        loop {
            let notified = self.shared.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let low = self.shared.tracker.lock().lowest_outstanding();
            let done = match low {
                Some(l) => l > target,
                None => true,
            };
            if done {
                return Ok(());
            }
            if self.is_closed() {
                return Err(connection_closed());
            }
            notified.await;
        }
    }

    /// Disconnects cleanly; outstanding receipts fail with `Closed`.
    pub(crate) async fn close(&self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // A DISCONNECT through the queue, so that what was queued before (acks) goes out first.
        let sent = tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await;
        if !matches!(sent, Ok(Ok(()))) || !self.is_connected() {
            self.shared.shutdown.notify_one();
        }
        let task = self.task.lock().take();
        if let Some(mut task) = task {
            if tokio::time::timeout(Duration::from_secs(3), &mut task)
                .await
                .is_err()
            {
                self.shared.shutdown.notify_one();
                if tokio::time::timeout(Duration::from_secs(1), &mut task)
                    .await
                    .is_err()
                {
                    task.abort();
                }
            }
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("client_id", &self.shared.client_id)
            .field("broker", &self.shared.address)
            .field("connected", &self.is_connected())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.shared.closed.swap(true, Ordering::AcqRel) && self.client.try_disconnect().is_err()
        {
            self.shared.shutdown.notify_one();
        }
    }
}

fn mqtt_options(config: &MqttConfig, spec: &ConnectionSpec) -> Result<MqttOptions> {
    let mut options = MqttOptions::new(spec.client_id.clone(), config.host.clone(), config.port);
    options.set_keep_alive(config.keep_alive.max(Duration::from_secs(5)));
    options.set_connection_timeout(connect_secs(config));
    options.set_request_channel_capacity(config.request_capacity);
    options.set_outgoing_inflight_upper_limit(config.inflight);
    let incoming_max =
        (config.max_payload.saturating_add(PACKET_HEADROOM)).min(MAX_PACKET as usize);
    options.set_max_packet_size(Some(incoming_max as u32));
    if let Some(user) = &config.username {
        let password = config.password.as_ref().map_or("", |p| p.expose());
        options.set_credentials(user.clone(), password);
    }
    match spec.session_expiry {
        Some(secs) => {
            options.set_clean_start(false);
            options.set_session_expiry_interval(Some(secs));
        }
        None => {
            options.set_clean_start(true);
        }
    }
    if spec.session.is_some() {
        options.set_manual_acks(true);
        options.set_receive_maximum(Some(config.receive_maximum));
    }
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(config.tcp_nodelay);
    network.set_connection_timeout(connect_secs(config));
    options.set_network_options(network);
    if config.tls {
        #[cfg(feature = "tls")]
        {
            options.set_transport(rumqttc::Transport::tls_with_config(crate::tls::tls_config(
                config.ca_file.as_deref(),
            )?));
        }
        #[cfg(not(feature = "tls"))]
        {
            return Err(Error::unsupported(
                "mqtts:// needs the `tls` feature of tg-backend-mqtt, which this build lacks",
            ));
        }
    }
    Ok(options)
}

/// What a SUBACK says: the first refusal among its reason codes, as an error.
fn suback_outcome(ack: &SubAck) -> Result<()> {
    let failed = ack
        .return_codes
        .iter()
        .find(|c| !matches!(c, SubscribeReasonCode::Success(_)));
    match failed {
        None => Ok(()),
        Some(code) => Err(Error::new(
            if matches!(code, SubscribeReasonCode::NotAuthorized) {
                ErrorKind::Auth
            } else {
                ErrorKind::Unexpected
            },
            format!("the MQTT broker refused the subscription: {code:?}"),
        )),
    }
}

/// The retained message of `topic`, fetched for a new consumer on a short-lived connection of its
/// own (clean start, client id `client_id`): a plain QoS 0 subscription, ended as soon as the
/// SUBACK is back. The broker sends a topic's retained message right after the SUBACK, so it
/// arrives before the UNSUBACK. MQTT 5 sends none when a shared subscription is made, which is
/// what consumers make (Mosquitto keeps to that since 2.0.13). Not on the consumer's own
/// connection: subscribing and unsubscribing a topic there beside its shared subscription is the
/// sequence of a use-after-free in Mosquitto before 2.0.19 (its regression test
/// "shared-sub-uaf").
pub(crate) async fn fetch_retained(
    config: &MqttConfig,
    client_id: String,
    topic: &str,
) -> Result<Vec<Publish>> {
    let spec = ConnectionSpec {
        client_id,
        session_expiry: None,
        session: None,
    };
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(config, &spec)?, 10);
    let address = config.address();
    let exchange = async {
        let mut retained = Vec::new();
        // A refused subscription (an ACL that allows only the shared one) ends the exchange.
        let mut outcome = Ok(());
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(topic, QoS::AtMostOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    outcome = suback_outcome(&ack);
                    if outcome.is_ok() {
                        let _ = client.try_unsubscribe(topic);
                    } else {
                        let _ = client.try_disconnect();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.retain => retained.push(p),
                Ok(Event::Incoming(Packet::UnsubAck(_))) => {
                    let _ = client.try_disconnect();
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return outcome.map(|()| retained),
                Ok(_) => {}
                Err(e) => return Err(connection_failed(&e, &address)),
            }
        }
    };
    match tokio::time::timeout(config.connect_timeout + RETAINED_FETCH_LIMIT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            "no answer to the subscription that fetches the retained message",
        )),
    }
}

/// rumqttc's connect timeouts are whole seconds: `connect_timeout`, rounded up.
fn connect_secs(config: &MqttConfig) -> u64 {
    config.connect_timeout.as_secs_f64().ceil().max(1.0) as u64
}

/// The back-off between reconnect attempts: 100 ms doubling up to `reconnect_max`, with full
/// jitter (each delay drawn uniformly from zero to that), so that clients restarted together do
/// not reconnect together.
fn reconnect_backoff(config: &MqttConfig) -> Backoff {
    Backoff::new(RECONNECT_FIRST, config.reconnect_max).jitter(true)
}

async fn run(
    mut eventloop: EventLoop,
    shared: Arc<Shared>,
    first: oneshot::Sender<Result<()>>,
    backoff: Backoff,
) {
    let mut first = Some(first);
    // Failed attempts since the last CONNACK.
    let mut attempt = 0u32;
    let mut connected_before = false;
    // rumqttc forgets the packet ids of QoS 2 messages it sent PUBREC for when the connection
    // drops (its state is cleaned on every reconnect), and treats the PUBREL the broker resends
    // on the resumed session as a protocol error: the connection fails, the PUBREL comes again,
    // and the broker's in-flight window stays full of them — the consumer stalls. So the ids of
    // PUBRECs written are kept here and handed back to rumqttc when a session is resumed. Should the broker still send a PUBREL for an
    // id unknown here, and that repeats, the session is given up once (clean start) to get out.
    let mut unsolicited = 0u32;
    let mut released = PubRecsWritten::default();
    let persistent = !eventloop.options.clean_start();
    // Consumers: when the broker has to have closed the connection after a resume's DISCONNECT.
    let mut resume_deadline: Option<Instant> = None;
    // rumqttc's in-flight window: the configured one, lowered by the broker's Receive Maximum.
    let upper = eventloop
        .options
        .get_outgoing_inflight_upper_limit()
        .unwrap_or(u16::MAX);
    let mut window = upper;
    loop {
        if let Some(session) = &shared.session {
            session.flush_local_acks(&mut eventloop);
        }
        let unrouted_due = {
            let mut t = shared.tracker.lock();
            if t.release_unrouted(Instant::now()) {
                shared.unrouted_room.notify_waiters();
            }
            t.unrouted_due
        };
        if shared.connected.load(Ordering::Acquire) {
            feed_resends(&mut eventloop, &shared, window);
        }
        let polled = tokio::select! {
            polled = eventloop.poll() => polled,
            // Unrouted publishes are due: go round to release them.
            _ = until(unrouted_due), if unrouted_due.is_some() => continue,
            _ = shared.shutdown.notified(), if shared.closed.load(Ordering::Acquire) => break,
            _ = until(resume_deadline), if resume_deadline.is_some() => {
                // The broker did not close the connection: drop it and reconnect.
                resume_deadline = None;
                shared.connected.store(false, Ordering::Release);
                after_disconnect(&mut eventloop, &shared);
                continue;
            }
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                attempt = 0;
                resume_deadline = None;
                shared.resuming.store(false, Ordering::Release);
                shared.connected.store(true, Ordering::Release);
                *shared.last_error.lock() = None;
                let max = ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.max_packet_size)
                    .unwrap_or(MAX_PACKET)
                    .min(MAX_PACKET);
                shared.broker_max_packet.store(max, Ordering::Release);
                if let Some(receive_max) = ack.properties.as_ref().and_then(|p| p.receive_max) {
                    window = receive_max.min(upper);
                }
                if connected_before {
                    tracing::info!(client_id = %shared.client_id, broker = %shared.address,
                        session_present = ack.session_present, "MQTT connection re-established");
                }
                if persistent && eventloop.options.clean_start() {
                    eventloop.options.set_clean_start(false);
                }
                if ack.session_present {
                    released.rearm(&mut eventloop);
                } else {
                    released.clear();
                }
                requeue(
                    &mut eventloop,
                    &shared,
                    ack.session_present,
                    connected_before,
                );
                connected_before = true;
                if let Some(tx) = first.take() {
                    let _ = tx.send(Ok(()));
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let Some(session) = shared.session.as_ref() else {
                    break;
                };
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
                // Not a close: the consumer asked for its session to be resumed. The broker
                // closes the connection (dropping it here, with unread data, would reset it and
                // could lose the acknowledgements written just before); then reconnect at once.
                tracing::debug!(client_id = %shared.client_id, refused = session.refused_pending(),
                    "resuming the MQTT session to fetch the messages the buffer had no room for");
                shared.resuming.store(true, Ordering::Release);
                resume_deadline = Some(Instant::now() + RESUME_CLOSE_LIMIT);
            }
            Ok(event) => {
                released.note(&event);
                handle(&shared, event, &mut eventloop.pending);
            }
            Err(e) => {
                shared.connected.store(false, Ordering::Release);
                resume_deadline = None;
                let resumed = shared.resuming.load(Ordering::Acquire);
                let err = connection_failed(&e, &shared.address);
                if matches!(e, ConnectionError::MqttState(StateError::Unsolicited(_))) {
                    unsolicited += 1;
                    if persistent && unsolicited >= 2 {
                        tracing::warn!(client_id = %shared.client_id,
                            "the resumed MQTT session keeps failing on an acknowledgement rumqttc \
                             lost track of; starting a clean session (messages the broker still \
                             queued for it are dropped)");
                        eventloop.options.set_clean_start(true);
                        unsolicited = 0;
                    }
                } else {
                    unsolicited = 0;
                }
                after_disconnect(&mut eventloop, &shared);
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
                // A session resume asked for and not yet sent: the reconnect resumes it anyway.
                eventloop
                    .pending
                    .retain(|r| !matches!(r, Request::Disconnect));
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(err));
                    shared.closed.store(true, Ordering::Release);
                    break;
                }
                if resumed {
                    // The end of a session resume: reconnect at once.
                    tracing::debug!(client_id = %shared.client_id, "reconnecting to resume the session");
                    continue;
                }
                attempt = attempt.saturating_add(1);
                let delay = backoff.delay(attempt);
                let auth = err.kind() == ErrorKind::Auth;
                *shared.last_error.lock() = Some(err.message().to_owned());
                if auth {
                    tracing::error!(client_id = %shared.client_id, error = %err, retry_in = ?delay,
                        "MQTT broker refuses the credentials; retrying");
                } else {
                    tracing::warn!(client_id = %shared.client_id, error = %err, retry_in = ?delay,
                        "MQTT connection lost; reconnecting");
                }
                let notified = shared.shutdown.notified();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = notified => {}
                }
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
            }
        }
    }
    shared.connected.store(false, Ordering::Release);
    shared.closed.store(true, Ordering::Release);
    fail_all(&shared);
}

/// After the connection dropped: answers the events rumqttc produced before (acks read in the
/// same batch still count), gets back the acknowledgements it dropped, takes back what the
/// broker has not confirmed, and ends a session resume.
fn after_disconnect(eventloop: &mut EventLoop, shared: &Shared) {
    let stale: Vec<Event> = eventloop.state.events.drain(..).collect();
    for event in stale {
        handle(shared, event, &mut eventloop.pending);
    }
    if let Some(session) = &shared.session {
        session.recover_acks(eventloop);
    }
    take_back(eventloop, shared);
    shared.resuming.store(false, Ordering::Release);
}

/// Waits until `deadline`, forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Packet ids of the QoS 2 messages this client sent PUBREC for. The broker resends the PUBREL
/// of any whose PUBCOMP it did not get — also of one whose PUBCOMP was written just before the
/// connection went silent — so an id is kept after its PUBCOMP too: only the broker knows which
/// flows it still holds. At most one bit per packet id (8 KiB).
struct PubRecsWritten(Box<[u64; 1024]>);

impl Default for PubRecsWritten {
    fn default() -> Self {
        Self(Box::new([0; 1024]))
    }
}

impl PubRecsWritten {
    fn note(&mut self, event: &Event) {
        if let Event::Outgoing(Outgoing::PubRec(pkid)) = event {
            self.0[usize::from(*pkid) / 64] |= 1 << (pkid % 64);
        }
    }

    fn clear(&mut self) {
        self.0.fill(0);
    }

    fn ids(&self) -> impl Iterator<Item = u16> + '_ {
        (0..=u16::MAX).filter(|id| self.0[usize::from(*id) / 64] & (1 << (id % 64)) != 0)
    }

    /// Makes rumqttc's state, cleaned by the reconnect, know these ids again, so that it answers
    /// the broker's resent PUBRELs with PUBCOMP instead of failing the connection. rumqttc offers
    /// no setter for its QoS 2 ids; the one public way in is its incoming-packet handler, fed a
    /// stand-in QoS 2 PUBLISH per id (manual acknowledgements: it only records the id), whose
    /// event is taken back out at once. An id the broker has no flow for stays recorded until
    /// the broker reuses it for a new message, which records it anyway.
    fn rearm(&self, eventloop: &mut EventLoop) {
        let events = eventloop.state.events.len();
        let mut count = 0usize;
        for pkid in self.ids() {
            let mut publish = Publish::new("tg-rearm", QoS::ExactlyOnce, Vec::new(), None);
            publish.pkid = pkid;
            let _ = eventloop
                .state
                .handle_incoming_packet(Packet::Publish(publish));
            count += 1;
        }
        eventloop.state.events.truncate(events);
        if count > 0 {
            tracing::debug!(
                ids = count,
                "QoS 2 ids acknowledged before the reconnect handed back to rumqttc"
            );
        }
    }
}

/// Answers what rumqttc reports. Never waits: the event loop must keep being polled.
fn handle(shared: &Shared, event: Event, pending: &mut VecDeque<Request>) {
    match event {
        Event::Incoming(Packet::Publish(publish)) => {
            if let Some(session) = &shared.session {
                if let Some(ack) = session.deliver(publish) {
                    session.record_ack(&ack);
                    pending.push_back(ack);
                }
            }
        }
        Event::Outgoing(Outgoing::PubAck(pkid) | Outgoing::PubRec(pkid)) => {
            if let Some(session) = &shared.session {
                if !shared.resuming.load(Ordering::Acquire) {
                    session.ack_written(pkid);
                }
            }
        }
        Event::Outgoing(Outgoing::Publish(pkid)) => {
            let mut t = shared.tracker.lock();
            let op = match t.collided.take() {
                Some(op) if op.publish.pkid == pkid => Some(op),
                other => {
                    t.collided = other;
                    t.next_assigned()
                }
            };
            if let Some(mut op) = op {
                if op.publish.qos == QoS::AtMostOnce {
                    complete(shared, &mut op, Ok(()));
                } else {
                    op.publish.pkid = pkid;
                    t.inflight.insert(pkid, op);
                }
            }
        }
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
            let mut t = shared.tracker.lock();
            if let Some(mut op) = t.next_assigned() {
                op.publish.pkid = pkid;
                t.collided = Some(op);
            }
        }
        Event::Incoming(Packet::PubAck(ack)) => {
            let mut t = shared.tracker.lock();
            let op = t.inflight.remove(&ack.pkid);
            let op = match (op, &ack.reason) {
                (Some(op), PubAckReason::NoMatchingSubscribers) => {
                    t.hold_unrouted(op, Instant::now(), shared.unrouted_cap)
                }
                (op, _) => op,
            };
            drop(t);
            if let Some(mut op) = op {
                let outcome = match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                    other => Err(refused(other)),
                };
                complete(shared, &mut op, outcome);
            }
        }
        Event::Incoming(Packet::PubRec(rec)) => {
            let mut t = shared.tracker.lock();
            match rec.reason {
                PubRecReason::Success => {}
                PubRecReason::NoMatchingSubscribers => {
                    if let Some(op) = t.inflight.get_mut(&rec.pkid) {
                        op.matched = false;
                    }
                }
                other => {
                    if let Some(mut op) = t.inflight.remove(&rec.pkid) {
                        drop(t);
                        complete(shared, &mut op, Err(refused(other)));
                    }
                }
            }
        }
        Event::Incoming(Packet::PubComp(comp)) => {
            let mut t = shared.tracker.lock();
            let op = match t.inflight.remove(&comp.pkid) {
                Some(op) if !op.matched => t.hold_unrouted(op, Instant::now(), shared.unrouted_cap),
                op => op,
            };
            drop(t);
            if let Some(mut op) = op {
                complete(shared, &mut op, Ok(()));
            }
        }
        Event::Outgoing(Outgoing::Subscribe(pkid) | Outgoing::Unsubscribe(pkid)) => {
            let mut t = shared.tracker.lock();
            if let Some(op) = t.subs_unassigned.pop_front() {
                t.subs_inflight.insert(pkid, op);
            }
        }
        Event::Incoming(Packet::SubAck(ack)) => {
            let op = shared.tracker.lock().subs_inflight.remove(&ack.pkid);
            if let Some(op) = op {
                if let Some(done) = op.done {
                    let _ = done.send(suback_outcome(&ack));
                }
            }
        }
        Event::Incoming(Packet::UnsubAck(ack)) => {
            let op = shared.tracker.lock().subs_inflight.remove(&ack.pkid);
            if let Some(op) = op {
                let failed = ack.reasons.iter().find(|r| {
                    !matches!(
                        r,
                        UnsubAckReason::Success | UnsubAckReason::NoSubscriptionExisted
                    )
                });
                let outcome = match failed {
                    None => Ok(()),
                    Some(r) => Err(Error::new(
                        ErrorKind::Unexpected,
                        format!("the MQTT broker refused to unsubscribe: {r:?}"),
                    )),
                };
                if let Some(done) = op.done {
                    let _ = done.send(outcome);
                }
            }
        }
        _ => {}
    }
}

fn complete(shared: &Shared, op: &mut PubOp, outcome: Result<()>) {
    if let Some(done) = op.done.take() {
        let id = shared.publish_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let matched = op.matched;
        let _ = done.send(outcome.map(|()| Confirmed {
            id: MessageId::from_u64(id),
            matched,
        }));
    }
    shared.progress.notify_waiters();
}

/// After a failure: takes back from rumqttc every publish and (un)subscribe it has not seen
/// confirmed, to queue them again after the next CONNACK.
fn take_back(eventloop: &mut EventLoop, shared: &Shared) {
    let mut fresh_publishes = 0usize;
    let mut fresh_subs = 0usize;
    eventloop.pending.retain(|r| match r {
        Request::Publish(p) => {
            if p.pkid == 0 {
                fresh_publishes += 1;
            }
            false
        }
        Request::PubRel(_) => false,
        Request::Subscribe(_) | Request::Unsubscribe(_) => {
            fresh_subs += 1;
            false
        }
        _ => true,
    });
    let mut t = shared.tracker.lock();
    let mut back: Vec<PubOp> = t.inflight.drain().map(|(_, op)| op).collect();
    if let Some(op) = t.collided.take() {
        back.push(op);
    }
    eventloop.state.collision = None;
    // The publishes without a packet id in the pending queue: first those fed from `resend`,
    // then those rumqttc took from its request queue.
    let fed: Vec<PubOp> = t.fed.drain(..).collect();
    let fresh = fresh_publishes.saturating_sub(fed.len());
    back.extend(fed);
    for _ in 0..fresh {
        match t.unassigned.pop_front() {
            Some(op) => back.push(op),
            None => break,
        }
    }
    t.resend.extend(back);
    t.resend.make_contiguous().sort_by_key(|o| o.seq);
    let mut subs: Vec<SubOp> = t.subs_inflight.drain().map(|(_, op)| op).collect();
    for _ in 0..fresh_subs {
        match t.subs_unassigned.pop_front() {
            Some(op) => subs.push(op),
            None => break,
        }
    }
    t.subs_resend.extend(subs);
    t.subs_resend.sort_by_key(|o| o.seq);
}

/// After a CONNACK: queues again what was taken back, before anything new.
fn requeue(eventloop: &mut EventLoop, shared: &Shared, session_present: bool, reconnect: bool) {
    let mut t = shared.tracker.lock();
    if reconnect && !shared.rejoin_grace.is_zero() {
        t.rejoin_until = Some(Instant::now() + shared.rejoin_grace);
    }
    let mut front: Vec<Request> = Vec::new();
    // Resubscribe after every reconnect, first: when the broker lost the session the
    // subscriptions are gone, and Mosquitto 2.0 does not route to shared subscriptions it
    // restored from its persistence file until they are subscribed again.
    let mut subs = std::mem::take(&mut t.subs_resend);
    if reconnect {
        if let Some(session) = &shared.session {
            let filters = session.filters();
            if !filters.is_empty() {
                t.next_seq += 1;
                let seq = t.next_seq;
                subs.insert(
                    0,
                    SubOp {
                        seq,
                        request: Request::Subscribe(Subscribe::new_many(filters, None)),
                        done: None,
                    },
                );
            }
        }
    }
    for op in subs.iter() {
        let mut request = op.request.clone();
        if let Request::Subscribe(s) = &mut request {
            s.pkid = 0;
        }
        if let Request::Unsubscribe(u) = &mut request {
            u.pkid = 0;
        }
        front.push(request);
    }
    for op in subs.into_iter().rev() {
        t.subs_unassigned.push_front(op);
    }
    // The broker may have come back with a smaller Maximum Packet Size: a packet over it would
    // break the connection again and again, so fail those sends instead.
    let max = shared.broker_max_packet.load(Ordering::Acquire) as usize;
    let (resend, too_large): (VecDeque<PubOp>, VecDeque<PubOp>) = std::mem::take(&mut t.resend)
        .into_iter()
        .partition(|op| op.publish.size() <= max);
    for mut op in too_large {
        let size = op.publish.size();
        complete(
            shared,
            &mut op,
            Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "the MQTT packet of {size} bytes exceeds the maximum packet size of {max} \
                     bytes the broker announced when it came back; not sent again"
                ),
            )),
        );
    }
    if !resend.is_empty() {
        tracing::debug!(client_id = %shared.client_id, count = resend.len(), "publishing again what the broker had not confirmed");
    }
    // Sent again by `feed_resends`, as the in-flight window allows.
    t.resend = resend;
    drop(t);
    for request in front.into_iter().rev() {
        eventloop.pending.push_front(request);
    }
    if let Some(session) = &shared.session {
        session.session_resumed(session_present || !reconnect);
    }
}

/// Hands publishes taken back after a disconnect to rumqttc again, in order, no more than its
/// in-flight window has room for. Publishes in rumqttc's pending queue bypass that window (and
/// then collide on packet ids, which loses all but the last of the colliding publishes), while
/// its request queue waits as long as the window is full or a collision is pending: so
/// nothing queued later overtakes them.
fn feed_resends(eventloop: &mut EventLoop, shared: &Shared, window: u16) {
    let mut t = shared.tracker.lock();
    if t.resend.is_empty() || eventloop.state.collision.is_some() {
        return;
    }
    let busy = usize::from(eventloop.state.inflight()) + t.fed.len();
    for _ in busy..usize::from(window) {
        let Some(mut op) = t.resend.pop_front() else {
            break;
        };
        op.publish.pkid = 0;
        let mut publish = op.publish.clone();
        publish.dup = false;
        eventloop.pending.push_back(Request::Publish(publish));
        t.fed.push_back(op);
    }
}

fn fail_all(shared: &Shared) {
    let mut guard = shared.tracker.lock();
    let t = &mut *guard;
    let mut ops: Vec<PubOp> = t.unassigned.drain(..).collect();
    ops.extend(t.inflight.drain().map(|(_, op)| op));
    ops.extend(t.resend.drain(..));
    ops.extend(t.fed.drain(..));
    ops.extend(t.unrouted.drain(..).map(|(_, op)| op));
    t.unrouted_due = None;
    ops.extend(t.collided.take());
    let subs: Vec<SubOp> = t
        .subs_unassigned
        .drain(..)
        .chain(t.subs_inflight.drain().map(|(_, op)| op))
        .chain(t.subs_resend.drain(..))
        .collect();
    drop(guard);
    for mut op in ops {
        if let Some(done) = op.done.take() {
            let _ = done.send(Err(unconfirmed()));
        }
    }
    for op in subs {
        if let Some(done) = op.done {
            let _ = done.send(Err(connection_closed()));
        }
    }
    shared.progress.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_are_full_jitter_under_reconnect_max() {
        let config = MqttConfig::default().reconnect_max(Duration::from_secs(10));
        let backoff = reconnect_backoff(&config);
        let mut below_a_tenth = 0;
        for attempt in 1..40 {
            let ceiling = RECONNECT_FIRST
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(config.reconnect_max);
            assert_eq!(backoff.ceiling(attempt), ceiling, "{attempt}");
            for _ in 0..50 {
                let d = backoff.delay(attempt);
                assert!(d <= ceiling, "{attempt}: {d:?}");
                below_a_tenth += usize::from(d < ceiling / 10);
            }
        }
        // Full jitter draws from zero: about a tenth of the delays are below a tenth of their
        // ceiling (none would be with delays drawn from [ceiling / 10, ceiling]).
        assert!(below_a_tenth > 50, "{below_a_tenth} of 1950");
        // Many clients restarting together do not pick the same delay.
        let delays: std::collections::HashSet<_> = (0..20).map(|_| backoff.delay(7)).collect();
        assert!(delays.len() > 10, "{delays:?}");
    }

    fn test_shared() -> Shared {
        let shared = Shared::new(&MqttConfig::new("127.0.0.1", 1), "t".into(), None);
        shared.connected.store(true, Ordering::Release);
        shared
    }

    /// rumqttc takes what is in its pending queue even when its in-flight window is full or a
    /// packet id collision is pending; two publishes then collide and the first one is lost.
    /// So publishes sent again after a reconnect go there no faster than the window allows.
    #[test]
    fn resends_go_to_rumqttc_within_its_in_flight_window() {
        const WINDOW: u16 = 4;
        let mut options = MqttOptions::new("t", "127.0.0.1", 1);
        options.set_outgoing_inflight_upper_limit(WINDOW);
        let mut eventloop = EventLoop::new(options, 10);
        let shared = test_shared();
        {
            let mut t = shared.tracker.lock();
            for seq in 1..=10 {
                let (done, _) = oneshot::channel();
                t.resend.push_back(PubOp::new(
                    seq,
                    Publish::new("a/b/c", QoS::AtLeastOnce, format!("{seq}"), None),
                    done,
                ));
            }
        }
        let publishes = |el: &EventLoop| {
            el.pending
                .iter()
                .filter(|r| matches!(r, Request::Publish(_)))
                .count()
        };
        feed_resends(&mut eventloop, &shared, WINDOW);
        assert_eq!(publishes(&eventloop), 4);
        feed_resends(&mut eventloop, &shared, WINDOW);
        assert_eq!(publishes(&eventloop), 4, "what was fed still counts");
        // rumqttc writes them: each gets a packet id and takes a slot of the window.
        let mut pkids = Vec::new();
        while let Some(request) = eventloop.pending.pop_front() {
            eventloop.state.handle_outgoing_packet(request).unwrap();
            while let Some(event) = eventloop.state.events.pop_front() {
                if let Event::Outgoing(Outgoing::Publish(pkid)) = event {
                    pkids.push(pkid);
                }
                handle(&shared, event, &mut eventloop.pending);
            }
        }
        assert_eq!(pkids.len(), 4);
        assert_eq!(eventloop.state.inflight(), 4);
        feed_resends(&mut eventloop, &shared, WINDOW);
        assert_eq!(publishes(&eventloop), 0, "the window is full");
        // One acknowledged: one more goes, the next in order.
        let ack = rumqttc::v5::mqttbytes::v5::PubAck::new(pkids[1], None);
        eventloop
            .state
            .handle_incoming_packet(rumqttc::v5::Incoming::PubAck(ack))
            .unwrap();
        for event in eventloop.state.events.drain(..).collect::<Vec<_>>() {
            handle(&shared, event, &mut eventloop.pending);
        }
        feed_resends(&mut eventloop, &shared, WINDOW);
        assert_eq!(publishes(&eventloop), 1);
        match eventloop.pending.front() {
            Some(Request::Publish(p)) => assert_eq!(p.payload.as_ref(), b"5"),
            other => panic!("{other:?}"),
        }
        // Nothing while a collision is pending.
        eventloop.pending.clear();
        shared.tracker.lock().fed.clear();
        eventloop.state.collision = Some(Publish::new("a/b/c", QoS::AtLeastOnce, "x", None));
        feed_resends(&mut eventloop, &shared, WINDOW);
        assert_eq!(publishes(&eventloop), 0);
        let t = shared.tracker.lock();
        assert_eq!(t.resend.len(), 5);
        assert_eq!(t.inflight.len(), 3);
    }

    #[test]
    fn unrouted_publishes_are_held_only_within_the_grace_and_come_back_in_order() {
        let op = |seq: u64, retain: bool| {
            let mut publish = Publish::new("a/b/c", QoS::AtLeastOnce, format!("{seq}"), None);
            publish.retain = retain;
            PubOp::new(seq, publish, oneshot::channel().0)
        };
        let now = Instant::now();
        let mut t = Tracker::default();
        let back = t.hold_unrouted(op(1, false), now, 10);
        assert!(
            back.is_some_and(|o| !o.matched),
            "no reconnect, no grace: handed back as routed to nobody"
        );
        t.rejoin_until = Some(now + Duration::from_secs(15));
        assert!(t.hold_unrouted(op(3, false), now, 10).is_none());
        assert!(t.hold_unrouted(op(2, false), now, 10).is_none());
        assert!(
            t.hold_unrouted(op(4, true), now, 10).is_some(),
            "retained: the broker keeps it"
        );
        assert!(
            t.hold_unrouted(op(5, false), now, 2).is_some(),
            "at the cap"
        );
        assert_eq!(
            t.lowest_outstanding(),
            Some(2),
            "flush waits for held publishes"
        );
        assert!(t.unrouted_full(2, now), "new publishes wait at the limit");
        assert!(!t.unrouted_full(3, now));
        assert!(
            !t.unrouted_full(2, now + Duration::from_secs(15)),
            "not once the grace is over"
        );
        assert!(!t.release_unrouted(now + Duration::from_millis(50)));
        assert!(t.resend.is_empty(), "not due yet");
        assert!(t.release_unrouted(now + UNROUTED_RETRY_FIRST));
        assert!(!t.unrouted_full(2, now), "room again");
        let order: Vec<u64> = t.resend.iter().map(|o| o.seq).collect();
        assert_eq!(order, [2, 3]);
        assert!(t.unrouted.is_empty() && t.unrouted_due.is_none());
        // The next time it waits twice as long, up to the maximum.
        let mut again = t.resend.pop_front().unwrap();
        for _ in 0..10 {
            assert!(t.hold_unrouted(again, now, 10).is_none());
            let (due, op) = t.unrouted.pop().unwrap();
            assert!(due - now <= UNROUTED_RETRY_MAX);
            again = op;
        }
        assert_eq!(again.unrouted, 11);
        t.unrouted_due = None;
        let after = now + Duration::from_secs(16);
        assert!(
            t.hold_unrouted(again, after, 10).is_some(),
            "the grace is over"
        );
    }
}
