//! What the Redis backend reads from the server, from RESP bytes: an `XREADGROUP` reply
//! (`[[stream, [[id, fields], …]], …]`, or a RESP3 map of streams), each entry's id and fields
//! as the consumer decodes them, and q0 pub/sub frames. Whatever the bytes:
//! - decoding never panics;
//! - an entry decodes exactly as the layout of docs/redis.md says (checked against a model
//!   written here: the last value of a repeated field or property name counts; no `d`, a key or
//!   property that is not UTF-8 or a value that is not a string makes it no message; an `r` that
//!   is no count and an `o` that is no `<ms>-<seq>` id are set aside as absent, with a note);
//! - the message of an entry written again as `XADD` fields decodes to the same message, with
//!   nothing to note; a decoded q0 frame encoded again decodes to the same message;
//! - an entry id the reader got goes back to the server (`XACK`) as the same id, through the
//!   message's ack handle too.
#![no_main]

use std::collections::BTreeMap;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tg_backend_api::Properties;
use tg_backend_redis::fuzzing::redis::{self, ToRedisArgs, Value};
use tg_backend_redis::fuzzing::{
    as_bytes, decode_entry, decode_frame, encode_record, format_id, parse_id, push_fields,
    reply_streams, EntryId, EntryRef, FrameArg, IdFormatter, Record,
};

fuzz_target!(|data: &[u8]| {
    frame(data);
    if let Ok(reply) = redis::parse_redis_value(data) {
        xreadgroup_reply(reply);
    }
});

/// Walks a reply the way the consumer's reader does, checking every entry in it. The reply as
/// a whole may also be one entry's field list (what `decode_entry` gets).
fn xreadgroup_reply(reply: Value) {
    entry(&[], reply.clone());
    let Some(streams) = reply_streams(reply) else {
        return;
    };
    let mut ids = Vec::new();
    for (key, entries) in streams {
        let retry = as_bytes(&key).is_some_and(|k| k.ends_with(b":retry"));
        let Value::Array(entries) = entries else {
            continue;
        };
        for e in entries {
            let Value::Array(parts) = e else { continue };
            let mut it = parts.into_iter();
            let (Some(id), Some(fields)) = (it.next(), it.next()) else {
                continue;
            };
            let Some(id) = as_bytes(&id) else { continue };
            entry_id(retry, id);
            ids.push(EntryId::from_bytes(id));
            entry(id, fields);
        }
    }
    // the ids of one batch written as `XACK` arguments, one at a time or all at once
    let mut cmd = redis::cmd("XACK");
    IdFormatter::default().push_all(&mut cmd, &ids);
    let batch = arguments(&cmd);
    let single: Vec<Vec<u8>> = ids.iter().map(|id| one_arg(id)).collect();
    assert_eq!(batch, single, "a batch of ids formats as each id alone");
}

/// A command's arguments after its name.
fn arguments(cmd: &redis::Cmd) -> Vec<Vec<u8>> {
    cmd.args_iter()
        .skip(1)
        .map(|a| match a {
            redis::Arg::Simple(b) => b.to_vec(),
            redis::Arg::Cursor => Vec::new(),
        })
        .collect()
}

fn one_arg(v: &impl ToRedisArgs) -> Vec<u8> {
    let mut args = v.to_redis_args();
    assert_eq!(args.len(), 1, "one argument");
    args.pop().unwrap()
}

/// An entry id as read, as acknowledged, and through the ack handle of its message.
fn entry_id(retry: bool, id: &[u8]) {
    let parsed = parse_id(id);
    let entry = EntryId::from_bytes(id);
    let arg = one_arg(&entry);
    match (&entry, parsed) {
        (EntryId::Packed { ms, seq }, Some((m, s))) => {
            assert_eq!((*ms, *seq), (m, s));
            // the canonical text (what Redis sends) comes back as it was
            assert_eq!(arg, format!("{m}-{s}").as_bytes());
            assert_eq!(parse_id(&arg), Some((m, s)));
            let mut buf = [0; 41];
            assert_eq!(format_id(m, s, &mut buf), &arg[..]);
        }
        (EntryId::Text(t), None) => {
            assert_eq!(t.as_ref(), String::from_utf8_lossy(id));
            assert_eq!(arg, t.as_bytes());
        }
        (e, p) => panic!("{e:?} from an id that parses as {p:?}"),
    }
    let handle = EntryRef { retry, id: entry }.handle(7);
    assert_eq!(handle.consumer(), 7);
    let back = EntryRef::from_handle(&handle).expect("an ack handle carries its entry");
    assert_eq!(back.retry, retry);
    assert_eq!(
        one_arg(&back.id),
        arg,
        "the handle acknowledges the id read"
    );
}

/// What `decode_entry` must make of a field list, written from docs/redis.md.
#[derive(Debug, PartialEq)]
struct Expected {
    payload: Vec<u8>,
    properties: Properties,
    key: Option<String>,
    redeliveries: u32,
    original: Option<(String, u64)>,
    repeated: Vec<String>,
    /// Names of the reserved fields that were noted (given twice, or `r`/`o` unreadable).
    noted: BTreeMap<String, usize>,
}

/// A decimal number of digits only (no sign, no spaces), of at most 20 digits.
fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn model(fields: &Value) -> Option<Expected> {
    let pairs: Vec<(&Value, &Value)> = match fields {
        Value::Array(items) if items.len() % 2 == 0 => {
            items.chunks(2).map(|p| (&p[0], &p[1])).collect()
        }
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        _ => return None,
    };
    let mut e = Expected {
        payload: Vec::new(),
        properties: Properties::new(),
        key: None,
        redeliveries: 0,
        original: None,
        repeated: Vec::new(),
        noted: BTreeMap::new(),
    };
    let mut seen = BTreeMap::new();
    let mut has_payload = false;
    for (k, v) in pairs {
        let name = as_bytes(k)?;
        let reserved = matches!(name, b"d" | b"k" | b"r" | b"o");
        if !reserved && !name.starts_with(b"p:") {
            continue;
        }
        let value = as_bytes(v)?;
        let field = String::from_utf8_lossy(name).into_owned();
        if reserved
            && *seen
                .entry(field.clone())
                .and_modify(|n| *n += 1)
                .or_insert(0)
                > 0
        {
            *e.noted.entry(field.clone()).or_default() += 1;
        }
        match name {
            b"d" => {
                e.payload = value.to_vec();
                has_payload = true;
            }
            b"k" => e.key = Some(String::from_utf8(value.to_vec()).ok()?),
            b"r" => {
                e.redeliveries = number(value)
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or_else(|| {
                        *e.noted.entry(field.clone()).or_default() += 1;
                        0
                    })
            }
            b"o" => {
                let text = std::str::from_utf8(value).ok();
                let id = text.and_then(|t| {
                    let (ms, seq) = t.split_once('-')?;
                    number(seq.as_bytes())?;
                    Some((t.to_owned(), number(ms.as_bytes())?))
                });
                if id.is_none() {
                    *e.noted.entry(field.clone()).or_default() += 1;
                }
                e.original = id;
            }
            _ => {
                let prop = String::from_utf8(name[2..].to_vec()).ok()?;
                let value = String::from_utf8(value.to_vec()).ok()?;
                if e.properties.insert(prop.clone(), value).is_some() && !e.repeated.contains(&prop)
                {
                    e.repeated.push(prop);
                }
            }
        }
    }
    e.repeated.sort();
    has_payload.then_some(e)
}

/// One entry's fields, as `decode_entry` reads them, against the model; then written again.
fn entry(id: &[u8], fields: Value) {
    let expected = model(&fields);
    let decoded = decode_entry(fields.clone());
    let entry = match (decoded, expected) {
        (Err(_), None) => return,
        (Ok(entry), Some(expected)) => {
            let mut noted = BTreeMap::new();
            for m in &entry.ignored {
                *noted.entry(m.field.clone()).or_default() += 1;
                // at most 40 bytes of the value, each escaped at worst as `\u{10ffff}`
                assert!(
                    m.problem.len() < 40 * 10 + 150,
                    "a note shows the value shortened: {m}"
                );
            }
            let got = Expected {
                payload: entry.payload.to_vec(),
                properties: entry.properties.clone(),
                key: entry.key.clone(),
                redeliveries: entry.redeliveries,
                original: entry
                    .original
                    .as_ref()
                    .map(|(text, ms)| (text.to_string(), *ms)),
                repeated: entry.repeated.clone(),
                noted,
            };
            assert_eq!(got, expected, "entry {:?}", String::from_utf8_lossy(id));
            entry
        }
        (got, expected) => panic!("decode_entry gave {got:?}, the layout says {expected:?}"),
    };
    // written again as a producer writes it, it reads back as the same message
    let mut rec = Vec::new();
    encode_record(
        &mut rec,
        &entry.payload,
        &entry.properties,
        entry.key.as_deref(),
    );
    let record = Record::decode(&mut &rec[..]).expect("a record just encoded");
    let mut cmd = redis::cmd("XADD");
    push_fields(&mut cmd, &record);
    let fields: Vec<Value> = arguments(&cmd).into_iter().map(Value::BulkString).collect();
    let again = decode_entry(Value::Array(fields)).expect("what the producer writes decodes");
    assert_eq!(again.payload, entry.payload);
    assert_eq!(again.properties, entry.properties);
    assert_eq!(again.key, entry.key);
    assert_eq!((again.redeliveries, again.original.is_none()), (0, true));
    assert!(again.ignored.is_empty() && again.repeated.is_empty());
}

/// A q0 pub/sub message: decoded, encoded again, decoded to the same message.
fn frame(data: &[u8]) {
    let Some(f) = decode_frame(Bytes::copy_from_slice(data)) else {
        return;
    };
    assert!(
        f.repeated.windows(2).all(|w| w[0] < w[1]),
        "sorted, each once"
    );
    assert!(f.repeated.iter().all(|n| f.properties.contains_key(n)));
    let time_ms = f
        .time
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis();
    let time_ms = u64::try_from(time_ms).expect("from a u64 of milliseconds");
    let mut rec = Vec::new();
    encode_record(&mut rec, &f.payload, &f.properties, f.key.as_deref());
    let record = Record::decode(&mut &rec[..]).expect("a record just encoded");
    let bytes = one_arg(&FrameArg {
        record: &record,
        time_ms,
    });
    let g = decode_frame(Bytes::from(bytes)).expect("an encoded frame decodes");
    assert_eq!(
        (&g.payload, &g.properties, &g.key, g.time),
        (&f.payload, &f.properties, &f.key, f.time)
    );
    assert!(g.repeated.is_empty());
}
