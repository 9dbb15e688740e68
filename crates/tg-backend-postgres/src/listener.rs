//! The one `LISTEN` connection of a backend instance: it wakes q1/q2 consumers and carries q0
//! messages, fanning notifications out to the consumers of this process.
//!
//! A connection that only listens sends nothing, so on a silent network (bytes vanish both ways,
//! no FIN, no RST, TCP keep-alive still content) it would wait for notifications for good. It is
//! checked with `SELECT 1` every `safety_interval` — the period at which a waiting consumer claims
//! anyway, for a notification that may have been lost — and at once when a pooled statement went
//! unanswered; a check not answered within `query_timeout` replaces the connection. Every
//! consumer claims once the new one listens, so nothing notified in the gap is missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use tg_backend_api::{Backoff, Error, Result};
use tokio::sync::{broadcast, watch, Notify};
use tokio::time::Instant;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::tls::{Messages, Tls};

/// Waits between attempts to re-establish the connection: 50 ms doubling to 5 s, jittered so
/// that the instances of a service do not all reconnect at the same moment.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

/// Capacity of a q0 channel's in-process fan-out; a consumer that falls further behind loses
/// the oldest notifications (q0 is at-most-once).
pub(crate) const Q0_BUFFER: usize = 16_384;

struct Channel {
    refs: usize,
    wake: watch::Sender<u64>,
    q0: broadcast::Sender<Arc<str>>,
}

struct State {
    channels: HashMap<String, Channel>,
    client: Option<Arc<tokio_postgres::Client>>,
}

/// How the connection is kept: from the backend's configuration.
pub(crate) struct Timing {
    /// Bound of opening a connection (`connect_timeout`): tokio-postgres bounds only the TCP
    /// connect, and on a silent network the start-up exchange after it never ends.
    pub(crate) connect: Duration,
    /// How often the connection is checked (`safety_interval`).
    pub(crate) check_every: Duration,
    /// How long a check or a `LISTEN` may wait for its answer (`query_timeout`).
    pub(crate) answer_within: Duration,
}

/// Shared by the backend, its consumers and the listener task.
pub(crate) struct Listener {
    state: Mutex<State>,
    /// Serialises LISTEN/UNLISTEN commands with (re)connection.
    commands: tokio::sync::Mutex<()>,
    connected: watch::Sender<bool>,
    /// Asks for a check of the connection now.
    check: Notify,
    timing: Timing,
    server: String,
}

/// A consumer's registration on a channel; unregisters when dropped.
pub(crate) struct Registration {
    listener: Arc<Listener>,
    channel: String,
    pub(crate) wake: watch::Receiver<u64>,
    pub(crate) q0: Option<broadcast::Receiver<Arc<str>>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.listener.unregister(&self.channel);
    }
}

impl Listener {
    pub(crate) fn new(server: String, timing: Timing) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                channels: HashMap::new(),
                client: None,
            }),
            commands: tokio::sync::Mutex::new(()),
            connected: watch::channel(false).0,
            check: Notify::new(),
            timing,
            server,
        })
    }

    /// Checks the connection now (a pooled statement went unanswered: the network may have gone
    /// silent).
    pub(crate) fn check_now(&self) {
        self.check.notify_one();
    }

    /// Opens a connection within the connect timeout.
    async fn connect(
        &self,
        tls: &Tls,
        pg: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, Messages)> {
        match tokio::time::timeout(self.timing.connect, tls.connect(pg)).await {
            Ok(connected) => connected.map_err(|e| crate::error::pg(e, "connect", &self.server)),
            Err(_) => Err(Error::connection(format!(
                "PostgreSQL did not complete the connection within {:?} (connect_timeout)",
                self.timing.connect
            ))
            .with_context("server", &self.server)),
        }
    }

    /// A check of the connection: `SELECT 1` answered within `query_timeout`.
    fn check_on(
        self: &Arc<Self>,
        client: &Arc<tokio_postgres::Client>,
    ) -> futures::future::BoxFuture<'static, Result<()>> {
        let (this, client) = (self.clone(), client.clone());
        Box::pin(async move { this.command(&client, "SELECT 1").await })
    }

    /// Runs `sql` on the `LISTEN` connection within `query_timeout`.
    async fn command(&self, client: &tokio_postgres::Client, sql: &str) -> Result<()> {
        match tokio::time::timeout(self.timing.answer_within, client.batch_execute(sql)).await {
            Ok(done) => done.map_err(|e| crate::error::pg(e, "LISTEN", &self.server)),
            Err(_) => Err(Error::connection(format!(
                "PostgreSQL did not answer on the LISTEN connection within {:?} (query_timeout)",
                self.timing.answer_within
            ))
            .with_context("server", &self.server)),
        }
    }

    /// Starts the task that keeps the connection up until `stop` is cancelled (the backend
    /// closed); waits for the first connection.
    pub(crate) async fn start(
        self: &Arc<Self>,
        pg: tokio_postgres::Config,
        tls: Tls,
        stop: CancellationToken,
    ) -> Result<()> {
        let first = self.connect(&tls, &pg).await?;
        let this = self.clone();
        tokio::spawn(async move { this.run(pg, tls, Some(first), stop).await });
        let mut connected = self.connected.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| *c)).await;
        Ok(())
    }

    async fn run(
        self: Arc<Self>,
        pg: tokio_postgres::Config,
        tls: Tls,
        mut first: Option<(tokio_postgres::Client, Messages)>,
        stop: CancellationToken,
    ) {
        // failed attempts since the last connection that worked
        let mut retry = 0;
        while !stop.is_cancelled() {
            let pair = match first.take() {
                Some(p) => Ok(p),
                None => tokio::select! {
                    pair = self.connect(&tls, &pg) => pair,
                    () = stop.cancelled() => break,
                },
            };
            let (client, mut messages) = match pair {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(server = %self.server, error = %e, "LISTEN connection failed; retrying");
                    retry += 1;
                    tokio::select! {
                        () = tokio::time::sleep(RECONNECT.delay(retry)) => {}
                        () = stop.cancelled() => break,
                    }
                    continue;
                }
            };
            let client = Arc::new(client);
            // Install the client and LISTEN on every channel, while this task polls the connection.
            let install = {
                let this = self.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let _guard = this.commands.lock().await;
                    let names: Vec<String> = {
                        let mut st = this.state.lock();
                        st.client = Some(client.clone());
                        st.channels.keys().cloned().collect()
                    };
                    if !names.is_empty() {
                        let sql: String =
                            names.iter().map(|n| format!("LISTEN \"{n}\";")).collect();
                        this.command(&client, &sql).await?;
                    }
                    this.connected.send_replace(true);
                    // every consumer re-checks: notifications may have been missed while down
                    for ch in this.state.lock().channels.values() {
                        ch.wake.send_modify(|v| *v = v.wrapping_add(1));
                    }
                    Ok::<_, Error>(())
                })
            };
            let mut install = Some(install);
            // the check of the connection in flight, and when the next one is due
            let mut check: Option<futures::future::BoxFuture<'static, Result<()>>> = None;
            let mut next_check = Instant::now() + self.timing.check_every;
            loop {
                tokio::select! {
                    msg = messages.next() => match msg {
                        Some(Ok(AsyncMessage::Notification(n))) => self.dispatch(n.channel(), n.payload()),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(server = %self.server, error = %e, "LISTEN connection lost; reconnecting");
                            break;
                        }
                        None => {
                            tracing::warn!(server = %self.server, "LISTEN connection closed; reconnecting");
                            break;
                        }
                    },
                    Some(res) = futures::future::OptionFuture::from(install.as_mut()), if install.is_some() => {
                        install = None;
                        match res {
                            Ok(Ok(())) => retry = 0,
                            Ok(Err(e)) => {
                                tracing::warn!(server = %self.server, error = %e, "LISTEN failed; reconnecting");
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    Some(answer) = futures::future::OptionFuture::from(check.as_mut()), if check.is_some() => {
                        check = None;
                        if let Err(e) = answer {
                            tracing::warn!(server = %self.server, error = %e, "LISTEN connection went silent; reconnecting");
                            break;
                        }
                        next_check = Instant::now() + self.timing.check_every;
                    }
                    // (`SELECT 1` is a transaction: it runs on the safety timer's period, when a
                    // waiting consumer claims anyway, or when the network seems to have gone)
                    () = tokio::time::sleep_until(next_check), if check.is_none() => {
                        check = Some(self.check_on(&client));
                    }
                    () = self.check.notified(), if check.is_none() => {
                        check = Some(self.check_on(&client));
                    }
                    () = stop.cancelled() => break,
                }
            }
            self.connected.send_replace(false);
            self.state.lock().client = None;
            // closes the socket now, a dead one included
            drop(check);
            drop(client);
            drop(messages);
            tokio::select! {
                () = tokio::time::sleep(RECONNECT.delay(retry + 1)) => {}
                () = stop.cancelled() => break,
            }
        }
        self.connected.send_replace(false);
        self.state.lock().client = None;
    }

    fn dispatch(&self, channel: &str, payload: &str) {
        let st = self.state.lock();
        if let Some(ch) = st.channels.get(channel) {
            if payload.is_empty() {
                ch.wake.send_modify(|v| *v = v.wrapping_add(1));
            } else {
                let _ = ch.q0.send(Arc::from(payload));
            }
        }
    }

    /// Wakes this process's consumers of `channel` (after a local producer committed).
    pub(crate) fn wake_local(&self, channel: &str) {
        if let Some(ch) = self.state.lock().channels.get(channel) {
            ch.wake.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Registers interest in `channel`, LISTENing if it is new. With `require`, fails unless
    /// the LISTEN is in place when this returns (q0, where a missed notification is lost).
    pub(crate) async fn register(
        self: &Arc<Self>,
        channel: &str,
        q0: bool,
        require: bool,
    ) -> Result<Registration> {
        let _guard = self.commands.lock().await;
        let (fresh, client, wake, rx) = {
            let mut st = self.state.lock();
            let client = st.client.clone();
            let entry = st
                .channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    refs: 0,
                    wake: watch::channel(0).0,
                    q0: broadcast::channel(Q0_BUFFER).0,
                });
            entry.refs += 1;
            let fresh = entry.refs == 1;
            let wake = entry.wake.subscribe();
            let rx = q0.then(|| entry.q0.subscribe());
            (fresh, client, wake, rx)
        };
        let registration = Registration {
            listener: self.clone(),
            channel: channel.to_owned(),
            wake,
            q0: rx,
        };
        match client {
            Some(client) if fresh => {
                if let Err(err) = self
                    .command(&client, &format!("LISTEN \"{channel}\""))
                    .await
                {
                    self.check_now();
                    if require {
                        return Err(err);
                    }
                    tracing::warn!(error = %err, "LISTEN failed; the connection will be re-established");
                }
            }
            Some(_) => {}
            None if require => {
                return Err(Error::connection(
                    "the LISTEN connection is down; q0 messages cannot be received now",
                )
                .with_context("server", &self.server))
            }
            None => {}
        }
        Ok(registration)
    }

    fn unregister(self: &Arc<Self>, channel: &str) {
        let client = {
            let mut st = self.state.lock();
            let Some(entry) = st.channels.get_mut(channel) else {
                return;
            };
            entry.refs -= 1;
            if entry.refs > 0 {
                return;
            }
            st.channels.remove(channel);
            st.client.clone()
        };
        if let Some(client) = client {
            let this = self.clone();
            let channel = channel.to_owned();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _guard = this.commands.lock().await;
                    // re-registered meanwhile: keep listening
                    if this.state.lock().channels.contains_key(&channel) {
                        return;
                    }
                    let _ = this
                        .command(&client, &format!("UNLISTEN \"{channel}\""))
                        .await;
                });
            }
        }
    }

    /// Whether the LISTEN connection is up.
    pub(crate) fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }
}
