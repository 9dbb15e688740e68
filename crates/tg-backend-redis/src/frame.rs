//! The q0 frame: how a q0 message travels as one `PUBLISH` payload (see docs/redis.md, "Message
//! layout").
//!
//! Version 1, integers big-endian: `[1][u64 publish ms][u32 n]([u32 len][name][u32 len][value])*n`
//! `[u8 has_key]([u32 len][key])?[payload…]`. Channel messages that are not such frames (from
//! `redis-cli PUBLISH`, say) decode to `None` and are ignored.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use tg_backend_api::kit::properties_from_pairs;
use tg_backend_api::Properties;

use crate::record::Record;

/// Version byte of the q0 pub/sub frame.
pub const FRAME_V1: u8 = 1;

/// A q0 message as a command argument, encoded straight into the command's buffer.
pub struct FrameArg<'a> {
    /// The message.
    pub record: &'a Record<'a>,
    /// The publish time, ms since the epoch.
    pub time_ms: u64,
}

impl FrameArg<'_> {
    /// The encoded length.
    pub(crate) fn len(&self) -> usize {
        let r = self.record;
        1 + 8 + 4 + r.properties_len() + 1 + r.key.map_or(0, |k| 4 + k.len()) + r.payload.len()
    }

    fn write(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let r = self.record;
        let count = r.property_count();
        // the fixed head and (without properties) the key flag in one write
        let mut head = [0u8; 14];
        head[0] = FRAME_V1;
        head[1..9].copy_from_slice(&self.time_ms.to_be_bytes());
        head[9..13].copy_from_slice(&(count as u32).to_be_bytes());
        if count > 0 {
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

impl redis::ToRedisArgs for FrameArg<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut w = out.writer_for_next_arg();
        // writing into the command's own buffer cannot fail
        let _ = self.write(&mut w);
    }
}

/// Milliseconds since the epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A decoded q0 frame.
#[derive(Debug)]
pub struct Frame {
    /// The payload.
    pub payload: Bytes,
    /// The properties.
    pub properties: Properties,
    /// The key.
    pub key: Option<String>,
    /// The publish time.
    pub time: SystemTime,
    /// Property names the frame repeats (a frame written by another client), sorted, each
    /// once; the last value of each counts.
    pub repeated: Vec<String>,
}

/// Decodes a q0 frame; `None` when it is not one of ours.
pub fn decode_frame(mut buf: Bytes) -> Option<Frame> {
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
    let (properties, repeated) = if n == 0 {
        (Properties::new(), Vec::new())
    } else {
        // (at most what the rest of the frame can hold: a property takes 8 bytes or more)
        let mut pairs = Vec::with_capacity(n.min(buf.remaining() / 8));
        for _ in 0..n {
            let k = string(&mut buf)?;
            let v = string(&mut buf)?;
            pairs.push((k, v));
        }
        // a repeated name: the last value wins, the rule of every backend
        properties_from_pairs(pairs)
    };
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
        repeated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::encode_record;

    /// Encodes a q0 frame into a buffer, the way the producer writes it into a command.
    fn encode_frame(payload: &Bytes, properties: &Properties, key: Option<&str>) -> Bytes {
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
        assert!(f.repeated.is_empty());
        assert!(decode_frame(Bytes::from_static(b"plain text from redis-cli")).is_none());
        assert!(decode_frame(Bytes::new()).is_none());
    }

    /// A frame written by another client may repeat a property name: the last value counts
    /// and the name is reported.
    #[test]
    fn repeated_property_names_keep_the_last_value() {
        let mut frame = vec![FRAME_V1];
        frame.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
        frame.extend_from_slice(&3u32.to_be_bytes());
        for (k, v) in [("a", "1"), ("b", "x"), ("a", "2")] {
            frame.extend_from_slice(&(k.len() as u32).to_be_bytes());
            frame.extend_from_slice(k.as_bytes());
            frame.extend_from_slice(&(v.len() as u32).to_be_bytes());
            frame.extend_from_slice(v.as_bytes());
        }
        frame.push(0);
        frame.extend_from_slice(b"body");
        let f = decode_frame(Bytes::from(frame)).unwrap();
        assert_eq!(f.payload.as_ref(), b"body");
        assert_eq!(f.properties.len(), 2);
        assert_eq!(
            (f.properties["a"].as_str(), f.properties["b"].as_str()),
            ("2", "x")
        );
        assert_eq!(f.repeated, ["a"]);
    }
}
