//! [`TopicError`] and the [`Segment`] / [`Reason`] it carries.

use std::fmt;

use crate::validate::truncate;

/// How many bytes of the offending input a [`TopicError`] keeps (cut on a char boundary).
const MAX_INPUT_KEPT: usize = 300;

/// The part of a topic (or the subscription name) that a [`TopicError`] is about.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// The first segment, `q0` / `q1` / `q2`.
    Qos,
    /// The second segment, the tenant.
    Tenant,
    /// The third segment, the namespace.
    Namespace,
    /// The fourth segment, the queue.
    Queue,
    /// The topic as a whole (empty, wrong number of segments, too long).
    Whole,
    /// A subscription name checked by [`validate_subscription`](crate::validate_subscription).
    Subscription,
}

impl Segment {
    /// A short lowercase name: `"qos"`, `"tenant"`, `"namespace"`, `"queue"`, `"topic"` or
    /// `"subscription"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Segment::Qos => "qos",
            Segment::Tenant => "tenant",
            Segment::Namespace => "namespace",
            Segment::Queue => "queue",
            Segment::Whole => "topic",
            Segment::Subscription => "subscription",
        }
    }

    /// How the error message names this part.
    const fn label(self) -> &'static str {
        match self {
            Segment::Qos => "qos segment",
            Segment::Tenant => "tenant segment",
            Segment::Namespace => "namespace segment",
            Segment::Queue => "queue segment",
            Segment::Whole => "topic",
            Segment::Subscription => "subscription name",
        }
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a topic, a qos or a subscription name was rejected.
///
/// Every `at` is a byte offset inside the [segment](TopicError::segment) (not inside the whole
/// input) and always lies on a char boundary.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The segment (or the whole input) is empty.
    Empty,
    /// The input does not split on `'/'` into exactly 4 segments.
    WrongSegmentCount {
        /// How many segments were found.
        found: usize,
    },
    /// The qos segment is not exactly `q0`, `q1` or `q2`. Holds the segment (at most
    /// [`MAX_SEGMENT_LEN`](crate::MAX_SEGMENT_LEN) bytes of it).
    UnknownQos(String),
    /// The segment contains an MQTT wildcard, `'+'` or `'#'`.
    Wildcard {
        /// The wildcard character.
        ch: char,
        /// Its byte offset in the segment.
        at: usize,
    },
    /// The segment contains whitespace (any Unicode white space, including tab and newline).
    Whitespace {
        /// Byte offset of the whitespace character in the segment.
        at: usize,
    },
    /// The segment contains a control character.
    Control {
        /// Byte offset of the control character in the segment.
        at: usize,
    },
    /// The segment contains a character outside its allowed set, or (with `ch: '.'` and
    /// `at: 0`) consists only of dots, like `.` or `..`.
    InvalidChar {
        /// The rejected character.
        ch: char,
        /// Its byte offset in the segment.
        at: usize,
    },
    /// The segment or the whole topic is longer than allowed.
    TooLong {
        /// The length found, in bytes.
        len: usize,
        /// The maximum allowed, in bytes.
        max: usize,
    },
}

/// What the caller tried to make; decides the first words of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subject {
    /// A topic, from [`Topic::parse`](crate::Topic::parse) or [`Topic::new`](crate::Topic::new).
    Topic,
    /// A bare qos, from `"q1".parse::<Qos>()`.
    Qos,
    /// A subscription name.
    Subscription,
}

/// An invalid topic, qos or subscription name.
///
/// Says which [`Segment`] was wrong, the [`Reason`], and keeps the offending input (at most about
/// 300 bytes of it). Its `Display` reads like:
///
/// ```text
/// invalid topic "q1/tg//x": namespace segment is empty
/// invalid topic "q3/tg/flow/x": qos segment "q3" is not one of q0, q1, q2
/// invalid topic "q1/tg/flow/a+b": queue segment contains '+' (MQTT wildcard) at byte 1
/// invalid topic "q1/tg/flow": expected 4 segments {qos}/{tenant}/{namespace}/{queue}, found 3
/// ```
///
/// For [`Topic::new`](crate::Topic::new) the input is the joined text
/// `{qos}/{tenant}/{namespace}/{queue}` of the arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicError {
    subject: Subject,
    segment: Segment,
    reason: Reason,
    /// At most `MAX_INPUT_KEPT` bytes of the input.
    input: String,
    /// Length of the full input in bytes.
    input_len: usize,
}

impl TopicError {
    pub(crate) fn new(subject: Subject, input: &str, segment: Segment, reason: Reason) -> Self {
        TopicError {
            subject,
            segment,
            reason,
            input: truncate(input, MAX_INPUT_KEPT).to_owned(),
            input_len: input.len(),
        }
    }

    /// Which part of the input was wrong.
    pub fn segment(&self) -> Segment {
        self.segment
    }

    /// Why it was wrong.
    pub fn reason(&self) -> &Reason {
        &self.reason
    }

    /// The offending input, cut to at most 300 bytes (on a char boundary) when it was longer.
    pub fn input(&self) -> &str {
        &self.input
    }
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.subject {
            Subject::Topic => "topic",
            Subject::Qos => "qos",
            Subject::Subscription => "subscription name",
        };
        write!(f, "invalid {what} {:?}", self.input)?;
        if self.input_len > self.input.len() {
            write!(f, "... ({} bytes)", self.input_len)?;
        }
        f.write_str(": ")?;
        let part = self.segment.label();
        match &self.reason {
            Reason::Empty => write!(f, "{part} is empty"),
            Reason::WrongSegmentCount { found } => write!(
                f,
                "expected 4 segments {{qos}}/{{tenant}}/{{namespace}}/{{queue}}, found {found}"
            ),
            Reason::UnknownQos(qos) => write!(f, "{part} {qos:?} is not one of q0, q1, q2"),
            Reason::Wildcard { ch, at } => {
                write!(f, "{part} contains {ch:?} (MQTT wildcard) at byte {at}")
            }
            Reason::Whitespace { at } => write!(f, "{part} contains whitespace at byte {at}"),
            Reason::Control { at } => {
                write!(f, "{part} contains a control character at byte {at}")
            }
            // '.' is an allowed character everywhere, so it is only reported for all-dot names.
            Reason::InvalidChar { ch: '.', .. } => {
                write!(f, "{part} is made only of dots, which is not allowed")
            }
            Reason::InvalidChar { ch, at } => {
                let allowed = match self.segment {
                    Segment::Queue | Segment::Subscription => "A-Z a-z 0-9 _ . - :",
                    _ => "A-Z a-z 0-9 _ . -",
                };
                write!(
                    f,
                    "{part} contains {ch:?} at byte {at} (allowed: {allowed})"
                )
            }
            Reason::TooLong { len, max } => {
                write!(
                    f,
                    "{part} is {len} bytes long, more than the maximum of {max}"
                )
            }
        }
    }
}

impl std::error::Error for TopicError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(segment: Segment, reason: Reason) -> TopicError {
        TopicError::new(Subject::Topic, "in", segment, reason)
    }

    #[test]
    fn messages_for_every_reason() {
        let cases = [
            (
                err(Segment::Whole, Reason::Empty),
                r#"invalid topic "in": topic is empty"#,
            ),
            (
                err(Segment::Tenant, Reason::Empty),
                r#"invalid topic "in": tenant segment is empty"#,
            ),
            (
                err(Segment::Whole, Reason::WrongSegmentCount { found: 5 }),
                r#"invalid topic "in": expected 4 segments {qos}/{tenant}/{namespace}/{queue}, found 5"#,
            ),
            (
                err(Segment::Qos, Reason::UnknownQos("Q1".into())),
                r#"invalid topic "in": qos segment "Q1" is not one of q0, q1, q2"#,
            ),
            (
                err(Segment::Namespace, Reason::Wildcard { ch: '#', at: 3 }),
                r#"invalid topic "in": namespace segment contains '#' (MQTT wildcard) at byte 3"#,
            ),
            (
                err(Segment::Queue, Reason::Whitespace { at: 0 }),
                r#"invalid topic "in": queue segment contains whitespace at byte 0"#,
            ),
            (
                err(Segment::Queue, Reason::Control { at: 2 }),
                r#"invalid topic "in": queue segment contains a control character at byte 2"#,
            ),
            (
                err(Segment::Tenant, Reason::InvalidChar { ch: '$', at: 1 }),
                r#"invalid topic "in": tenant segment contains '$' at byte 1 (allowed: A-Z a-z 0-9 _ . -)"#,
            ),
            (
                err(Segment::Queue, Reason::InvalidChar { ch: '*', at: 1 }),
                r#"invalid topic "in": queue segment contains '*' at byte 1 (allowed: A-Z a-z 0-9 _ . - :)"#,
            ),
            (
                err(Segment::Namespace, Reason::InvalidChar { ch: '.', at: 0 }),
                r#"invalid topic "in": namespace segment is made only of dots, which is not allowed"#,
            ),
            (
                err(Segment::Whole, Reason::TooLong { len: 300, max: 255 }),
                r#"invalid topic "in": topic is 300 bytes long, more than the maximum of 255"#,
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn long_input_is_cut_on_a_char_boundary() {
        let input = format!("a{}", "€".repeat(200));
        let e = TopicError::new(Subject::Topic, &input, Segment::Whole, Reason::Empty);
        assert!(e.input().len() <= MAX_INPUT_KEPT);
        assert!(e.input().len() > MAX_INPUT_KEPT - 4);
        assert!(input.starts_with(e.input()));
        let text = e.to_string();
        assert!(
            text.contains(&format!("... ({} bytes)", input.len())),
            "{text}"
        );
    }

    #[test]
    fn input_is_escaped_in_the_message() {
        let e = TopicError::new(
            Subject::Topic,
            "q1/tg/flow/a\nb\"",
            Segment::Queue,
            Reason::Whitespace { at: 1 },
        );
        assert_eq!(
            e.to_string(),
            r#"invalid topic "q1/tg/flow/a\nb\"": queue segment contains whitespace at byte 1"#
        );
        assert_eq!(e.input(), "q1/tg/flow/a\nb\"");
    }

    #[test]
    fn segment_names() {
        assert_eq!(Segment::Qos.to_string(), "qos");
        assert_eq!(Segment::Tenant.to_string(), "tenant");
        assert_eq!(Segment::Namespace.to_string(), "namespace");
        assert_eq!(Segment::Queue.to_string(), "queue");
        assert_eq!(Segment::Whole.to_string(), "topic");
        assert_eq!(Segment::Subscription.to_string(), "subscription");
    }

    #[test]
    fn is_a_std_error() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}
        assert_error::<TopicError>();
    }
}
