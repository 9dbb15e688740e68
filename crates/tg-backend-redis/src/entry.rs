//! Stream entries: how a q1/q2 message is laid out as the fields of one entry, how an entry read
//! back is checked and decoded, and stream entry ids (see docs/redis.md, "Message layout").
//!
//! Fields: `d` payload, `k` key (when set), `p:<name>` one per property, and on redelivered copies
//! `r` (deliveries so far) and `o` (id of the original entry). What a consumer reads is input like
//! any other: anyone can `XADD` to a stream, so [`decode_entry`] checks every field it knows.
//! A field of the message itself that does not read (no `d`; `k`, a property name or value that
//! is not UTF-8) makes the entry no message ([`Malformed`], naming the field). The redelivery
//! bookkeeping `r` and `o` only this backend writes: one that does not read is set aside as
//! absent, with a note ([`Entry::ignored`]), and the message is still delivered — its payload,
//! key and properties are intact. Of a field given twice the last value counts (the rule for
//! repeated property names of every backend, `tg_backend_api::kit::properties_from_pairs`),
//! noted too. Unknown fields are ignored, so later layouts can add fields.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis::Value;
use tg_backend_api::kit::properties_from_pairs;
use tg_backend_api::Properties;

use crate::record::Record;

/// Stream entry field names.
pub mod field {
    /// The payload.
    pub const PAYLOAD: &[u8] = b"d";
    /// The key, when set.
    pub const KEY: &[u8] = b"k";
    /// How many times the entry was delivered before (retry copies only).
    pub const REDELIVERIES: &[u8] = b"r";
    /// The id of the original entry (retry copies only).
    pub const ORIGINAL: &[u8] = b"o";
    /// Prefix of property fields: `p:<name>`.
    pub const PROPERTY: &[u8] = b"p:";
}

/// Appends the fields of a message to an `XADD` (or script) command.
pub fn push_fields(cmd: &mut redis::Cmd, record: &Record<'_>) {
    cmd.arg(field::PAYLOAD).arg(record.payload);
    if let Some(key) = record.key {
        cmd.arg(field::KEY).arg(key);
    }
    if record.property_count() == 0 {
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
pub struct Entry {
    /// `d`.
    pub payload: Bytes,
    /// The `p:<name>` fields.
    pub properties: Properties,
    /// `k`.
    pub key: Option<String>,
    /// `r`, 0 when absent or unreadable.
    pub redeliveries: u32,
    /// The original entry's id (`o`) and its milliseconds, on a redelivered copy.
    pub original: Option<(Arc<str>, u64)>,
    /// What the consumer warns about but delivers: an `r` that is no count or an `o` that is no
    /// entry id (read as absent: no redeliveries, the entry's own id), a `d`, `k`, `r` or `o`
    /// given more than once (the last value counts). Empty (no allocation) for an entry of
    /// this backend.
    pub ignored: Vec<Malformed>,
    /// The property names the entry repeats, sorted, each once; the last value of each counts.
    pub repeated: Vec<String>,
}

/// What is wrong with a field of an entry: why the entry cannot be decoded (from
/// [`decode_entry`]), or why a field was set aside ([`Entry::ignored`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// The field's name (lossy UTF-8), or a description where the entry has no fields to name.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl Malformed {
    fn new(field: &[u8], problem: impl Into<String>) -> Self {
        Self {
            field: String::from_utf8_lossy(field).into_owned(),
            problem: problem.into(),
        }
    }

    /// `problem` about the value `value` of `field`, which is shown shortened.
    fn value(field: &[u8], value: &[u8], problem: &str) -> Self {
        Self::new(field, format!("{:?} {problem}", preview(value)))
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field {:?}: {}", self.field, self.problem)
    }
}

/// A value as a warning shows it: lossy UTF-8, at most 40 bytes.
fn preview(value: &[u8]) -> String {
    const MAX: usize = 40;
    if value.len() <= MAX {
        String::from_utf8_lossy(value).into_owned()
    } else {
        format!("{}…", String::from_utf8_lossy(&value[..MAX]))
    }
}

/// The bytes of a string reply, borrowed.
pub fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// The streams of an `XREADGROUP` reply: `[[stream, entries], …]`, or a map of streams under
/// RESP3; `None` for any other reply. Malformed stream items are skipped.
pub fn reply_streams(reply: Value) -> Option<Vec<(Value, Value)>> {
    match reply {
        Value::Array(items) => Some(
            items
                .into_iter()
                .filter_map(|s| match s {
                    Value::Array(kv) if kv.len() == 2 => {
                        let mut it = kv.into_iter();
                        Some((it.next()?, it.next()?))
                    }
                    _ => None,
                })
                .collect(),
        ),
        Value::Map(pairs) => Some(pairs),
        _ => None,
    }
}

/// Decodes and checks the field list of an entry (`[f1, v1, f2, v2, …]`, or a map under RESP3).
pub fn decode_entry(fields: Value) -> Result<Entry, Malformed> {
    let mut entry = Entry {
        payload: Bytes::new(),
        properties: Properties::new(),
        key: None,
        redeliveries: 0,
        original: None,
        ignored: Vec::new(),
        repeated: Vec::new(),
    };
    let mut seen = Seen::default();
    let mut props = Vec::new();
    match fields {
        Value::Array(items) => {
            if items.len() % 2 != 0 {
                return Err(Malformed::new(
                    b"(fields)",
                    "a field without a value (odd number of items)",
                ));
            }
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                entry.field(&k, v, &mut seen, &mut props)?;
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                entry.field(&k, v, &mut seen, &mut props)?;
            }
        }
        other => {
            return Err(Malformed::new(
                b"(fields)",
                format!("the entry has no field list but {other:?}"),
            ))
        }
    }
    if seen.0 & Seen::PAYLOAD == 0 {
        return Err(Malformed::new(field::PAYLOAD, "missing (no payload)"));
    }
    if !props.is_empty() {
        // a repeated name: the last value wins, the rule of every backend
        (entry.properties, entry.repeated) = properties_from_pairs(props);
    }
    Ok(entry)
}

/// The reserved fields an entry gave so far (a bit each).
#[derive(Default)]
struct Seen(u8);

impl Seen {
    const PAYLOAD: u8 = 1;
    const KEY: u8 = 2;
    const REDELIVERIES: u8 = 4;
    const ORIGINAL: u8 = 8;

    /// Marks `bit`; whether it was marked before.
    fn again(&mut self, bit: u8) -> bool {
        let before = self.0 & bit != 0;
        self.0 |= bit;
        before
    }
}

impl Entry {
    /// Reads one field; properties are collected into `props`, in order.
    fn field(
        &mut self,
        k: &Value,
        v: Value,
        seen: &mut Seen,
        props: &mut Vec<(String, String)>,
    ) -> Result<(), Malformed> {
        let Some(name) = as_bytes(k) else {
            return Err(Malformed::new(
                b"(name)",
                format!("a field name that is not a string: {k:?}"),
            ));
        };
        let known = name == field::PAYLOAD
            || name == field::KEY
            || name == field::REDELIVERIES
            || name == field::ORIGINAL
            || name.starts_with(field::PROPERTY);
        if !known {
            return Ok(()); // a later layout's field
        }
        let Some(value) = into_bytes(v) else {
            return Err(Malformed::new(name, "the value is not a string"));
        };
        let bit = match name {
            field::PAYLOAD => Seen::PAYLOAD,
            field::KEY => Seen::KEY,
            field::REDELIVERIES => Seen::REDELIVERIES,
            field::ORIGINAL => Seen::ORIGINAL,
            _ => 0,
        };
        if bit != 0 && seen.again(bit) {
            self.ignored.push(Malformed::new(
                name,
                "is given more than once; the last value counts",
            ));
        }
        match name {
            field::PAYLOAD => self.payload = Bytes::from(value),
            field::KEY => {
                self.key = Some(
                    String::from_utf8(value)
                        .map_err(|e| Malformed::value(name, e.as_bytes(), "is not UTF-8"))?,
                );
            }
            field::REDELIVERIES => match parse_u64(&value).and_then(|n| u32::try_from(n).ok()) {
                Some(n) => self.redeliveries = n,
                None => {
                    self.redeliveries = 0;
                    self.ignored.push(Malformed::value(
                        name,
                        &value,
                        "is not a delivery count (0 to 4294967295); read as no redelivery",
                    ));
                }
            },
            field::ORIGINAL => match parse_id(&value) {
                Some((ms, _)) => {
                    // digits and one dash: UTF-8
                    let text = String::from_utf8_lossy(&value);
                    self.original = Some((text.as_ref().into(), ms));
                }
                None => {
                    self.original = None;
                    self.ignored.push(Malformed::value(
                        name,
                        &value,
                        "is not a stream entry id (<ms>-<seq>); the entry's own id is the \
                         message id",
                    ));
                }
            },
            _ => {
                let prop = std::str::from_utf8(&name[field::PROPERTY.len()..])
                    .map_err(|_| Malformed::new(name, "the property name is not UTF-8"))?
                    .to_owned();
                let value = String::from_utf8(value)
                    .map_err(|e| Malformed::value(name, e.as_bytes(), "is not UTF-8"))?;
                props.push((prop, value));
            }
        }
        Ok(())
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
pub fn parse_id(id: &[u8]) -> Option<(u64, u64)> {
    let dash = id.iter().position(|&c| c == b'-')?;
    Some((parse_u64(&id[..dash])?, parse_u64(&id[dash + 1..])?))
}

/// Room for `<u64>-<u64>`.
pub type IdBuf = [u8; 41];

/// Writes the stream id `<ms>-<seq>` into `buf` and returns it (no allocation, no formatter).
pub fn format_id(ms: u64, seq: u64, buf: &mut IdBuf) -> &[u8] {
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
pub fn ms_time(ms: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A stream entry id: packed into numbers when it is `<ms>-<seq>` (always, from Redis; no
/// allocation), else kept as text.
#[derive(Debug, Clone)]
pub enum EntryId {
    /// `<ms>-<seq>`.
    Packed {
        /// The milliseconds part.
        ms: u64,
        /// The sequence part.
        seq: u64,
    },
    /// Any other id, as text.
    Text(Arc<str>),
}

impl EntryId {
    /// The id the server gave, packed when it is `<ms>-<seq>`.
    pub fn from_bytes(id: &[u8]) -> Self {
        match parse_id(id) {
            Some((ms, seq)) => Self::Packed { ms, seq },
            None => Self::Text(String::from_utf8_lossy(id).into()),
        }
    }
}

impl redis::ToRedisArgs for EntryId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        match self {
            Self::Packed { ms, seq } => out.write_arg(format_id(*ms, *seq, &mut [0; 41])),
            Self::Text(t) => out.write_arg(t.as_bytes()),
        }
    }
}

/// Writes entry ids as command arguments, reusing the digits of the last `ms` (the ids of one
/// batch mostly share it).
#[derive(Default)]
pub struct IdFormatter {
    ms: Option<u64>,
    /// `<ms>-` of the last id, then room for the sequence number.
    buf: Vec<u8>,
    prefix: usize,
}

impl IdFormatter {
    /// Appends `ids` to `cmd`, one argument each.
    pub fn push_all(&mut self, cmd: &mut redis::Cmd, ids: &[EntryId]) {
        for id in ids {
            match id {
                EntryId::Packed { ms, seq } => {
                    if self.ms != Some(*ms) {
                        let mut full = [0u8; 41];
                        let text = format_id(*ms, 0, &mut full);
                        self.prefix = text.len() - 1;
                        self.buf.clear();
                        self.buf.extend_from_slice(&text[..self.prefix]);
                        self.ms = Some(*ms);
                    }
                    self.buf.truncate(self.prefix);
                    let mut tail = [0u8; 41];
                    let text = format_id(0, *seq, &mut tail);
                    self.buf.extend_from_slice(&text[2..]);
                    cmd.arg(&self.buf[..]);
                }
                EntryId::Text(t) => {
                    cmd.arg(t.as_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn entry_decoding() {
        let e = decode_entry(Value::Array(vec![
            b("d"),
            b("body"),
            b("p:id"),
            b("7"),
            b("r"),
            b("2"),
            b("o"),
            b("1700000000000-0"),
            b("k"),
            b("key"),
            b("future-field"),
            b("x"),
        ]))
        .unwrap();
        assert_eq!(e.payload.as_ref(), b"body");
        assert_eq!(e.properties.get("id").map(String::as_str), Some("7"));
        assert_eq!((e.redeliveries, e.key.as_deref()), (2, Some("key")));
        let (original, ms) = e.original.unwrap();
        assert_eq!(
            (original.as_ref(), ms),
            ("1700000000000-0", 1_700_000_000_000)
        );
        assert_eq!(
            ms_time(ms),
            UNIX_EPOCH.checked_add(Duration::from_millis(1_700_000_000_000))
        );
        // RESP3 map, empty payload
        let e = decode_entry(Value::Map(vec![(b("d"), b(""))])).unwrap();
        assert!(e.payload.is_empty() && e.original.is_none() && e.redeliveries == 0);
    }

    /// An `r` that is no count and an `o` that is no entry id are set aside with a note naming
    /// the field and the value; the message itself still decodes.
    #[test]
    fn unreadable_redelivery_fields_are_set_aside() {
        let ok = |fields: Vec<Value>| decode_entry(Value::Array(fields)).unwrap();
        let e = ok(vec![
            b("d"),
            b("x"),
            b("o"),
            b("garbage-id"),
            b("r"),
            b("3"),
        ]);
        assert_eq!((e.payload.as_ref(), e.redeliveries), (&b"x"[..], 3));
        assert!(e.original.is_none());
        assert_eq!(e.ignored.len(), 1);
        assert_eq!(e.ignored[0].field, "o");
        assert!(
            e.ignored[0].to_string().contains("\"garbage-id\""),
            "{}",
            e.ignored[0]
        );
        let e = ok(vec![b("d"), b("x"), b("r"), b("lots"), b("o"), b("5-1")]);
        assert_eq!(e.redeliveries, 0);
        assert_eq!(
            e.original.as_ref().map(|(id, ms)| (id.as_ref(), *ms)),
            Some(("5-1", 5))
        );
        assert_eq!(e.ignored.len(), 1);
        assert_eq!(e.ignored[0].field, "r");
        assert!(
            e.ignored[0].to_string().contains("\"lots\""),
            "{}",
            e.ignored[0]
        );
        for r in ["", "-1", "+1", "4294967296", "1.0", " 1", "0x10"] {
            let e = ok(vec![b("d"), b("x"), b("r"), b(r)]);
            assert_eq!((e.redeliveries, e.ignored.len()), (0, 1), "{r:?}");
        }
        for o in ["", "12", "1-", "-1", "1-x", "18446744073709551616-0"] {
            let e = ok(vec![b("d"), b("x"), b("o"), b(o)]);
            assert!(e.original.is_none() && e.ignored.len() == 1, "{o:?}");
        }
        // a good value, then a bad one: the last counts, and both facts are noted
        let e = ok(vec![b("d"), b("x"), b("r"), b("2"), b("r"), b("two")]);
        assert_eq!(e.redeliveries, 0);
        assert_eq!(e.ignored.iter().filter(|m| m.field == "r").count(), 2);
    }

    /// Of a field given twice the last value counts: a property name (the rule of every
    /// backend, reported as `repeated`) or a reserved field (noted in `ignored`).
    #[test]
    fn repeated_fields_keep_the_last_value() {
        let e = decode_entry(Value::Array(vec![
            b("p:a"),
            b("1"),
            b("d"),
            b("first"),
            b("p:b"),
            b("x"),
            b("p:a"),
            b("2"),
            b("d"),
            b("second"),
            b("p:a"),
            b("3"),
        ]))
        .unwrap();
        assert_eq!(e.payload.as_ref(), b"second");
        assert_eq!(e.properties.len(), 2);
        assert_eq!(e.properties["a"], "3");
        assert_eq!(e.properties["b"], "x");
        assert_eq!(e.repeated, ["a"]);
        assert_eq!(e.ignored.len(), 1);
        assert_eq!(e.ignored[0].field, "d");
        // nothing repeated, nothing noted
        let e = decode_entry(Value::Array(vec![b("d"), b("x"), b("p:a"), b("1")])).unwrap();
        assert!(e.repeated.is_empty() && e.ignored.is_empty());
    }

    #[test]
    fn malformed_fields_are_named() {
        let bad = |fields: Vec<Value>| decode_entry(Value::Array(fields)).unwrap_err();
        assert_eq!(bad(vec![b("k"), b("x")]).field, "d");
        assert_eq!(
            bad(vec![
                b("d"),
                b("x"),
                Value::BulkString(b"k".to_vec()),
                Value::BulkString(vec![0xff])
            ])
            .field,
            "k"
        );
        assert_eq!(
            bad(vec![
                b("d"),
                b("x"),
                b("p:a"),
                Value::BulkString(vec![0xc3])
            ])
            .field,
            "p:a"
        );
        assert_eq!(bad(vec![b("d"), Value::Int(3)]).field, "d");
        assert_eq!(bad(vec![b("d"), b("x"), b("o")]).field, "(fields)");
        assert_eq!(bad(vec![Value::Int(1), b("x")]).field, "(name)");
        assert_eq!(decode_entry(Value::Nil).unwrap_err().field, "(fields)");
        let long = "9".repeat(100);
        let e = decode_entry(Value::Array(vec![b("d"), b("x"), b("o"), b(&long)])).unwrap();
        assert!(e.ignored[0].problem.len() < 150, "{}", e.ignored[0]);
        assert!(!e.ignored[0].problem.contains(&long), "{}", e.ignored[0]);
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

    #[test]
    fn ids_as_arguments() {
        let ids = [
            EntryId::from_bytes(b"1700000000000-3"),
            EntryId::from_bytes(b"1700000000000-12"),
            EntryId::from_bytes(b"1700000000001-0"),
            EntryId::from_bytes(b"odd"),
        ];
        let mut cmd = redis::cmd("XACK");
        IdFormatter::default().push_all(&mut cmd, &ids);
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .skip(1)
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                redis::Arg::Cursor => Vec::new(),
            })
            .collect();
        assert_eq!(
            args,
            [
                &b"1700000000000-3"[..],
                b"1700000000000-12",
                b"1700000000001-0",
                b"odd"
            ]
        );
    }
}
