//! How topics map to PostgreSQL names: the `LISTEN`/`NOTIFY` channel of a topic. (In the tables a
//! topic is its canonical name, a bind parameter, never SQL text.)

use sha2::{Digest, Sha256};
use tg_backend_api::Topic;

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
}
