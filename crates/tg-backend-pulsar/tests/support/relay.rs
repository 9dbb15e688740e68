//! A TCP relay between Pulsar clients and pulsar-lite that adds the payload checksum.
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
//! of lookup responses (`CommandLookupTopicResponse.brokerServiceUrl`) to its own address.
//!
//! A Pulsar frame is `[total_size u32][command_size u32][command]`, followed for payload frames by
//! `[magic 0x0e01 u16][crc32c u32][metadata_size u32][metadata][payload]`, all big endian, where
//! `total_size` counts everything after itself. A frame carries a payload when
//! `total_size > 4 + command_size`.
//!
//! This file is shared by xtask (`cargo xtask test pulsar` runs one relay in front of the broker
//! it starts) and by the backend's own restart tests, which start their own broker and relay. It
//! uses only std threads and the `crc32c` crate. See `docs/pulsar.md`.

#![allow(dead_code, unreachable_pub)]

use std::borrow::Cow;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The magic number that starts the checksummed part of a payload frame.
pub const MAGIC_CRC32C: u16 = 0x0e01;

/// Frames larger than this are passed through untouched (pulsar-lite's own limit is 5 MiB, the
/// protocol's 5 MiB + 10 KiB by default; this only guards against a corrupt size).
const MAX_FRAME: usize = 256 * 1024 * 1024;

/// The body of a frame (everything after `total_size`) with the magic number and checksum
/// inserted when it carries a payload without them; unchanged otherwise.
pub fn add_checksum(body: &[u8]) -> Cow<'_, [u8]> {
    let Some(cmd_size) = body
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    else {
        return Cow::Borrowed(body);
    };
    let payload_start = 4usize.saturating_add(cmd_size as usize);
    if payload_start >= body.len() {
        return Cow::Borrowed(body); // a command without payload (or a malformed size)
    }
    let rest = &body[payload_start..];
    if rest.len() >= 2 && u16::from_be_bytes([rest[0], rest[1]]) == MAGIC_CRC32C {
        return Cow::Borrowed(body); // already checksummed
    }
    let mut out = Vec::with_capacity(body.len() + 6);
    out.extend_from_slice(&body[..payload_start]);
    out.extend_from_slice(&MAGIC_CRC32C.to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(rest).to_be_bytes());
    out.extend_from_slice(rest);
    Cow::Owned(out)
}

/// `BaseCommand.lookupTopicResponse` (field 24), `CommandLookupTopicResponse.brokerServiceUrl`
/// (field 1).
const LOOKUP_RESPONSE_FIELD: u64 = 24;
const BROKER_SERVICE_URL_FIELD: u64 = 1;

fn read_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One field of a protobuf message: its number, wire type, the whole field's bytes and (for
/// length-delimited fields) the value's bytes.
struct Field<'a> {
    number: u64,
    wire: u64,
    whole: &'a [u8],
    value: &'a [u8],
}

fn fields(msg: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < msg.len() {
        let start = pos;
        let tag = read_varint(msg, &mut pos)?;
        let (number, wire) = (tag >> 3, tag & 7);
        let value_start;
        match wire {
            0 => {
                value_start = pos;
                read_varint(msg, &mut pos)?;
            }
            1 => {
                value_start = pos;
                pos = pos.checked_add(8)?;
            }
            2 => {
                let len = usize::try_from(read_varint(msg, &mut pos)?).ok()?;
                value_start = pos;
                pos = pos.checked_add(len)?;
            }
            5 => {
                value_start = pos;
                pos = pos.checked_add(4)?;
            }
            _ => return None,
        }
        if pos > msg.len() {
            return None;
        }
        out.push(Field {
            number,
            wire,
            whole: &msg[start..pos],
            value: &msg[value_start..pos],
        });
    }
    Some(out)
}

/// Re-encodes `msg` with the length-delimited field `number` replaced by `value`.
fn replace_field(msg: &[u8], number: u64, value: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(msg.len() + value.len());
    for f in fields(msg)? {
        if f.number == number && f.wire == 2 {
            write_varint(&mut out, (number << 3) | 2);
            write_varint(&mut out, value.len() as u64);
            out.extend_from_slice(value);
        } else {
            out.extend_from_slice(f.whole);
        }
    }
    Some(out)
}

/// A command whose lookup response names a broker URL other than `url`, with `url` instead;
/// None for any other command.
pub fn rewrite_lookup(cmd: &[u8], url: &str) -> Option<Vec<u8>> {
    let all = fields(cmd)?;
    let lookup = all
        .iter()
        .find(|f| f.number == LOOKUP_RESPONSE_FIELD && f.wire == 2)?;
    let inner = fields(lookup.value)?;
    let current = inner
        .iter()
        .find(|f| f.number == BROKER_SERVICE_URL_FIELD && f.wire == 2)?;
    if current.value == url.as_bytes() {
        return None;
    }
    let new_inner = replace_field(lookup.value, BROKER_SERVICE_URL_FIELD, url.as_bytes())?;
    replace_field(cmd, LOOKUP_RESPONSE_FIELD, &new_inner)
}

/// The body of a broker → client frame as the client should see it: payload frames with a
/// checksum ([`add_checksum`]), lookup responses pointing at the relay (`relay_url`).
pub fn rewrite_frame<'a>(body: &'a [u8], relay_url: &str) -> Cow<'a, [u8]> {
    let Some(cmd_size) = body
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    else {
        return Cow::Borrowed(body);
    };
    let cmd_end = 4usize.saturating_add(cmd_size as usize);
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

    #[test]
    fn command_frames_pass_unchanged() {
        let b = body(b"\x08\x12", None);
        assert!(matches!(add_checksum(&b), Cow::Borrowed(_)));
        assert!(matches!(add_checksum(&[]), Cow::Borrowed(_)));
        assert!(matches!(add_checksum(&[0, 0]), Cow::Borrowed(_)));
        // a size pointing past the end is left alone
        let bad = [0, 0, 0, 9, 1, 2];
        assert_eq!(add_checksum(&bad).as_ref(), &bad);
    }

    #[test]
    fn payload_frames_get_magic_and_crc32c() {
        let b = body(b"cmd-bytes", Some((b"meta", b"payload!")));
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
    }

    #[test]
    fn lookup_responses_point_at_the_relay() {
        // BaseCommand { type: LOOKUP_RESPONSE (24), lookupTopicResponse (24): { brokerServiceUrl:
        // "pulsar://127.0.0.1:1", response: Connect, request_id: 7 } }
        let url = b"pulsar://127.0.0.1:1";
        let mut inner = vec![0x0a, url.len() as u8];
        inner.extend_from_slice(url);
        inner.extend_from_slice(&[0x18, 0x01, 0x20, 0x07]);
        let mut cmd = vec![0x08, 24, 0xc2, 0x01, inner.len() as u8];
        cmd.extend_from_slice(&inner);
        let mut frame = (cmd.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&cmd);

        let relay = "pulsar://127.0.0.1:65000";
        let out = rewrite_frame(&frame, relay);
        let new_cmd = &out[4..];
        assert_eq!(
            u32::from_be_bytes(out[..4].try_into().unwrap()) as usize,
            new_cmd.len()
        );
        let top = fields(new_cmd).unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].number, top[0].value), (1, &[24u8][..]));
        let lookup = fields(top[1].value).unwrap();
        assert_eq!(lookup[0].value, relay.as_bytes());
        assert_eq!(lookup[1].whole, &[0x18, 0x01]);
        assert_eq!(lookup[2].whole, &[0x20, 0x07]);
        // already pointing at the relay, or another command: unchanged
        assert!(matches!(rewrite_frame(&out, relay), Cow::Borrowed(_)));
        let ping = body(&[0x08, 18, 0x92, 0x01, 0x00], None);
        assert!(matches!(rewrite_frame(&ping, relay), Cow::Borrowed(_)));
        // varints longer than one byte survive
        let mut v = Vec::new();
        write_varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        assert_eq!(read_varint(&v, &mut 0), Some(300));
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
        // broker → client: a command frame, then a payload frame without checksum
        let frames = [body(b"c1", None), body(b"c2", Some((b"m", b"p")))];
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
            assert_eq!(b, rewrite_frame(f, "pulsar://unused").as_ref());
            got.push(b);
        }
        assert_eq!(got[1].len(), frames[1].len() + 6);
        drop(relay);
    }
}
