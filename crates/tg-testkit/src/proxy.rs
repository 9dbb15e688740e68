//! A TCP proxy between a client and its broker that a test can turn into a silent network.
//!
//! [`Proxy::start`] listens on a free 127.0.0.1 port and forwards every connection to the
//! broker. [`Proxy::set`] switches all connections, present and future:
//!
//! - [`Mode::Pass`]: bytes flow both ways;
//! - [`Mode::BlackHole`]: bytes are read and thrown away in both directions, sockets stay open
//!   and no FIN or RST is sent — what a client sees when a switch or NAT table silently drops
//!   its packets, which only its keep-alive or its timeouts can notice; new connections are
//!   accepted and then hear nothing either;
//! - [`Mode::Cut`]: every connection is closed, new ones are closed as soon as accepted.
//!
//! Back to `Pass`, old connections stay dead (whatever was dropped is gone, as on a real
//! network that lost it) — a client must reconnect; new connections work.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

/// A proxy to one broker address; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Connections accepted so far (each reconnect of a client adds one).
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `broker` on a free 127.0.0.1 port, passing traffic.
    pub async fn start(broker: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, watch_mode) = watch::channel(Mode::Pass);
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
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
                tokio::spawn(connection(client, broker, watch_mode.clone()));
            }
        });
        Ok(Self {
            addr,
            mode,
            accepted,
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
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(Mode::Cut);
        self.task.abort();
    }
}

/// One proxied connection: forwards until the mode says otherwise; once black-holed or cut it
/// never forwards again.
async fn connection(client: TcpStream, broker: SocketAddr, mut mode: watch::Receiver<Mode>) {
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
    // Black hole: read both sides so no buffer fills up and no one sees a close, forward nothing.
    let both = async {
        let mut sink = [0u8; 16 * 1024];
        let mut sink2 = [0u8; 16 * 1024];
        loop {
            tokio::select! {
                n = client_read.read(&mut sink) => if matches!(n, Ok(0) | Err(_)) { return },
                n = server_read.read(&mut sink2) => if matches!(n, Ok(0) | Err(_)) { return },
            }
        }
    };
    tokio::select! {
        () = both => {}
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
    }
}
