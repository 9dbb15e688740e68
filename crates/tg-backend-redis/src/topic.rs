//! How topics map to Redis keys and channels, and how messages are laid out in them.
//!
//! A topic `{qos}/{tenant}/{namespace}/{queue}` has exactly four `/`-separated segments and no
//! segment may contain `/` (nor `{`, `}`), so wrapping it in braces after the prefix is unambiguous
//! (and makes every key of one topic share a Redis Cluster hash slot):
//!
//! | what | name |
//! |---|---|
//! | q0 channel | `{prefix}/{q0/tenant/namespace/queue}` |
//! | q1/q2 stream | `{prefix}/{q1/tenant/namespace/queue}` |
//! | retry stream of a subscription | `{prefix}/{q1/…/queue}/retry/{subscription}` |
//! | lease of an exclusive/failover subscription | `{prefix}/{q1/…/queue}/lease/{subscription}` |
//! | q2 de-duplication id | `{prefix}/{q2/…/queue}/dedup/{id}` |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use redis::Value;
use tg_backend_api::{Error, ErrorKind, Properties, Result, Topic};

/// The Redis names of one topic.
#[derive(Debug, Clone)]
pub(crate) struct TopicKeys {
    /// The stream (q1/q2) or channel (q0).
    pub(crate) main: String,
}

impl TopicKeys {
    pub(crate) fn new(prefix: &str, topic: &Topic) -> Self {
        Self {
            main: format!("{prefix}/{{{topic}}}"),
        }
    }

    /// The retry stream of a subscription: nacked and released messages go there.
    pub(crate) fn retry(&self, subscription: &str) -> String {
        format!("{}/retry/{subscription}", self.main)
    }

    /// The lease key of an exclusive or failover subscription.
    pub(crate) fn lease(&self, subscription: &str) -> String {
        format!("{}/lease/{subscription}", self.main)
    }

    /// The key remembering one q2 de-duplication id.
    pub(crate) fn dedup(&self, id: &str) -> String {
        format!("{}/dedup/{id}", self.main)
    }
}

/// Stream entry field names (see docs.md, "Message layout").
pub(crate) mod field {
    /// The payload.
    pub(crate) const PAYLOAD: &[u8] = b"d";
    /// The key, when set.
    pub(crate) const KEY: &[u8] = b"k";
    /// How many times the entry was delivered before (retry copies only).
    pub(crate) const REDELIVERIES: &[u8] = b"r";
    /// The id of the original entry (retry copies only).
    pub(crate) const ORIGINAL: &[u8] = b"o";
    /// Prefix of property fields: `p:<name>`.
    pub(crate) const PROPERTY: &[u8] = b"p:";
}

/// A message as `send` queues it: its parts copied into the batch's buffer (no allocation per
/// message), which the producer's writer turns into a command. Little-endian:
/// `[u32 payload len][payload][u32 key len + 1, 0 = none][key][u32 n]([u32 len][name][u32 len][value])*n`.
pub(crate) fn encode_record(
    buf: &mut Vec<u8>,
    payload: &[u8],
    properties: &Properties,
    key: Option<&str>,
) {
    let props: usize = properties.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    buf.reserve(12 + payload.len() + key.map_or(0, str::len) + props);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    match key {
        Some(k) => {
            buf.extend_from_slice(&(k.len() as u32 + 1).to_le_bytes());
            buf.extend_from_slice(k.as_bytes());
        }
        None => buf.extend_from_slice(&0u32.to_le_bytes()),
    }
    buf.extend_from_slice(&(properties.len() as u32).to_le_bytes());
    for (k, v) in properties {
        buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
        buf.extend_from_slice(k.as_bytes());
        buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        buf.extend_from_slice(v.as_bytes());
    }
}

/// A queued message (see [`encode_record`]), borrowed from the batch's buffer.
#[derive(Clone, Copy)]
pub(crate) struct Record<'a> {
    pub(crate) payload: &'a [u8],
    pub(crate) key: Option<&'a [u8]>,
    count: usize,
    props: &'a [u8],
}

/// Splits `n` bytes off the front of `buf`.
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

fn take_u32(buf: &mut &[u8]) -> Option<usize> {
    let b = take(buf, 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

impl<'a> Record<'a> {
    /// Decodes the record at the front of `buf` and advances past it.
    pub(crate) fn decode(buf: &mut &'a [u8]) -> Option<Self> {
        let n = take_u32(buf)?;
        let payload = take(buf, n)?;
        let key = match take_u32(buf)? {
            0 => None,
            n => Some(take(buf, n - 1)?),
        };
        let count = take_u32(buf)?;
        let start = *buf;
        for _ in 0..count {
            let n = take_u32(buf)?;
            take(buf, n)?;
            let n = take_u32(buf)?;
            take(buf, n)?;
        }
        let props = &start[..start.len() - buf.len()];
        Some(Self {
            payload,
            key,
            count,
            props,
        })
    }

    /// The properties, `(name, value)`.
    pub(crate) fn properties(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        let mut rest = self.props;
        (0..self.count).filter_map(move |_| {
            let n = take_u32(&mut rest)?;
            let k = take(&mut rest, n)?;
            let n = take_u32(&mut rest)?;
            Some((k, take(&mut rest, n)?))
        })
    }

    /// One property's value.
    pub(crate) fn property(&self, name: &str) -> Option<&'a [u8]> {
        self.properties()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The number of properties.
    pub(crate) fn property_count(&self) -> usize {
        self.count
    }

    /// The bytes the properties take as `XADD` fields or in a frame (names and values).
    pub(crate) fn properties_len(&self) -> usize {
        self.props.len()
    }
}

/// Appends the fields of a message to an `XADD` (or script) command.
pub(crate) fn push_fields(cmd: &mut redis::Cmd, record: &Record<'_>) {
    cmd.arg(field::PAYLOAD).arg(record.payload);
    if let Some(key) = record.key {
        cmd.arg(field::KEY).arg(key);
    }
    if record.count == 0 {
        return;
    }
    let mut name = Vec::with_capacity(32);
    for (k, v) in record.properties() {
        name.clear();
        name.extend_from_slice(field::PROPERTY);
        name.extend_from_slice(k);
        cmd.arg(&name[..]).arg(v);
    }
}

/// A stream entry, decoded.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) payload: Bytes,
    pub(crate) properties: Properties,
    pub(crate) key: Option<String>,
    pub(crate) redeliveries: u32,
    pub(crate) original: Option<String>,
}

fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

pub(crate) fn into_string(v: Value) -> Option<String> {
    into_bytes(v).and_then(|b| String::from_utf8(b).ok())
}

/// The bytes of a string reply, borrowed.
pub(crate) fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Decodes the field list of an entry (`[f1, v1, f2, v2, …]`, or a map under RESP3).
pub(crate) fn decode_entry(fields: Value) -> Result<Entry> {
    let mut entry = Entry {
        payload: Bytes::new(),
        properties: Properties::new(),
        key: None,
        redeliveries: 0,
        original: None,
    };
    match fields {
        Value::Array(items) => {
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                entry.field(&k, v);
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                entry.field(&k, v);
            }
        }
        other => return Err(decode_error(format!("stream entry fields are {other:?}"))),
    }
    Ok(entry)
}

impl Entry {
    fn field(&mut self, k: &Value, v: Value) {
        let Some(k) = as_bytes(k) else { return };
        match k {
            field::PAYLOAD => self.payload = into_bytes(v).map(Bytes::from).unwrap_or_default(),
            field::KEY => self.key = into_string(v),
            field::REDELIVERIES => {
                self.redeliveries = as_bytes(&v)
                    .and_then(parse_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0)
            }
            field::ORIGINAL => self.original = into_string(v),
            name if name.starts_with(field::PROPERTY) => {
                let name = String::from_utf8_lossy(&name[field::PROPERTY.len()..]).into_owned();
                let value = into_bytes(v)
                    .map(|b| match String::from_utf8(b) {
                        Ok(s) => s,
                        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                    })
                    .unwrap_or_default();
                self.properties.insert(name, value);
            }
            _ => {} // unknown fields (a later layout version) are ignored
        }
    }
}

/// A decimal `u64` (digits only, no sign, no overflow).
fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in s {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(d))?;
    }
    Some(n)
}

/// A stream id `<ms>-<seq>` as its two numbers.
pub(crate) fn parse_id(id: &[u8]) -> Option<(u64, u64)> {
    let dash = id.iter().position(|&c| c == b'-')?;
    Some((parse_u64(&id[..dash])?, parse_u64(&id[dash + 1..])?))
}

/// Room for `<u64>-<u64>`.
pub(crate) type IdBuf = [u8; 41];

/// Writes the stream id `<ms>-<seq>` into `buf` and returns it (no allocation, no formatter).
pub(crate) fn format_id(ms: u64, seq: u64, buf: &mut IdBuf) -> &[u8] {
    /// Writes `n` right-aligned into `out`, two digits a step; returns where it starts.
    fn digits(mut n: u64, out: &mut [u8; 20]) -> usize {
        const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
            2021222324252627282930313233343536373839\
            4041424344454647484950515253545556575859\
            6061626364656667686970717273747576777879\
            8081828384858687888990919293949596979899";
        let mut i = out.len();
        while n >= 100 {
            let p = (n % 100) as usize * 2;
            n /= 100;
            i -= 2;
            out[i..i + 2].copy_from_slice(&PAIRS[p..p + 2]);
        }
        if n >= 10 {
            let p = n as usize * 2;
            i -= 2;
            out[i..i + 2].copy_from_slice(&PAIRS[p..p + 2]);
        } else {
            i -= 1;
            out[i] = b'0' + n as u8;
        }
        i
    }
    let mut tmp = [0u8; 20];
    let start = digits(ms, &mut tmp);
    let a = tmp.len() - start;
    buf[..a].copy_from_slice(&tmp[start..]);
    buf[a] = b'-';
    let start = digits(seq, &mut tmp);
    let b = tmp.len() - start;
    buf[a + 1..a + 1 + b].copy_from_slice(&tmp[start..]);
    &buf[..a + 1 + b]
}

/// The time of a stream id's milliseconds.
pub(crate) fn ms_time(ms: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// The time encoded in a stream id (`<ms>-<seq>`).
#[cfg(test)]
pub(crate) fn id_time(id: &str) -> Option<SystemTime> {
    ms_time(parse_id(id.as_bytes())?.0)
}

fn decode_error(what: String) -> Error {
    Error::new(
        ErrorKind::Unexpected,
        format!("unexpected reply from Redis: {what}"),
    )
}

/// Version byte of the q0 pub/sub frame.
pub(crate) const FRAME_V1: u8 = 1;

/// A q0 message as a command argument, encoded straight into the command's buffer:
/// `[1][u64 publish ms][u32 n]([u32 len][name][u32 len][value])*n[u8 has_key]([u32 len][key])?`
/// `[payload…]`, integers big-endian.
pub(crate) struct FrameArg<'a> {
    pub(crate) record: &'a Record<'a>,
    /// The publish time, ms since the epoch.
    pub(crate) time_ms: u64,
}

impl FrameArg<'_> {
    /// The encoded length.
    pub(crate) fn len(&self) -> usize {
        let r = self.record;
        1 + 8 + 4 + r.props.len() + 1 + r.key.map_or(0, |k| 4 + k.len()) + r.payload.len()
    }

    fn write(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let r = self.record;
        // the fixed head and (without properties) the key flag in one write
        let mut head = [0u8; 14];
        head[0] = FRAME_V1;
        head[1..9].copy_from_slice(&self.time_ms.to_be_bytes());
        head[9..13].copy_from_slice(&(r.count as u32).to_be_bytes());
        if r.count > 0 {
            w.write_all(&head[..13])?;
            for (k, v) in r.properties() {
                w.write_all(&(k.len() as u32).to_be_bytes())?;
                w.write_all(k)?;
                w.write_all(&(v.len() as u32).to_be_bytes())?;
                w.write_all(v)?;
            }
            w.write_all(&[u8::from(r.key.is_some())])?;
        } else {
            head[13] = u8::from(r.key.is_some());
            w.write_all(&head)?;
        }
        if let Some(k) = r.key {
            w.write_all(&(k.len() as u32).to_be_bytes())?;
            w.write_all(k)?;
        }
        w.write_all(r.payload)
    }
}

/// Milliseconds since the epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl redis::ToRedisArgs for FrameArg<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut w = out.writer_for_next_arg();
        // writing into the command's own buffer cannot fail
        let _ = self.write(&mut w);
    }
}

/// Encodes a q0 frame into a buffer.
#[cfg(test)]
pub(crate) fn encode_frame(payload: &Bytes, properties: &Properties, key: Option<&str>) -> Bytes {
    let mut rec = Vec::new();
    encode_record(&mut rec, payload, properties, key);
    let record = Record::decode(&mut &rec[..]).expect("a record just encoded");
    let frame = FrameArg {
        record: &record,
        time_ms: now_ms(),
    };
    let mut buf = Vec::with_capacity(frame.len());
    let _ = frame.write(&mut buf);
    assert_eq!(buf.len(), frame.len());
    Bytes::from(buf)
}

/// A decoded q0 frame.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) payload: Bytes,
    pub(crate) properties: Properties,
    pub(crate) key: Option<String>,
    pub(crate) time: SystemTime,
}

/// Decodes a q0 frame; `None` when it is not one of ours.
pub(crate) fn decode_frame(mut buf: Bytes) -> Option<Frame> {
    fn string(buf: &mut Bytes) -> Option<String> {
        if buf.remaining() < 4 {
            return None;
        }
        let len = buf.get_u32() as usize;
        if buf.remaining() < len {
            return None;
        }
        String::from_utf8(buf.split_to(len).to_vec()).ok()
    }
    if buf.remaining() < 1 + 8 + 4 || buf.get_u8() != FRAME_V1 {
        return None;
    }
    let time = UNIX_EPOCH.checked_add(Duration::from_millis(buf.get_u64()))?;
    let n = buf.get_u32() as usize;
    let mut properties = Properties::new();
    for _ in 0..n {
        let k = string(&mut buf)?;
        let v = string(&mut buf)?;
        properties.insert(k, v);
    }
    if buf.remaining() < 1 {
        return None;
    }
    let key = match buf.get_u8() {
        0 => None,
        1 => Some(string(&mut buf)?),
        _ => return None,
    };
    Some(Frame {
        payload: buf,
        properties,
        key,
        time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unambiguous() {
        let t: Topic = "q1/tg/flow/text-completion:ws1:default".parse().unwrap();
        let k = TopicKeys::new("tgps", &t);
        assert_eq!(k.main, "tgps/{q1/tg/flow/text-completion:ws1:default}");
        assert_eq!(
            k.retry("graph:rag"),
            "tgps/{q1/tg/flow/text-completion:ws1:default}/retry/graph:rag"
        );
        assert_eq!(
            k.lease("s"),
            "tgps/{q1/tg/flow/text-completion:ws1:default}/lease/s"
        );
        assert_eq!(
            k.dedup("x/y"),
            "tgps/{q1/tg/flow/text-completion:ws1:default}/dedup/x/y"
        );
        // a queue with ':' cannot collide with another tenant/namespace split
        let a = TopicKeys::new("p", &"q1/a/b/c:d".parse().unwrap());
        let b = TopicKeys::new("p", &"q1/a/b/c".parse().unwrap());
        assert_ne!(a.main, b.main);
        let q0 = TopicKeys::new("tgps", &t.with_qos(tg_backend_api::Qos::Q0));
        assert_eq!(q0.main, "tgps/{q0/tg/flow/text-completion:ws1:default}");
    }

    #[test]
    fn frame_round_trip() {
        let mut props = Properties::new();
        props.insert("id".into(), "42".into());
        props.insert("empty".into(), String::new());
        let payload = Bytes::from_static("héllo".as_bytes());
        let f = decode_frame(encode_frame(&payload, &props, Some("k1"))).unwrap();
        assert_eq!(
            (f.payload, f.properties, f.key.as_deref()),
            (payload.clone(), props, Some("k1"))
        );
        let f = decode_frame(encode_frame(&payload, &Properties::new(), None)).unwrap();
        assert!(f.key.is_none() && f.properties.is_empty());
        assert!(decode_frame(Bytes::from_static(b"plain text from redis-cli")).is_none());
        assert!(decode_frame(Bytes::new()).is_none());
    }

    #[test]
    fn entry_decoding() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let e = decode_entry(Value::Array(vec![
            b("d"),
            b("body"),
            b("p:id"),
            b("7"),
            b("r"),
            b("2"),
            b("o"),
            b("1-0"),
            b("k"),
            b("key"),
            b("future-field"),
            b("x"),
        ]))
        .unwrap();
        assert_eq!(e.payload.as_ref(), b"body");
        assert_eq!(e.properties.get("id").map(String::as_str), Some("7"));
        assert_eq!(
            (e.redeliveries, e.original.as_deref(), e.key.as_deref()),
            (2, Some("1-0"), Some("key"))
        );
        assert_eq!(
            id_time("1700000000000-3"),
            UNIX_EPOCH.checked_add(Duration::from_millis(1_700_000_000_000))
        );
    }

    #[test]
    fn records_round_trip() {
        let mut props = Properties::new();
        props.insert("id".into(), "42".into());
        props.insert("empty".into(), String::new());
        let mut buf = Vec::new();
        encode_record(&mut buf, b"payload", &props, Some("k1"));
        encode_record(&mut buf, b"", &Properties::new(), None);
        encode_record(&mut buf, b"x", &Properties::new(), Some(""));
        let mut rest = &buf[..];
        let a = Record::decode(&mut rest).unwrap();
        assert_eq!((a.payload, a.key), (&b"payload"[..], Some(&b"k1"[..])));
        let got: Vec<_> = a.properties().collect();
        assert_eq!(
            got,
            vec![(&b"empty"[..], &b""[..]), (&b"id"[..], &b"42"[..])]
        );
        assert_eq!(a.property("id"), Some(&b"42"[..]));
        assert_eq!(a.property_count(), 2);
        let b = Record::decode(&mut rest).unwrap();
        assert_eq!((b.payload, b.key, b.property_count()), (&b""[..], None, 0));
        let c = Record::decode(&mut rest).unwrap();
        assert_eq!((c.payload, c.key), (&b"x"[..], Some(&b""[..])));
        assert!(rest.is_empty() && Record::decode(&mut rest).is_none());
        assert!(Record::decode(&mut &buf[..5]).is_none());
    }

    #[test]
    fn stream_ids() {
        assert_eq!(parse_id(b"1700000000000-3"), Some((1_700_000_000_000, 3)));
        assert_eq!(parse_id(b"0-0"), Some((0, 0)));
        assert_eq!(
            parse_id(b"18446744073709551615-18446744073709551615"),
            Some((u64::MAX, u64::MAX))
        );
        for bad in [
            &b""[..],
            b"12",
            b"-1",
            b"1-",
            b"1-x",
            b"+1-2",
            b"18446744073709551616-0",
        ] {
            assert_eq!(parse_id(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        let mut buf: IdBuf = [0; 41];
        for (ms, seq) in [
            (0, 0),
            (1_700_000_000_000, 3),
            (u64::MAX, u64::MAX),
            (9, 10),
        ] {
            assert_eq!(
                format_id(ms, seq, &mut buf),
                format!("{ms}-{seq}").as_bytes()
            );
        }
    }
}
