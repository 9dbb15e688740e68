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

/// Appends the fields of a message to an `XADD` (or script) command.
pub(crate) fn push_fields(
    cmd: &mut redis::Cmd,
    payload: &Bytes,
    properties: &Properties,
    key: Option<&str>,
) {
    cmd.arg(field::PAYLOAD).arg(payload.as_ref());
    if let Some(key) = key {
        cmd.arg(field::KEY).arg(key);
    }
    let mut name = Vec::with_capacity(32);
    for (k, v) in properties {
        name.clear();
        name.extend_from_slice(field::PROPERTY);
        name.extend_from_slice(k.as_bytes());
        cmd.arg(&name[..]).arg(v.as_str());
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
                entry.field(k, v);
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                entry.field(k, v);
            }
        }
        other => return Err(decode_error(format!("stream entry fields are {other:?}"))),
    }
    Ok(entry)
}

impl Entry {
    fn field(&mut self, k: Value, v: Value) {
        let Some(k) = into_bytes(k) else { return };
        match &k[..] {
            field::PAYLOAD => self.payload = into_bytes(v).map(Bytes::from).unwrap_or_default(),
            field::KEY => self.key = into_string(v),
            field::REDELIVERIES => {
                self.redeliveries = into_string(v).and_then(|s| s.parse().ok()).unwrap_or(0)
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

/// The time encoded in a stream id (`<ms>-<seq>`).
pub(crate) fn id_time(id: &str) -> Option<SystemTime> {
    let ms: u64 = id.split('-').next()?.parse().ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
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
    pub(crate) payload: &'a [u8],
    pub(crate) properties: &'a Properties,
    pub(crate) key: Option<&'a str>,
}

impl FrameArg<'_> {
    /// The encoded length.
    pub(crate) fn len(&self) -> usize {
        let props: usize = self
            .properties
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum();
        1 + 8 + 4 + props + 1 + self.key.map_or(0, |k| 4 + k.len()) + self.payload.len()
    }

    fn write(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut head = [0u8; 13];
        head[0] = FRAME_V1;
        head[1..9].copy_from_slice(&now.to_be_bytes());
        head[9..13].copy_from_slice(&(self.properties.len() as u32).to_be_bytes());
        w.write_all(&head)?;
        for (k, v) in self.properties {
            w.write_all(&(k.len() as u32).to_be_bytes())?;
            w.write_all(k.as_bytes())?;
            w.write_all(&(v.len() as u32).to_be_bytes())?;
            w.write_all(v.as_bytes())?;
        }
        match self.key {
            Some(k) => {
                w.write_all(&[1])?;
                w.write_all(&(k.len() as u32).to_be_bytes())?;
                w.write_all(k.as_bytes())?;
            }
            None => w.write_all(&[0])?,
        }
        w.write_all(self.payload)
    }
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
    let frame = FrameArg {
        payload,
        properties,
        key,
    };
    let mut buf = Vec::with_capacity(frame.len());
    let _ = frame.write(&mut buf);
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
}
