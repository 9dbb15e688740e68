//! How topics map to PostgreSQL: `NOTIFY` channel names and the q0 notification format.

use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tg_backend_api::{Error, ErrorKind, Properties, Result, Topic};

/// Longest `NOTIFY` payload PostgreSQL accepts with the default block size: the payload string
/// must be shorter than 8000 bytes.
pub(crate) const NOTIFY_MAX: usize = 7999;

/// Longest q0 message id: 8 hex digits, `-`, and a decimal `u64`.
const ID_MAX: usize = 8 + 1 + 20;

/// Largest q0 payload that always fits a notification when it has no properties and no key:
/// base64 needs 4 bytes per 3, after the id and two newlines.
pub(crate) const Q0_MAX_PAYLOAD: usize = (NOTIFY_MAX - ID_MAX - 2) / 4 * 3;

/// The `LISTEN`/`NOTIFY` channel of a topic: `tgps_` and the first 24 hex digits (96 bits) of
/// SHA-256 over the schema, a NUL byte and the topic's canonical name. Always 29 bytes, of
/// `[a-z0-9_]` only, so it is a valid identifier for any topic length, and distinct topics get
/// distinct channels except with probability ~2^-96 per pair.
pub fn channel_name(schema: &str, topic: &str) -> String {
    let mut h = Sha256::new();
    h.update(schema.as_bytes());
    h.update([0u8]);
    h.update(topic.as_bytes());
    let digest = h.finalize();
    let mut out = String::with_capacity(29);
    out.push_str("tgps_");
    for b in &digest[..12] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The channel of `topic` in `schema`.
pub(crate) fn channel_of(schema: &str, topic: &Topic) -> String {
    channel_name(schema, topic.as_str())
}

/// Encodes a q0 message as a notification payload: `id \n header \n base64(payload)`, where the
/// header is empty or a JSON object `{"p": properties, "k": key}`.
pub(crate) fn encode_q0(
    id: &str,
    payload: &[u8],
    properties: &Properties,
    key: Option<&str>,
) -> Result<String> {
    let header = if properties.is_empty() && key.is_none() {
        String::new()
    } else {
        let mut obj = serde_json::Map::new();
        if !properties.is_empty() {
            obj.insert(
                "p".to_owned(),
                serde_json::to_value(properties)
                    .map_err(|e| Error::new(ErrorKind::Encode, e.to_string()))?,
            );
        }
        if let Some(k) = key {
            obj.insert("k".to_owned(), serde_json::Value::String(k.to_owned()));
        }
        serde_json::Value::Object(obj).to_string()
    };
    let b64_len = payload.len().div_ceil(3) * 4;
    let total = id.len() + 1 + header.len() + 1 + b64_len;
    if total > NOTIFY_MAX {
        return Err(Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "q0 message of {} payload bytes encodes to a {total}-byte notification; \
                 PostgreSQL NOTIFY carries at most {NOTIFY_MAX} bytes (payload, properties and \
                 key together; a payload alone may have {Q0_MAX_PAYLOAD} bytes)",
                payload.len()
            ),
        ));
    }
    let mut out = String::with_capacity(total);
    out.push_str(id);
    out.push('\n');
    out.push_str(&header);
    out.push('\n');
    base64::engine::general_purpose::STANDARD.encode_string(payload, &mut out);
    Ok(out)
}

/// A decoded q0 notification.
pub(crate) struct Q0Message {
    pub(crate) id: String,
    pub(crate) payload: Bytes,
    pub(crate) properties: Properties,
    pub(crate) key: Option<String>,
    pub(crate) received: SystemTime,
}

/// Decodes [`encode_q0`]'s format.
pub(crate) fn decode_q0(text: &str) -> Result<Q0Message> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::Decode,
            format!("malformed q0 notification: {why}"),
        )
    };
    let (id, rest) = text.split_once('\n').ok_or_else(|| bad("no id line"))?;
    let (header, body) = rest.split_once('\n').ok_or_else(|| bad("no header line"))?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| bad(&format!("payload is not base64: {e}")))?;
    let mut properties = Properties::new();
    let mut key = None;
    if !header.is_empty() {
        let v: serde_json::Value =
            serde_json::from_str(header).map_err(|e| bad(&format!("header: {e}")))?;
        if let Some(p) = v.get("p") {
            properties =
                serde_json::from_value(p.clone()).map_err(|e| bad(&format!("properties: {e}")))?;
        }
        key = v.get("k").and_then(|k| k.as_str()).map(str::to_owned);
    }
    Ok(Q0Message {
        id: id.to_owned(),
        payload: Bytes::from(payload),
        properties,
        key,
        received: SystemTime::now(),
    })
}

/// Properties as the `text` form of the `jsonb` column (`None` when empty).
pub(crate) fn properties_to_json(properties: &Properties) -> Option<String> {
    if properties.is_empty() {
        None
    } else {
        serde_json::to_string(properties).ok()
    }
}

/// Properties from the `jsonb` column's text.
pub(crate) fn properties_from_json(text: Option<&str>) -> Properties {
    match text {
        Some(t) => serde_json::from_str(t).unwrap_or_default(),
        None => Properties::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_short_identifiers() {
        let long = format!(
            "q1/{}/{}/{}",
            "t".repeat(64),
            "n".repeat(64),
            "q".repeat(120)
        );
        let a = channel_name("tgps", &long);
        assert_eq!(a.len(), 29);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        let b = channel_name("tgps", &format!("{long}x"));
        assert_ne!(a, b);
        assert_ne!(
            channel_name("tgps", "q1/a/b/c"),
            channel_name("other", "q1/a/b/c")
        );
        assert_eq!(
            channel_name("tgps", "q1/a/b/c"),
            channel_name("tgps", "q1/a/b/c")
        );
    }

    #[test]
    fn q0_round_trip_and_limits() {
        let mut props = Properties::new();
        props.insert("id".into(), "x\ny\"z".into());
        let text = encode_q0("abcd0123-7", b"\0\xffhello", &props, Some("k\n")).unwrap();
        let m = decode_q0(&text).unwrap();
        assert_eq!(m.id, "abcd0123-7");
        assert_eq!(m.payload.as_ref(), b"\0\xffhello");
        assert_eq!(m.properties, props);
        assert_eq!(m.key.as_deref(), Some("k\n"));

        let max_id = format!("ffffffff-{}", u64::MAX);
        let at = vec![7u8; Q0_MAX_PAYLOAD];
        let text = encode_q0(&max_id, &at, &Properties::new(), None).unwrap();
        assert!(text.len() <= NOTIFY_MAX);
        let over = vec![7u8; Q0_MAX_PAYLOAD + 3];
        let err = encode_q0(&max_id, &over, &Properties::new(), None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
        let err = encode_q0("a-1", &at, &props, Some(&"k".repeat(100))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    }
}
