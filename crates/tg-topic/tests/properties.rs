//! Property tests: display/parse identity, no panics, and consistent error offsets.

use proptest::prelude::*;
use tg_topic::{validate_subscription, Qos, Reason, Segment, Topic, TopicError, MAX_TOPIC_LEN};

fn qos() -> impl Strategy<Value = Qos> {
    prop::sample::select(Qos::ALL.to_vec())
}

fn not_only_dots(s: &str) -> bool {
    !s.bytes().all(|b| b == b'.')
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.-]{1,64}".prop_filter("only dots", |s| not_only_dots(s))
}

fn queue() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.:-]{1,192}".prop_filter("only dots", |s| not_only_dots(s))
}

/// Valid (qos, tenant, namespace, queue) whose joined text fits in `MAX_TOPIC_LEN`.
fn valid_parts() -> impl Strategy<Value = (Qos, String, String, String)> {
    (qos(), name(), name(), queue()).prop_filter("too long", |(_, t, n, q)| {
        5 + t.len() + n.len() + q.len() <= MAX_TOPIC_LEN
    })
}

/// Checks what every error promises, whatever the input.
fn check_error(input: &str, e: &TopicError) {
    assert!(input.starts_with(e.input()));
    assert!(e.input().len() <= 300);
    assert!(!e.to_string().is_empty());
    let at_and_ch = match *e.reason() {
        Reason::Wildcard { ch, at } | Reason::InvalidChar { ch, at } => Some((at, Some(ch))),
        Reason::Whitespace { at } | Reason::Control { at } => Some((at, None)),
        _ => None,
    };
    let index = match e.segment() {
        Segment::Qos => 0,
        Segment::Tenant => 1,
        Segment::Namespace => 2,
        Segment::Queue => 3,
        _ => return,
    };
    let seg = input.split('/').nth(index).expect("segment exists");
    if let Some((at, ch)) = at_and_ch {
        let found = seg[at..].chars().next().expect("offset inside the segment");
        if let Some(ch) = ch {
            assert_eq!(found, ch);
        }
        match e.reason() {
            Reason::Whitespace { .. } => assert!(found.is_whitespace()),
            Reason::Control { .. } => assert!(found.is_control()),
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// display ∘ parse is the identity on everything `Topic::new` accepts.
    #[test]
    fn new_display_parse_round_trip((qos, tenant, namespace, queue) in valid_parts()) {
        let t = Topic::new(qos, &tenant, &namespace, &queue).unwrap();
        prop_assert_eq!(t.qos(), qos);
        prop_assert_eq!(t.tenant(), tenant.as_str());
        prop_assert_eq!(t.namespace(), namespace.as_str());
        prop_assert_eq!(t.queue(), queue.as_str());
        let text = t.to_string();
        prop_assert_eq!(&text, &format!("{qos}/{tenant}/{namespace}/{queue}"));
        let back = Topic::parse(&text).unwrap();
        prop_assert_eq!(&back, &t);
        prop_assert_eq!(back.to_string(), text);
        for other in Qos::ALL {
            let u = t.with_qos(other);
            prop_assert_eq!(Topic::parse(u.as_str()).unwrap(), u);
        }
        let json = serde_json::to_string(&t).unwrap();
        prop_assert_eq!(serde_json::from_str::<Topic>(&json).unwrap(), t);
    }

    /// Parsing never panics on arbitrary Unicode, and what parses displays as its input.
    #[test]
    fn parse_any_string(s in any::<String>()) {
        match Topic::parse(&s) {
            Ok(t) => prop_assert_eq!(t.to_string(), s),
            Err(e) => check_error(&s, &e),
        }
    }

    /// Same on strings made of the characters that matter.
    #[test]
    fn parse_near_miss_strings(s in "[q0-3/a-z+# \t.:$-]{0,40}") {
        match Topic::parse(&s) {
            Ok(t) => {
                prop_assert_eq!(t.as_str(), s.as_str());
                let again = Topic::new(t.qos(), t.tenant(), t.namespace(), t.queue()).unwrap();
                prop_assert_eq!(again, t);
            }
            Err(e) => check_error(&s, &e),
        }
    }

    /// Same on well-formed topics with one character replaced by anything.
    #[test]
    fn parse_mutated_topics(
        (qos, tenant, namespace, queue) in valid_parts(),
        pos in any::<prop::sample::Index>(),
        ch in any::<char>(),
    ) {
        let text = format!("{qos}/{tenant}/{namespace}/{queue}");
        let chars: Vec<char> = text.chars().collect();
        let i = pos.index(chars.len());
        let mutated: String = chars[..i].iter().chain(std::iter::once(&ch)).chain(&chars[i + 1..]).collect();
        match Topic::parse(&mutated) {
            Ok(t) => prop_assert_eq!(t.as_str(), mutated.as_str()),
            Err(e) => check_error(&mutated, &e),
        }
    }

    /// `Topic::new` and the subscription check never panic either, and `new` only accepts
    /// what `parse` accepts.
    #[test]
    fn new_any_parts(tenant in any::<String>(), namespace in "\\PC{0,70}", queue in any::<String>()) {
        match Topic::new(Qos::Q1, &tenant, &namespace, &queue) {
            Ok(t) => prop_assert_eq!(Topic::parse(t.as_str()).unwrap(), t),
            Err(e) => prop_assert!(e.input().len() <= 300),
        }
        let _ = validate_subscription(&queue);
    }
}
