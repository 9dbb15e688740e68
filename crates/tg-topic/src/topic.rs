//! [`Topic`] and [`TopicBuilder`].

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::{Reason, Segment, Subject, TopicError};
use crate::validate::{check_name, parse_qos};
use crate::{
    Qos, DEFAULT_NAMESPACE, DEFAULT_TENANT, MAX_QUEUE_LEN, MAX_SEGMENT_LEN, MAX_TOPIC_LEN,
};

/// Byte offset of the tenant: every qos segment is 2 bytes, then a `'/'`.
const TENANT_START: usize = 3;

// The end offsets of tenant and namespace are stored as `u8`.
const _: () = assert!(TENANT_START + MAX_SEGMENT_LEN + 1 + MAX_SEGMENT_LEN <= u8::MAX as usize);

/// A validated generic topic, `{qos}/{tenant}/{namespace}/{queue}`.
///
/// A `Topic` can only be made through validation ([`Topic::parse`], [`Topic::new`],
/// [`topic`](crate::topic), [`Topic::builder`], `FromStr`, `TryFrom`, serde), so it always holds a
/// valid name. It keeps its canonical text in an `Arc<str>`: cloning is cheap and
/// [`as_str`](Topic::as_str) and `Display` give the text back without formatting.
///
/// Equality, hashing and ordering are those of the canonical text, so a `Topic` can be looked up
/// by `&str` in maps and sets (it implements `Borrow<str>`).
///
/// ```
/// use tg_topic::{Qos, Topic};
///
/// let t = Topic::new(Qos::Q0, "tg", "flow", "text-completion-request:ws1:default")?;
/// assert_eq!(t.as_str(), "q0/tg/flow/text-completion-request:ws1:default");
/// assert_eq!(format!("{t:?}"), r#"Topic("q0/tg/flow/text-completion-request:ws1:default")"#);
/// assert_eq!(Topic::parse(t.as_str())?, t);
/// assert_eq!(serde_json::to_string(&t).unwrap(), r#""q0/tg/flow/text-completion-request:ws1:default""#);
/// # Ok::<(), tg_topic::TopicError>(())
/// ```
#[derive(Clone)]
pub struct Topic {
    /// The canonical text.
    text: Arc<str>,
    qos: Qos,
    /// Byte offset of the `'/'` after the tenant.
    tenant_end: u8,
    /// Byte offset of the `'/'` after the namespace.
    namespace_end: u8,
}

impl Topic {
    /// Makes a topic from its parts.
    ///
    /// # Errors
    ///
    /// A [`TopicError`] naming the first invalid segment (tenant, then namespace, then queue), or
    /// [`Segment::Whole`] with [`Reason::TooLong`] if the joined text is longer than
    /// [`MAX_TOPIC_LEN`]. Its [`input`](TopicError::input) is the joined text
    /// `{qos}/{tenant}/{namespace}/{queue}`.
    pub fn new(qos: Qos, tenant: &str, namespace: &str, queue: &str) -> Result<Topic, TopicError> {
        let text = format!("{qos}/{tenant}/{namespace}/{queue}");
        check_parts(tenant, namespace, queue)
            .map_err(|(segment, reason)| TopicError::new(Subject::Topic, &text, segment, reason))?;
        Ok(Topic::from_checked(
            text.into(),
            qos,
            tenant.len(),
            namespace.len(),
        ))
    }

    /// Parses a topic; the same as `s.parse::<Topic>()`.
    ///
    /// Never panics. A topic that parses displays exactly as `s`.
    ///
    /// # Errors
    ///
    /// A [`TopicError`] if `s` is empty, does not have exactly 4 segments, or one of them breaks
    /// the rules (checked in order qos, tenant, namespace, queue, then the whole length).
    pub fn parse(s: &str) -> Result<Topic, TopicError> {
        let fail = |segment, reason| TopicError::new(Subject::Topic, s, segment, reason);
        if s.is_empty() {
            return Err(fail(Segment::Whole, Reason::Empty));
        }
        let found = s.bytes().filter(|&b| b == b'/').count() + 1;
        let mut parts = s.split('/');
        let (4, Some(qos), Some(tenant), Some(namespace), Some(queue)) = (
            found,
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(fail(Segment::Whole, Reason::WrongSegmentCount { found }));
        };
        let qos = parse_qos(qos).map_err(|reason| fail(Segment::Qos, reason))?;
        check_parts(tenant, namespace, queue).map_err(|(segment, reason)| fail(segment, reason))?;
        Ok(Topic::from_checked(
            s.into(),
            qos,
            tenant.len(),
            namespace.len(),
        ))
    }

    /// Starts a [`TopicBuilder`] for `queue` with the defaults [`Qos::Q1`], [`DEFAULT_TENANT`]
    /// and [`DEFAULT_NAMESPACE`].
    ///
    /// ```
    /// use tg_topic::{Qos, Topic};
    ///
    /// let t = Topic::builder("config").qos(Qos::Q2).namespace("config").build()?;
    /// assert_eq!(t.as_str(), "q2/tg/config/config");
    /// # Ok::<(), tg_topic::TopicError>(())
    /// ```
    pub fn builder(queue: &str) -> TopicBuilder {
        TopicBuilder {
            qos: Qos::default(),
            tenant: DEFAULT_TENANT.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            queue: queue.to_owned(),
        }
    }

    /// The quality of service, the first segment.
    pub fn qos(&self) -> Qos {
        self.qos
    }

    /// The tenant, the second segment.
    pub fn tenant(&self) -> &str {
        &self.text[TENANT_START..usize::from(self.tenant_end)]
    }

    /// The namespace, the third segment.
    pub fn namespace(&self) -> &str {
        &self.text[usize::from(self.tenant_end) + 1..usize::from(self.namespace_end)]
    }

    /// The queue, the fourth segment.
    pub fn queue(&self) -> &str {
        &self.text[usize::from(self.namespace_end) + 1..]
    }

    /// The canonical text, like `"q1/tg/flow/x"`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The same tenant, namespace and queue with another qos.
    #[must_use]
    pub fn with_qos(&self, qos: Qos) -> Topic {
        if qos == self.qos {
            return self.clone();
        }
        // Everything after the qos segment, starting with the '/'.
        let rest = &self.text[self.qos.as_str().len()..];
        let mut text = String::with_capacity(self.text.len());
        text.push_str(qos.as_str());
        text.push_str(rest);
        Topic {
            text: text.into(),
            qos,
            tenant_end: self.tenant_end,
            namespace_end: self.namespace_end,
        }
    }

    /// The same qos, tenant and namespace with another queue, for example a dead-letter topic.
    ///
    /// ```
    /// let t = tg_topic::topic("orders")?;
    /// assert_eq!(t.with_queue("orders:dlq")?.as_str(), "q1/tg/flow/orders:dlq");
    /// # Ok::<(), tg_topic::TopicError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A [`TopicError`] with [`Segment::Queue`] if `queue` is invalid, or with
    /// [`Segment::Whole`] if the new topic would be longer than [`MAX_TOPIC_LEN`].
    pub fn with_queue(&self, queue: &str) -> Result<Topic, TopicError> {
        Topic::new(self.qos, self.tenant(), self.namespace(), queue)
    }

    /// Builds a topic from text whose parts were checked.
    fn from_checked(text: Arc<str>, qos: Qos, tenant_len: usize, namespace_len: usize) -> Topic {
        let tenant_end = TENANT_START + tenant_len;
        let namespace_end = tenant_end + 1 + namespace_len;
        debug_assert!(tenant_len <= MAX_SEGMENT_LEN && namespace_len <= MAX_SEGMENT_LEN);
        debug_assert_eq!(&text[..TENANT_START], format!("{qos}/"));
        Topic {
            text,
            qos,
            // Cannot truncate: both are at most TENANT_START + 2 * MAX_SEGMENT_LEN + 1 (see the
            // const assertion above).
            tenant_end: tenant_end as u8,
            namespace_end: namespace_end as u8,
        }
    }
}

/// Checks tenant, namespace and queue, then the length of the joined topic.
fn check_parts(tenant: &str, namespace: &str, queue: &str) -> Result<(), (Segment, Reason)> {
    check_name(tenant, MAX_SEGMENT_LEN, false).map_err(|r| (Segment::Tenant, r))?;
    check_name(namespace, MAX_SEGMENT_LEN, false).map_err(|r| (Segment::Namespace, r))?;
    check_name(queue, MAX_QUEUE_LEN, true).map_err(|r| (Segment::Queue, r))?;
    // "qN" plus three '/'.
    let len = 5 + tenant.len() + namespace.len() + queue.len();
    if len > MAX_TOPIC_LEN {
        return Err((
            Segment::Whole,
            Reason::TooLong {
                len,
                max: MAX_TOPIC_LEN,
            },
        ));
    }
    Ok(())
}

impl PartialEq for Topic {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Topic {}

impl PartialEq<str> for Topic {
    fn eq(&self, other: &str) -> bool {
        &*self.text == other
    }
}

impl PartialEq<&str> for Topic {
    fn eq(&self, other: &&str) -> bool {
        &*self.text == *other
    }
}

impl Hash for Topic {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Same as hashing the `str`, as `Borrow<str>` requires.
        self.text.hash(state);
    }
}

impl PartialOrd for Topic {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Topic {
    fn cmp(&self, other: &Self) -> Ordering {
        self.text.cmp(&other.text)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Topic").field(&&*self.text).finish()
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Topic {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Topic::parse(s)
    }
}

impl TryFrom<&str> for Topic {
    type Error = TopicError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Topic::parse(s)
    }
}

impl TryFrom<String> for Topic {
    type Error = TopicError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Topic::parse(&s)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.text
    }
}

impl From<Topic> for String {
    fn from(topic: Topic) -> String {
        topic.text.to_string()
    }
}

impl Serialize for Topic {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Topic {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TopicVisitor;

        impl Visitor<'_> for TopicVisitor {
            type Value = Topic;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a topic string {qos}/{tenant}/{namespace}/{queue}")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Topic, E> {
                Topic::parse(v).map_err(E::custom)
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Topic, E> {
                match std::str::from_utf8(v) {
                    Ok(s) => self.visit_str(s),
                    Err(_) => Err(E::invalid_value(Unexpected::Bytes(v), &self)),
                }
            }
        }

        deserializer.deserialize_str(TopicVisitor)
    }
}

/// Builds a [`Topic`] from a queue name and optional qos, tenant and namespace.
///
/// Made by [`Topic::builder`]; the defaults are [`Qos::Q1`], [`DEFAULT_TENANT`] and
/// [`DEFAULT_NAMESPACE`], as in [`topic`](crate::topic).
///
/// ```
/// use tg_topic::{Qos, Topic};
///
/// let t = Topic::builder("jobs").qos(Qos::Q0).tenant("acme").namespace("batch").build()?;
/// assert_eq!(t.as_str(), "q0/acme/batch/jobs");
/// # Ok::<(), tg_topic::TopicError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a TopicBuilder does nothing until `build` is called"]
pub struct TopicBuilder {
    qos: Qos,
    tenant: String,
    namespace: String,
    queue: String,
}

impl TopicBuilder {
    /// Sets the qos (default [`Qos::Q1`]).
    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }

    /// Sets the tenant (default [`DEFAULT_TENANT`], `"tg"`).
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// Sets the namespace (default [`DEFAULT_NAMESPACE`], `"flow"`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Validates the parts and makes the topic, like [`Topic::new`].
    ///
    /// # Errors
    ///
    /// A [`TopicError`] if a part is invalid; see [`Topic::new`].
    pub fn build(&self) -> Result<Topic, TopicError> {
        Topic::new(self.qos, &self.tenant, &self.namespace, &self.queue)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::topic;

    const REAL_NAMES: [&str; 8] = [
        "q1/tg/flow/text-completion-request:ws1:default",
        "q1/tg/flow/text-completion-response:ws1:default",
        "q0/tg/flow/document-load",
        "q2/tg/config/config",
        "q1/tg/flow/my-queue",
        "q1/tg/request/librarian",
        "q0/tg/response/graph-rag:ws_2.v1",
        "q2/Tenant_1/ns.v2/Queue-NAME_3.x:y",
    ];

    fn parse_err(s: &str) -> TopicError {
        Topic::parse(s).unwrap_err()
    }

    #[test]
    fn real_world_names() {
        for name in REAL_NAMES {
            let t = Topic::parse(name).unwrap();
            assert_eq!(t.as_str(), name);
            assert_eq!(t.to_string(), name);
            let joined = format!("{}/{}/{}/{}", t.qos(), t.tenant(), t.namespace(), t.queue());
            assert_eq!(joined, name);
            assert_eq!(
                Topic::new(t.qos(), t.tenant(), t.namespace(), t.queue()).unwrap(),
                t
            );
        }
        let t = Topic::parse(REAL_NAMES[0]).unwrap();
        assert_eq!(t.qos(), Qos::Q1);
        assert_eq!(t.tenant(), "tg");
        assert_eq!(t.namespace(), "flow");
        assert_eq!(t.queue(), "text-completion-request:ws1:default");
    }

    #[test]
    fn all_ways_to_parse_agree() {
        let s = REAL_NAMES[0];
        let a = Topic::parse(s).unwrap();
        let b: Topic = s.parse().unwrap();
        let c = Topic::try_from(s).unwrap();
        let d = Topic::try_from(s.to_owned()).unwrap();
        assert!(a == b && b == c && c == d);
        assert!(Topic::try_from("nope").is_err());
        assert!(Topic::try_from(String::from("nope")).is_err());
        assert_eq!(a.as_ref() as &str, s);
        assert_eq!(String::from(a.clone()), s);
        assert_eq!(a, s);
        assert_eq!(&a, s);
    }

    #[test]
    fn debug_and_display() {
        let t = topic("x").unwrap();
        assert_eq!(format!("{t:?}"), r#"Topic("q1/tg/flow/x")"#);
        assert_eq!(format!("{t}"), "q1/tg/flow/x");
    }

    #[test]
    fn qos_segment_errors() {
        let e = parse_err("q3/tg/flow/x");
        assert_eq!(e.segment(), Segment::Qos);
        assert_eq!(e.reason(), &Reason::UnknownQos("q3".into()));
        assert_eq!(
            e.to_string(),
            r#"invalid topic "q3/tg/flow/x": qos segment "q3" is not one of q0, q1, q2"#
        );
        assert_eq!(
            parse_err("Q1/tg/flow/x").reason(),
            &Reason::UnknownQos("Q1".into())
        );
        assert_eq!(
            parse_err("q+/tg/flow/x").reason(),
            &Reason::UnknownQos("q+".into())
        );
        let e = parse_err("/tg/flow/x");
        assert_eq!((e.segment(), e.reason()), (Segment::Qos, &Reason::Empty));
    }

    #[test]
    fn empty_segments() {
        let cases = [
            ("q1//flow/x", Segment::Tenant),
            ("q1/tg//x", Segment::Namespace),
            ("q1/tg/flow/", Segment::Queue),
            ("/tg/flow/x", Segment::Qos),
            ("///", Segment::Qos),
        ];
        for (s, segment) in cases {
            let e = parse_err(s);
            assert_eq!((e.segment(), e.reason()), (segment, &Reason::Empty), "{s}");
        }
        assert_eq!(
            parse_err("q1/tg//x").to_string(),
            r#"invalid topic "q1/tg//x": namespace segment is empty"#
        );
        let e = parse_err("");
        assert_eq!((e.segment(), e.reason()), (Segment::Whole, &Reason::Empty));
        assert_eq!(e.to_string(), r#"invalid topic "": topic is empty"#);
    }

    #[test]
    fn segment_count() {
        let cases = [
            ("x", 1),
            ("q1/tg/flow", 3),
            ("q1/tg/flow/x/y", 5),
            ("q1/tg/flow/x/", 5),
            ("/q1/tg/flow/x", 5),
            ("////////", 9),
        ];
        for (s, found) in cases {
            let e = parse_err(s);
            assert_eq!(e.segment(), Segment::Whole, "{s}");
            assert_eq!(e.reason(), &Reason::WrongSegmentCount { found }, "{s}");
            assert_eq!(e.input(), s);
        }
        assert_eq!(
            parse_err("q1/tg/flow").to_string(),
            r#"invalid topic "q1/tg/flow": expected 4 segments {qos}/{tenant}/{namespace}/{queue}, found 3"#
        );
    }

    #[test]
    fn wildcards() {
        let cases = [
            ("q1/tg/flow/a+b", Segment::Queue, '+', 1),
            ("q1/tg/flow/#", Segment::Queue, '#', 0),
            ("q1/+/flow/x", Segment::Tenant, '+', 0),
            ("q1/tg/fl#ow/x", Segment::Namespace, '#', 2),
        ];
        for (s, segment, ch, at) in cases {
            let e = parse_err(s);
            assert_eq!(e.segment(), segment, "{s}");
            assert_eq!(e.reason(), &Reason::Wildcard { ch, at }, "{s}");
        }
        assert_eq!(
            parse_err("q1/tg/flow/a+b").to_string(),
            r#"invalid topic "q1/tg/flow/a+b": queue segment contains '+' (MQTT wildcard) at byte 1"#
        );
    }

    #[test]
    fn whitespace_and_control() {
        let cases = [
            (
                "q1/tg/flow/a b",
                Segment::Queue,
                Reason::Whitespace { at: 1 },
            ),
            (
                "q1/t\tg/flow/x",
                Segment::Tenant,
                Reason::Whitespace { at: 1 },
            ),
            (
                "q1/tg/flow/x\n",
                Segment::Queue,
                Reason::Whitespace { at: 1 },
            ),
            (
                "q1/tg/\u{a0}/x",
                Segment::Namespace,
                Reason::Whitespace { at: 0 },
            ),
            ("q1/tg/flow/x\0", Segment::Queue, Reason::Control { at: 1 }),
            (
                "q1/tg\u{7f}/flow/x",
                Segment::Tenant,
                Reason::Control { at: 2 },
            ),
            (
                "q1/tg/a\u{85}/x",
                Segment::Namespace,
                Reason::Whitespace { at: 1 },
            ),
            (
                "q1/tg/a\u{9f}/x",
                Segment::Namespace,
                Reason::Control { at: 1 },
            ),
        ];
        for (s, segment, reason) in cases {
            let e = parse_err(s);
            assert_eq!((e.segment(), e.reason()), (segment, &reason), "{s:?}");
        }
    }

    #[test]
    fn invalid_chars() {
        let cases = [
            ("q1/tg/flow/a$b", Segment::Queue, '$', 1),
            ("q1/tg/flow/*", Segment::Queue, '*', 0),
            ("q1/tg/flow/a>", Segment::Queue, '>', 1),
            ("q1/tg/flöw/x", Segment::Namespace, 'ö', 2),
            ("q1/t:g/flow/x", Segment::Tenant, ':', 1),
            ("q1/tg/fl:ow/x", Segment::Namespace, ':', 2),
            ("q1/tg/flow/x\u{200b}", Segment::Queue, '\u{200b}', 1),
            ("q1/tg/flow/日本", Segment::Queue, '日', 0),
            ("q1/tg/flow/a日本", Segment::Queue, '日', 1),
            ("q1/tg/flow/a\\b", Segment::Queue, '\\', 1),
        ];
        for (s, segment, ch, at) in cases {
            let e = parse_err(s);
            assert_eq!(e.segment(), segment, "{s}");
            assert_eq!(e.reason(), &Reason::InvalidChar { ch, at }, "{s}");
        }
    }

    #[test]
    fn dot_only_segments() {
        let cases = [
            ("q1/./flow/x", Segment::Tenant),
            ("q1/tg/../x", Segment::Namespace),
            ("q1/tg/flow/..", Segment::Queue),
            ("q1/tg/flow/.", Segment::Queue),
        ];
        for (s, segment) in cases {
            let e = parse_err(s);
            assert_eq!(e.segment(), segment, "{s}");
            assert_eq!(e.reason(), &Reason::InvalidChar { ch: '.', at: 0 }, "{s}");
        }
        assert!(Topic::parse("q1/.tg/flow./a..b").is_ok());
    }

    #[test]
    fn length_limits() {
        let t64 = "t".repeat(MAX_SEGMENT_LEN);
        let n64 = "n".repeat(MAX_SEGMENT_LEN);
        let q120 = "q".repeat(120);
        let ok = Topic::new(Qos::Q1, &t64, &n64, &q120).unwrap();
        assert_eq!(ok.as_str().len(), 5 + 64 + 64 + 120);
        assert_eq!(ok.tenant(), t64);
        assert_eq!(ok.namespace(), n64);
        assert_eq!(ok.queue(), q120);

        let q192 = "q".repeat(MAX_QUEUE_LEN);
        assert!(Topic::new(Qos::Q1, "t", "n", &q192).is_ok());

        // Exactly MAX_TOPIC_LEN is fine, one more is not.
        let q_max = "q".repeat(MAX_TOPIC_LEN - 5 - 64 - 64);
        assert_eq!(
            Topic::new(Qos::Q2, &t64, &n64, &q_max)
                .unwrap()
                .as_str()
                .len(),
            MAX_TOPIC_LEN
        );
        let q_over = format!("{q_max}q");
        let e = Topic::new(Qos::Q2, &t64, &n64, &q_over).unwrap_err();
        assert_eq!(e.segment(), Segment::Whole);
        assert_eq!(
            e.reason(),
            &Reason::TooLong {
                len: MAX_TOPIC_LEN + 1,
                max: MAX_TOPIC_LEN
            }
        );
        let e = Topic::parse(&format!("q2/{t64}/{n64}/{q_over}")).unwrap_err();
        assert_eq!(e.segment(), Segment::Whole);

        let cases = [
            (format!("q1/{t64}t/n/x"), Segment::Tenant, MAX_SEGMENT_LEN),
            (
                format!("q1/t/{n64}n/x"),
                Segment::Namespace,
                MAX_SEGMENT_LEN,
            ),
            (format!("q1/t/n/{q192}q"), Segment::Queue, MAX_QUEUE_LEN),
        ];
        for (s, segment, max) in cases {
            let e = parse_err(&s);
            assert_eq!(e.segment(), segment);
            assert_eq!(e.reason(), &Reason::TooLong { len: max + 1, max });
        }
    }

    #[test]
    fn huge_and_non_ascii_inputs_do_not_panic() {
        let huge = format!("q1/tg/flow/{}", "€".repeat(100_000));
        let e = parse_err(&huge);
        assert_eq!(e.segment(), Segment::Queue);
        assert!(e.input().len() <= 300);
        assert!(huge.starts_with(e.input()));
        assert!(e.to_string().contains(&format!("({} bytes)", huge.len())));
        for s in [
            "€/€/€/€",
            "q1/€/€/€",
            "é",
            "q1/tg/flow/\u{10ffff}",
            "q1/tg/flow/\u{301}",
        ] {
            assert!(Topic::parse(s).is_err());
        }
    }

    #[test]
    fn new_validates_every_part() {
        let e = Topic::new(Qos::Q1, "a/b", "flow", "x").unwrap_err();
        assert_eq!(e.segment(), Segment::Tenant);
        assert_eq!(e.reason(), &Reason::InvalidChar { ch: '/', at: 1 });
        assert_eq!(e.input(), "q1/a/b/flow/x");
        let e = Topic::new(Qos::Q1, "tg", "", "x").unwrap_err();
        assert_eq!(
            (e.segment(), e.reason()),
            (Segment::Namespace, &Reason::Empty)
        );
        let e = Topic::new(Qos::Q1, "tg", "flow", "x/y").unwrap_err();
        assert_eq!(e.segment(), Segment::Queue);
        let e = Topic::new(Qos::Q0, "tg", "flow", "a#").unwrap_err();
        assert_eq!(e.reason(), &Reason::Wildcard { ch: '#', at: 1 });
    }

    #[test]
    fn builder_defaults_and_setters() {
        let t = Topic::builder("x").build().unwrap();
        assert_eq!(t, topic("x").unwrap());
        assert_eq!(t.as_str(), "q1/tg/flow/x");

        let t = Topic::builder("config")
            .qos(Qos::Q2)
            .namespace("config")
            .build()
            .unwrap();
        assert_eq!(t.as_str(), "q2/tg/config/config");

        let t = Topic::builder("q")
            .qos(Qos::Q0)
            .tenant("t")
            .namespace(String::from("n"))
            .build()
            .unwrap();
        assert_eq!(t.as_str(), "q0/t/n/q");

        let e = Topic::builder("q")
            .tenant("bad tenant")
            .build()
            .unwrap_err();
        assert_eq!(e.segment(), Segment::Tenant);
        assert!(Topic::builder("").build().is_err());
    }

    #[test]
    fn with_qos_keeps_names() {
        let t = Topic::parse("q1/tenant/ns/queue:a").unwrap();
        for qos in Qos::ALL {
            let u = t.with_qos(qos);
            assert_eq!(u.qos(), qos);
            assert_eq!(u.tenant(), "tenant");
            assert_eq!(u.namespace(), "ns");
            assert_eq!(u.queue(), "queue:a");
            assert_eq!(u.as_str(), format!("{qos}/tenant/ns/queue:a"));
            assert_eq!(Topic::parse(u.as_str()).unwrap(), u);
        }
        assert_eq!(t.with_qos(Qos::Q1), t);
    }

    #[test]
    fn with_queue_derives_topics() {
        let t = Topic::parse("q2/tg/config/config").unwrap();
        let dlq = t.with_queue("config:dlq").unwrap();
        assert_eq!(dlq.as_str(), "q2/tg/config/config:dlq");
        assert_eq!(dlq.qos(), Qos::Q2);

        let e = t.with_queue("a b").unwrap_err();
        assert_eq!(e.segment(), Segment::Queue);
        assert_eq!(e.reason(), &Reason::Whitespace { at: 1 });
        assert_eq!(e.input(), "q2/tg/config/a b");

        let long = Topic::new(Qos::Q1, &"t".repeat(64), &"n".repeat(64), "x").unwrap();
        let e = long.with_queue(&"q".repeat(150)).unwrap_err();
        assert_eq!(e.segment(), Segment::Whole);
    }

    #[test]
    fn equality_hash_order_follow_text() {
        let a = topic("a").unwrap();
        let b = topic("b").unwrap();
        assert!(a < b);
        assert!(a.with_qos(Qos::Q0) < a);
        let set: HashSet<Topic> = [a.clone(), b.clone(), a.clone()].into_iter().collect();
        assert_eq!(set.len(), 2);
        assert!(set.contains("q1/tg/flow/a"));
        assert!(!set.contains("q1/tg/flow/c"));
    }

    #[test]
    fn serde_round_trip() {
        let t = Topic::parse(REAL_NAMES[0]).unwrap();
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, format!("\"{}\"", REAL_NAMES[0]));
        let back: Topic = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);

        let topics = vec![t.clone(), t.with_qos(Qos::Q0)];
        let json = serde_json::to_value(&topics).unwrap();
        let back: Vec<Topic> = serde_json::from_value(json).unwrap();
        assert_eq!(back, topics);
    }

    #[test]
    fn serde_rejects_invalid_topics() {
        let err = serde_json::from_str::<Topic>(r#""q1/tg/flow/a+b""#).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(
                r#"invalid topic "q1/tg/flow/a+b": queue segment contains '+' (MQTT wildcard) at byte 1"#
            ),
            "{text}"
        );
        let err = serde_json::from_str::<Topic>(r#""q3/tg/flow/x""#).unwrap_err();
        assert!(
            err.to_string().contains("is not one of q0, q1, q2"),
            "{err}"
        );
        assert!(serde_json::from_str::<Topic>("42").is_err());
        assert!(serde_json::from_str::<Topic>("null").is_err());
        // Owned strings (with escapes) go through the same path.
        let t: Topic = serde_json::from_str(r#""q1\/tg\/flow\/x""#).unwrap();
        assert_eq!(t.as_str(), "q1/tg/flow/x");
    }

    #[test]
    fn cheap_to_clone() {
        let t = topic("x").unwrap();
        let u = t.clone();
        assert!(std::ptr::eq(t.as_str(), u.as_str()));
        assert!(std::mem::size_of::<Topic>() <= 24);
    }
}
