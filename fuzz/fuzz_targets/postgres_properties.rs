//! What the PostgreSQL backend reads from the database as text: a stored row's properties (the
//! `properties` column as text) and a q0 notification payload (`id \n header \n base64`).
//! Whatever the text:
//! - decoding never panics;
//! - properties read as docs/postgres.md says (checked against a model written here on
//!   `serde_json::Value`, whose objects keep the last value of a repeated name as `jsonb` does):
//!   a string as it is, another value as its compact JSON text, a `null` as no value; the last
//!   value of a repeated name counts, and the names the consumer warns about are named;
//! - properties written again (`to_json`) read back the same, with nothing to warn about;
//! - a decoded notification encoded again decodes to the same message, or is refused as too
//!   large for `NOTIFY` (the only reason `encode` refuses a message).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tg_backend_api::{ErrorKind, Properties};
use tg_backend_postgres::fuzzing::{
    decode_notification, encode_notification, properties_to_json, read_properties, Read, NOTIFY_MAX,
};

fuzz_target!(|text: &str| {
    stored_properties(text);
    notification(text);
});

/// What the reading must give for a JSON object, from docs/postgres.md.
fn model(object: &serde_json::Map<String, Value>) -> Properties {
    object
        .iter()
        .filter_map(|(k, v)| match v {
            Value::String(s) => Some((k.clone(), s.clone())),
            Value::Null => None,
            other => Some((k.clone(), other.to_string())),
        })
        .collect()
}

/// Checks what was read from `text` (the JSON object `object`) against the model.
fn check_read(read: &Read, object: &serde_json::Map<String, Value>) {
    assert_eq!(read.properties, model(object), "properties of {object:?}");
    for names in [&read.converted, &read.dropped, &read.repeated] {
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, each once");
        assert!(names.iter().all(|n| object.contains_key(n)));
    }
    for (k, v) in object {
        match v {
            Value::String(_) => {}
            Value::Null => assert!(read.dropped.contains(k), "{k:?} is null and not named"),
            _ => assert!(read.converted.contains(k), "{k:?} was converted, not named"),
        }
    }
    // written again, as the producer writes them
    match properties_to_json(&read.properties) {
        None => assert!(read.properties.is_empty()),
        Some(json) => {
            let again = read_properties(&json).expect("what the producer writes reads");
            assert_eq!(again.properties, read.properties);
            assert!(again.converted.is_empty() && again.dropped.is_empty());
            assert!(again.repeated.is_empty());
        }
    }
}

/// The text of a `properties` column (or of a q0 header's `p`).
fn stored_properties(text: &str) {
    let read = read_properties(text);
    let value = serde_json::from_str::<Value>(text);
    match (read, value) {
        (Ok(read), Ok(Value::Object(object))) => check_read(&read, &object),
        (Err(_), Ok(Value::Object(object))) => panic!("refused the object {object:?}"),
        (Ok(read), value) => panic!("read {read:?} from what is no object: {value:?}"),
        (Err(_), _) => {}
    }
}

fn notification(text: &str) {
    let Ok(m) = decode_notification(text) else {
        return;
    };
    assert!(!m.id.contains('\n'));
    let (_, rest) = text.split_once('\n').expect("an id line");
    let (header, _) = rest.split_once('\n').expect("a header line");
    if !header.is_empty() {
        // (serde reads a struct from an array of its fields too: `[p, k]`)
        let fields = match serde_json::from_str::<Value>(header) {
            Ok(Value::Object(h)) => Some((h.get("p").cloned(), h.get("k").cloned())),
            Ok(Value::Array(h)) => Some((h.first().cloned(), h.get(1).cloned())),
            Ok(other) => panic!("a header that is no JSON object decoded: {other:?}"),
            // an unknown field is skipped unread: a number there may be beyond what `Value`
            // holds (`p` and `k` are read as values, so it is not theirs); nothing to compare
            Err(_) => None,
        };
        if let Some((p, k)) = fields {
            match p {
                Some(Value::Object(p)) => check_read(&m.properties, &p),
                _ => assert!(m.properties.properties.is_empty()),
            }
            let key = k.as_ref().and_then(Value::as_str);
            assert_eq!(m.key.as_deref(), key, "the key is `k` when it is a string");
        }
    } else {
        assert!(m.properties.properties.is_empty() && m.key.is_none());
    }
    match encode_notification(
        &m.id,
        &m.payload,
        &m.properties.properties,
        m.key.as_deref(),
    ) {
        Ok(again) => {
            assert!(again.len() <= NOTIFY_MAX);
            let n = decode_notification(&again).expect("an encoded notification decodes");
            assert_eq!(
                (&n.id, &n.payload, &n.properties.properties, &n.key),
                (&m.id, &m.payload, &m.properties.properties, &m.key)
            );
            assert!(n.properties.converted.is_empty() && n.properties.dropped.is_empty());
            assert!(n.properties.repeated.is_empty());
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}"),
    }
}
