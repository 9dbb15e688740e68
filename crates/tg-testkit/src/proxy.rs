//! A TCP proxy between a client and its broker that a test can turn into a silent network.
//!
//! [`Proxy::start`] listens on a free 127.0.0.1 port and forwards every connection to the
//! broker. [`Proxy::set`] switches all connections, present and future:
//!
//! - [`Mode::Pass`]: bytes flow both ways;
//! - [`Mode::BlackHole`]: bytes are read and thrown away in both directions, sockets stay open
//!   and no FIN or RST is sent — what a client sees when a switch or NAT table silently drops
//!   its packets, which only its keep-alive or its timeouts can notice; new connections are
//!   accepted and then hear nothing either. A side that closes its socket meanwhile is not told
//!   to the other: each end learns of the loss by its own timers only;
//! - [`Mode::Cut`]: every connection is closed, new ones are closed as soon as accepted.
//!
//! Back to `Pass`, old connections stay dead (whatever was dropped is gone, as on a real
//! network that lost it) — a client must reconnect; new connections work.
//!
//! The kernel of the proxy's host still acknowledges every TCP segment, so TCP keep-alive and
//! retransmission timeouts see a healthy peer: only the protocols' own keep-alives and request
//! timeouts can notice this black hole (a real one would also, after minutes, fail TCP's).
//!
//! [`Proxy::caught`] tells, for every connection a black hole caught while it was passing
//! traffic, when the client and when the broker gave up on it (closed their socket): how long
//! each side took to notice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Swallow everything, keep the sockets open, say nothing.
    BlackHole,
    /// Close every connection and refuse new ones.
    Cut,
}

/// A connection a black hole caught while it was passing traffic, and what its two ends did
/// about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caught {
    /// When the black hole began for it.
    pub black_holed: Instant,
    /// When the client closed its socket (it noticed, or it shut down), if it did.
    pub client_closed: Option<Instant>,
    /// When the broker closed its socket, if it did.
    pub broker_closed: Option<Instant>,
}

/// The connections black holes caught, in the order they were caught.
type CaughtLog = Arc<Mutex<Vec<Caught>>>;

/// A proxy to one broker address; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Connections accepted so far (each reconnect of a client adds one).
    accepted: Arc<AtomicU64>,
    caught: CaughtLog,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `broker` on a free 127.0.0.1 port, passing traffic.
    pub async fn start(broker: SocketAddr) -> std::io::Result<Self> {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await?, broker)
    }

    /// Starts a proxy to `broker` accepting on `listener`, passing traffic: for a broker that
    /// must be told the proxy's address before it starts (a Kafka broker advertises it).
    pub fn start_on(listener: TcpListener, broker: SocketAddr) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (mode, watch_mode) = watch::channel(Mode::Pass);
        let accepted = Arc::new(AtomicU64::new(0));
        let caught = CaughtLog::default();
        let (counter, log) = (accepted.clone(), caught.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if *watch_mode.borrow() == Mode::Cut {
                    drop(client);
                    continue;
                }
                tokio::spawn(connection(client, broker, watch_mode.clone(), log.clone()));
            }
        });
        Ok(Self {
            addr,
            mode,
            accepted,
            caught,
            task,
        })
    }

    /// The address clients connect to instead of the broker's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Switches every connection to `mode`.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Every connection a black hole caught while it was passing traffic, in the order caught.
    /// (Connections accepted during a black hole never passed anything and are not listed.)
    pub fn caught(&self) -> Vec<Caught> {
        self.caught
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(Mode::Cut);
        self.task.abort();
    }
}

/// One proxied connection: forwards until the mode says otherwise; once black-holed or cut it
/// never forwards again.
async fn connection(
    client: TcpStream,
    broker: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    caught: CaughtLog,
) {
    let initial = *mode.borrow();
    let server = match initial {
        Mode::Pass => match TcpStream::connect(broker).await {
            Ok(s) => Some(s),
            Err(_) => return,
        },
        _ => None,
    };
    let _ = client.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let Some(server) = server else {
        // Accepted while black-holed: swallow what the client sends until cut.
        swallow(&mut client_read, &mut mode).await;
        return;
    };
    let _ = server.set_nodelay(true);
    let (mut server_read, mut server_write) = server.into_split();
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    loop {
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                match *mode.borrow_and_update() {
                    Mode::Pass => continue,
                    Mode::BlackHole => break,
                    Mode::Cut => return,
                }
            }
            n = client_read.read(&mut up) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if server_write.write_all(&up[..n]).await.is_err() { return },
            },
            n = server_read.read(&mut down) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if client_write.write_all(&down[..n]).await.is_err() { return },
            },
        }
    }
    // Black hole: read both sides so no buffer fills up, forward nothing, and keep each side's
    // socket open until that side closes it (or the proxy is cut): neither end hears of the
    // other giving up. Both write halves stay alive until then, so no FIN goes out either.
    let entry = {
        let mut log = caught.lock().unwrap_or_else(|e| e.into_inner());
        log.push(Caught {
            black_holed: Instant::now(),
            client_closed: None,
            broker_closed: None,
        });
        log.len() - 1
    };
    let note = |client: bool| {
        let mut log = caught.lock().unwrap_or_else(|e| e.into_inner());
        let at = Some(Instant::now());
        if client {
            log[entry].client_closed = at;
        } else {
            log[entry].broker_closed = at;
        }
    };
    let client_side = async {
        let mut sink = [0u8; 16 * 1024];
        while !matches!(client_read.read(&mut sink).await, Ok(0) | Err(_)) {}
        note(true);
        drop(client_write);
    };
    let broker_side = async {
        let mut sink = [0u8; 16 * 1024];
        while !matches!(server_read.read(&mut sink).await, Ok(0) | Err(_)) {}
        note(false);
        drop(server_write);
    };
    tokio::select! {
        _ = async { tokio::join!(client_side, broker_side) } => {}
        () = until_cut(&mut mode) => {}
    }
}

async fn swallow(read: &mut tokio::net::tcp::OwnedReadHalf, mode: &mut watch::Receiver<Mode>) {
    let mut sink = [0u8; 16 * 1024];
    tokio::select! {
        () = async { while !matches!(read.read(&mut sink).await, Ok(0) | Err(_)) {} } => {}
        () = until_cut(mode) => {}
    }
}

async fn until_cut(mode: &mut watch::Receiver<Mode>) {
    while mode.changed().await.is_ok() {
        if *mode.borrow_and_update() == Mode::Cut {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An echo server for the proxy to front.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(wait, s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn passes_then_black_holes_silently_then_cuts() {
        let proxy = Proxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut s, Duration::from_secs(5)).await.as_deref(),
            Some(&b"ping"[..])
        );
        proxy.set(Mode::BlackHole);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // nothing comes back, and the socket is not closed either
        assert_eq!(round_trip(&mut s, Duration::from_millis(300)).await, None);
        assert!(
            s.write_all(b"more").await.is_ok(),
            "a black hole closes nothing"
        );
        proxy.set(Mode::Pass);
        // the old connection stays dead; a new one works
        assert_eq!(round_trip(&mut s, Duration::from_millis(300)).await, None);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut fresh, Duration::from_secs(5))
                .await
                .as_deref(),
            Some(&b"ping"[..])
        );
        proxy.set(Mode::Cut);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut buf = [0u8; 4];
        let closed = tokio::time::timeout(Duration::from_secs(2), fresh.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "cut closes: {closed:?}"
        );
        assert_eq!(proxy.accepted(), 2);
        // the first connection was caught passing traffic, and its client never closed it
        let caught = proxy.caught();
        assert_eq!(caught.len(), 1, "{caught:?}");
        assert_eq!(caught[0].client_closed, None);
    }

    /// A broker that closes every connection 200 ms after accepting it, as a broker's
    /// keep-alive timeout would.
    async fn closing_broker() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    drop(s);
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_black_hole_tells_neither_side_of_the_other_closing() {
        let proxy = Proxy::start(closing_broker().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        // wait until the proxy has its broker connection, then black-hole it
        while proxy.accepted() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.set(Mode::BlackHole);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // the broker closes meanwhile; the client must not hear of it
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        let heard = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
        assert!(heard.is_err(), "the client heard something: {heard:?}");
        let caught = proxy.caught();
        assert_eq!(caught.len(), 1, "{caught:?}");
        assert!(caught[0].client_closed.is_none());
        assert!(
            caught[0].broker_closed.is_some(),
            "the broker's close was not noted: {caught:?}"
        );
        // the client gives up: noted with its time
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.caught()[0].client_closed.is_none() {
            assert!(
                Instant::now() < deadline,
                "the client's close was not noted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let caught = proxy.caught()[0];
        assert!(caught.client_closed.unwrap() >= caught.black_holed);
    }
}
