//! A TCP relay between Pulsar clients and pulsar-lite that adds the payload checksum (cargo
//! feature `pulsar-relay`; see `docs/pulsar.md`).
//!
//! pulsar-lite (the Pulsar-protocol broker the tests run against) forwards payload frames to
//! consumers **without** the optional magic number `0x0e01` and CRC32C checksum that real Pulsar
//! brokers pass on from producers. The `pulsar` crate (up to 6.9.1) requires them: it fails with
//! `Error decoding payload frame` and reconnects in a loop. This relay sits between the client and
//! the broker, passes client → broker bytes unchanged, and rewrites broker → client frames that
//! carry a payload but no magic number, inserting `0x0e01` and the CRC32C of what follows the
//! checksum field (metadata size, metadata, payload), exactly as a real broker would have them.
//!
//! pulsar-lite also answers topic lookups with its own listen address, which would send the client
//! around the relay for its producers and consumers; the relay therefore rewrites the broker URL
//! of lookup responses (`CommandLookupTopicResponse.brokerServiceUrl`) to its own address. The
//! command is read and written with the `pulsar` crate's own protobuf types.
//!
//! A Pulsar frame is `[total_size u32][command_size u32][command]`, followed for payload frames by
//! `[magic 0x0e01 u16][crc32c u32][metadata_size u32][metadata][payload]`, all big endian, where
//! `total_size` counts everything after itself. A frame carries a payload when
//! `total_size > 4 + command_size`.
//!
//! The backend's tests and the runtime's restart test start a [`Relay`] in front of a broker of
//! their own; `cargo xtask test pulsar` runs one as a process (the `pulsar_relay` example of
//! `tg-backend-pulsar`), since xtask itself is built before `protoc`, which the `pulsar` crate
//! needs, is installed.

use std::borrow::Cow;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use prost::Message as _;
use pulsar::proto::BaseCommand;

/// The magic number that starts the checksummed part of a payload frame.
pub const MAGIC_CRC32C: u16 = 0x0e01;

/// Frames larger than this are passed through untouched (pulsar-lite's own limit is 5 MiB, the
/// protocol's 5 MiB + 10 KiB by default; this only guards against a corrupt size).
const MAX_FRAME: usize = 256 * 1024 * 1024;

/// The command size at the start of a frame body, if the body has one.
fn command_size(body: &[u8]) -> Option<usize> {
    let size: [u8; 4] = body.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(size) as usize)
}

/// The body of a frame (everything after `total_size`) with the magic number and checksum
/// inserted when it carries a payload without them; unchanged otherwise.
pub fn add_checksum(body: &[u8]) -> Cow<'_, [u8]> {
    let Some(cmd_size) = command_size(body) else {
        return Cow::Borrowed(body);
    };
    let payload_start = 4usize.saturating_add(cmd_size);
    if payload_start >= body.len() {
        return Cow::Borrowed(body); // a command without payload (or a malformed size)
    }
    let rest = &body[payload_start..];
    if rest.starts_with(&MAGIC_CRC32C.to_be_bytes()) {
        return Cow::Borrowed(body); // already checksummed
    }
    let mut out = Vec::with_capacity(body.len() + 6);
    out.extend_from_slice(&body[..payload_start]);
    out.extend_from_slice(&MAGIC_CRC32C.to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(rest).to_be_bytes());
    out.extend_from_slice(rest);
    Cow::Owned(out)
}

/// The command `cmd` (an encoded `BaseCommand`) with the broker URL of its lookup response
/// replaced by `url`; None when it is no lookup response, names no broker URL (a failed lookup)
/// or names `url` already.
pub fn rewrite_lookup(cmd: &[u8], url: &str) -> Option<Vec<u8>> {
    let mut command = BaseCommand::decode(cmd).ok()?;
    let broker = command
        .lookup_topic_response
        .as_mut()?
        .broker_service_url
        .as_mut()?;
    if broker == url {
        return None;
    }
    url.clone_into(broker);
    Some(command.encode_to_vec())
}

/// The body of a broker → client frame as the client should see it: payload frames with a
/// checksum ([`add_checksum`]), lookup responses pointing at the relay (`relay_url`).
pub fn rewrite_frame<'a>(body: &'a [u8], relay_url: &str) -> Cow<'a, [u8]> {
    let Some(cmd_size) = command_size(body) else {
        return Cow::Borrowed(body);
    };
    let cmd_end = 4usize.saturating_add(cmd_size);
    if cmd_end < body.len() {
        return add_checksum(body);
    }
    if cmd_end > body.len() {
        return Cow::Borrowed(body);
    }
    match rewrite_lookup(&body[4..], relay_url) {
        Some(cmd) => {
            let mut out = Vec::with_capacity(4 + cmd.len());
            out.extend_from_slice(&(cmd.len() as u32).to_be_bytes());
            out.extend_from_slice(&cmd);
            Cow::Owned(out)
        }
        None => Cow::Borrowed(body),
    }
}

/// Copies frames from `from` to `to`, adding checksums, until either side closes.
fn pump_broker_to_client(from: TcpStream, to: TcpStream, relay_url: &str) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(256 * 1024, from);
    let mut writer = BufWriter::with_capacity(256 * 1024, to);
    let mut body = Vec::new();
    loop {
        let mut size = [0u8; 4];
        if let Err(e) = reader.read_exact(&mut size) {
            writer.flush()?;
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            };
        }
        let total = u32::from_be_bytes(size) as usize;
        if total > MAX_FRAME {
            // not a frame we understand: stop rewriting, pass the rest through
            writer.write_all(&size)?;
            writer.flush()?;
            let mut to = writer.into_inner().map_err(|e| e.into_error())?;
            io::copy(&mut reader, &mut to)?;
            return Ok(());
        }
        body.resize(total, 0);
        reader.read_exact(&mut body)?;
        let out = rewrite_frame(&body, relay_url);
        writer.write_all(&(out.len() as u32).to_be_bytes())?;
        writer.write_all(&out)?;
        // write out as soon as nothing more is already waiting, so that latency stays low
        if reader.buffer().is_empty() {
            writer.flush()?;
        }
    }
}

/// A running relay: `127.0.0.1:<port>` → the broker. Stops (and cuts its connections) on drop.
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on a free port of 127.0.0.1 and relays every connection to `broker`.
    pub fn start(broker: SocketAddr) -> io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), broker)
    }

    /// Listens on `listen` and relays every connection to `broker`.
    pub fn start_on(listen: SocketAddr, broker: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accept = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::Builder::new()
                .name("pulsar-relay".into())
                .spawn(move || accept_loop(listener, broker, addr, stop, conns))?
        };
        Ok(Self {
            addr,
            stop,
            conns,
            accept: Some(accept),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `pulsar://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("pulsar://{}", self.addr)
    }

    /// Cuts every relayed connection (the clients see the broker go away) but keeps listening.
    pub fn cut_connections(&self) {
        for conn in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // wake the accept loop
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.cut_connections();
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("addr", &self.addr).finish()
    }
}

fn accept_loop(
    listener: TcpListener,
    broker: SocketAddr,
    relay: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let server = match TcpStream::connect(broker) {
            Ok(s) => s,
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let clones = (
            client.try_clone(),
            client.try_clone(),
            server.try_clone(),
            server.try_clone(),
        );
        let (Ok(c1), Ok(c2), Ok(s1), Ok(s2)) = clones else {
            continue;
        };
        {
            let mut list = conns.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|s| s.peer_addr().is_ok());
            list.push(c2);
            list.push(s2);
        }
        // client → broker: unchanged
        let up = std::thread::Builder::new()
            .name("pulsar-relay-up".into())
            .spawn(move || {
                let (mut from, mut to) = (client, server);
                let _ = io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
            });
        // broker → client: checksums added, lookups pointed at the relay
        let relay_url = format!("pulsar://{relay}");
        let down = std::thread::Builder::new()
            .name("pulsar-relay-down".into())
            .spawn(move || {
                let (from, to) = (s1, c1);
                let (f, t) = (from.try_clone(), to.try_clone());
                let _ = pump_broker_to_client(from, to, &relay_url);
                if let (Ok(f), Ok(t)) = (f, t) {
                    let _ = f.shutdown(Shutdown::Both);
                    let _ = t.shutdown(Shutdown::Both);
                }
            });
        if up.is_err() || down.is_err() {
            continue;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulsar::proto::{
        base_command::Type, command_lookup_topic_response::LookupType, CommandLookupTopicResponse,
        CommandMessage, CommandPing, MessageIdData, MessageMetadata,
    };

    /// A frame body: `[cmd_size][cmd]` and, if given, `[meta_size][meta][payload]` without checksum.
    fn body(cmd: &[u8], meta_payload: Option<(&[u8], &[u8])>) -> Vec<u8> {
        let mut b = (cmd.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(cmd);
        if let Some((meta, payload)) = meta_payload {
            b.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            b.extend_from_slice(meta);
            b.extend_from_slice(payload);
        }
        b
    }

    fn lookup_response(url: Option<&str>) -> BaseCommand {
        BaseCommand {
            r#type: Type::LookupResponse as i32,
            lookup_topic_response: Some(CommandLookupTopicResponse {
                broker_service_url: url.map(str::to_owned),
                response: Some(LookupType::Connect as i32),
                request_id: 7,
                authoritative: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn command_frames_pass_unchanged() {
        let ping = BaseCommand {
            r#type: Type::Ping as i32,
            ping: Some(CommandPing {}),
            ..Default::default()
        };
        let b = body(&ping.encode_to_vec(), None);
        assert!(matches!(add_checksum(&b), Cow::Borrowed(_)));
        assert!(matches!(
            rewrite_frame(&b, "pulsar://relay:1"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(add_checksum(&[]), Cow::Borrowed(_)));
        assert!(matches!(add_checksum(&[0, 0]), Cow::Borrowed(_)));
        // a size pointing past the end is left alone
        let bad = [0, 0, 0, 9, 1, 2];
        assert_eq!(rewrite_frame(&bad, "pulsar://relay:1").as_ref(), &bad);
    }

    #[test]
    fn payload_frames_get_magic_and_crc32c() {
        let meta = MessageMetadata {
            producer_name: "p".into(),
            sequence_id: 3,
            publish_time: 1,
            ..Default::default()
        }
        .encode_to_vec();
        let b = body(b"cmd-bytes", Some((&meta, b"payload!")));
        let out = add_checksum(&b);
        assert_eq!(out.len(), b.len() + 6);
        let start = 4 + 9;
        assert_eq!(&out[..start], &b[..start]);
        assert_eq!(&out[start..start + 2], &[0x0e, 0x01]);
        let crc = u32::from_be_bytes(out[start + 2..start + 6].try_into().unwrap());
        assert_eq!(&out[start + 6..], &b[start..]);
        assert_eq!(crc, crc32c::crc32c(&b[start..]));
        // the CRC32C check value of "123456789" is 0xe3069283
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // rewriting again changes nothing
        assert_eq!(add_checksum(&out).as_ref(), out.as_ref());
        assert_eq!(rewrite_frame(&b, "pulsar://relay:1").as_ref(), out.as_ref());
    }

    /// What the `pulsar` crate's own frame decoder makes of `body` (the client's view).
    fn decode_as_the_client(body: &[u8]) -> Result<pulsar::message::Message, String> {
        use tokio_util::codec::Decoder as _;
        let mut frame = bytes::BytesMut::from(&(body.len() as u32).to_be_bytes()[..]);
        frame.extend_from_slice(body);
        match pulsar::message::Codec.decode(&mut frame) {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err("incomplete frame".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn the_pulsar_crate_reads_relayed_payload_frames() {
        let command = BaseCommand {
            r#type: Type::Message as i32,
            message: Some(CommandMessage {
                consumer_id: 1,
                message_id: MessageIdData {
                    ledger_id: 4,
                    entry_id: 2,
                    ..Default::default()
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        let meta = MessageMetadata {
            producer_name: "p".into(),
            sequence_id: 3,
            publish_time: 1,
            ..Default::default()
        };
        let b = body(
            &command.encode_to_vec(),
            Some((&meta.encode_to_vec(), b"payload!")),
        );
        // as pulsar-lite sends it, the client refuses the frame
        assert!(decode_as_the_client(&b).is_err());
        let message = decode_as_the_client(&rewrite_frame(&b, "pulsar://relay:1")).unwrap();
        assert_eq!(message.command, command);
        let payload = message.payload.expect("a payload");
        assert_eq!(
            (payload.metadata, payload.data),
            (meta, b"payload!".to_vec())
        );
    }

    #[test]
    fn lookup_responses_point_at_the_relay() {
        let relay = "pulsar://127.0.0.1:65000";
        let frame = body(
            &lookup_response(Some("pulsar://127.0.0.1:1")).encode_to_vec(),
            None,
        );
        let out = rewrite_frame(&frame, relay);
        let size = command_size(&out).unwrap();
        assert_eq!(size, out.len() - 4);
        let command = BaseCommand::decode(&out[4..]).unwrap();
        // the URL changed, nothing else did
        assert_eq!(command, lookup_response(Some(relay)));
        // already pointing at the relay, a failed lookup without URL, or another command:
        // unchanged
        assert!(matches!(rewrite_frame(&out, relay), Cow::Borrowed(_)));
        let failed = body(&lookup_response(None).encode_to_vec(), None);
        assert!(matches!(rewrite_frame(&failed, relay), Cow::Borrowed(_)));
        assert_eq!(rewrite_lookup(b"\xff\xff not protobuf", relay), None);
    }

    #[test]
    fn relay_rewrites_a_stream_of_frames() {
        let broker = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = Relay::start(broker.local_addr().unwrap()).unwrap();
        let mut client = TcpStream::connect(relay.addr()).unwrap();
        let (mut server, _) = broker.accept().unwrap();
        // client → broker bytes are untouched
        client.write_all(b"\x00\x00\x00\x02hi").unwrap();
        let mut up = [0u8; 6];
        server.read_exact(&mut up).unwrap();
        assert_eq!(&up, b"\x00\x00\x00\x02hi");
        // broker → client: a lookup response, then a payload frame without checksum
        let frames = [
            body(
                &lookup_response(Some("pulsar://elsewhere:1")).encode_to_vec(),
                None,
            ),
            body(b"c2", Some((b"m", b"p"))),
        ];
        for f in &frames {
            server.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
            server.write_all(f).unwrap();
        }
        let mut got = Vec::new();
        for f in &frames {
            let mut size = [0u8; 4];
            client.read_exact(&mut size).unwrap();
            let mut b = vec![0u8; u32::from_be_bytes(size) as usize];
            client.read_exact(&mut b).unwrap();
            assert_eq!(b, rewrite_frame(f, &relay.url()).as_ref());
            got.push(b);
        }
        let lookup = BaseCommand::decode(&got[0][4..]).unwrap();
        assert_eq!(
            lookup.lookup_topic_response.unwrap().broker_service_url,
            Some(relay.url())
        );
        assert_eq!(got[1].len(), frames[1].len() + 6);
        drop(relay);
    }
}
