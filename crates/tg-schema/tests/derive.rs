//! What `#[message]` generates: user attributes kept, `with` fields left alone, option paths
//! recognised, enums, generics and the macro's arguments.

use std::collections::{BTreeMap, HashMap};

use tg_schema::{message, Codec, JsonCodec, Message};

#[track_caller]
fn encode<T: Message>(value: &T) -> String {
    String::from_utf8(JsonCodec.encode(value).expect("encode")).expect("utf-8")
}

#[track_caller]
fn decode<T: Message>(json: &str) -> T {
    JsonCodec
        .decode(json.as_bytes())
        .unwrap_or_else(|err| panic!("decoding {json}: {err}"))
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
struct Renamed {
    #[serde(rename = "x")]
    original: String,
    #[serde(rename = "y", alias = "why")]
    maybe: Option<u32>,
}

#[test]
fn user_rename_is_kept() {
    let v = Renamed {
        original: "a".into(),
        maybe: Some(2),
    };
    assert_eq!(encode(&v), r#"{"x":"a","y":2}"#);
    assert_eq!(decode::<Renamed>(r#"{"x":"a","y":2}"#), v);
    assert_eq!(decode::<Renamed>(r#"{"x":"a","why":2}"#), v);
    // The Rust name is not a wire name.
    assert_eq!(decode::<Renamed>(r#"{"original":"a"}"#), Renamed::default());
    assert_eq!(
        decode::<Renamed>(r#"{"x":null,"y":null}"#),
        Renamed::default()
    );
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
struct CamelCase {
    end_of_stream: bool,
    in_token: Option<i64>,
}

#[test]
fn user_container_attributes_are_kept() {
    let v = CamelCase {
        end_of_stream: true,
        in_token: None,
    };
    assert_eq!(encode(&v), r#"{"endOfStream":true}"#);
    assert_eq!(
        decode::<CamelCase>(r#"{"endOfStream":null,"inToken":3}"#),
        CamelCase {
            end_of_stream: false,
            in_token: Some(3)
        }
    );
}

mod upper {
    //! A serde-with module that upper-cases on the way out and errors on `null` on the way in,
    //! to prove `#[message]` does not wrap fields that bring their own deserializer.
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_uppercase())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(String::deserialize(d)?.to_lowercase())
    }
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
struct WithField {
    #[serde(with = "upper")]
    shout: String,
    #[serde(deserialize_with = "upper::deserialize")]
    quiet: String,
    plain: String,
}

#[test]
fn field_with_its_own_with_is_left_alone() {
    let v = WithField {
        shout: "hi".into(),
        quiet: "Q".into(),
        plain: "p".into(),
    };
    assert_eq!(encode(&v), r#"{"shout":"HI","quiet":"Q","plain":"p"}"#);
    assert_eq!(
        decode::<WithField>(r#"{"shout":"HI","quiet":"Q"}"#),
        WithField {
            shout: "hi".into(),
            quiet: "q".into(),
            plain: String::new(),
        }
    );
    // `plain` gets null handling ...
    assert_eq!(
        decode::<WithField>(r#"{"plain":null}"#),
        WithField::default()
    );
    // ... `shout` and `quiet` do not: their own deserializer sees the null and rejects it.
    let err = JsonCodec
        .decode::<WithField>(br#"{"shout":null}"#)
        .expect_err("null is not a string for `upper`");
    assert_eq!(err.path(), Some("shout"));
    let err = JsonCodec
        .decode::<WithField>(br#"{"quiet":null}"#)
        .expect_err("null is not a string for `upper`");
    assert_eq!(err.path(), Some("quiet"));
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
struct OptionSpellings {
    a: Option<u8>,
    b: std::option::Option<u8>,
    c: core::option::Option<u8>,
    d: ::std::option::Option<u8>,
}

#[test]
fn option_paths_are_recognised() {
    assert_eq!(encode(&OptionSpellings::default()), "{}");
    let all = OptionSpellings {
        a: Some(1),
        b: Some(2),
        c: Some(3),
        d: Some(4),
    };
    assert_eq!(encode(&all), r#"{"a":1,"b":2,"c":3,"d":4}"#);
    assert_eq!(
        decode::<OptionSpellings>(r#"{"a":null,"b":null,"c":null,"d":null}"#),
        OptionSpellings::default()
    );
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
struct Collections {
    list: Vec<String>,
    ordered: BTreeMap<String, Vec<u32>>,
    unordered: HashMap<String, Nested>,
    opt_list: Option<Vec<Nested>>,
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
struct Nested {
    n: u64,
    f: f32,
}

#[test]
fn collections_and_nested() {
    let v = Collections {
        list: vec!["a".into(), String::new()],
        ordered: BTreeMap::from([("k".into(), vec![1, 2])]),
        unordered: HashMap::from([("only".into(), Nested { n: 7, f: 0.25 })]),
        opt_list: Some(vec![]),
    };
    let json = encode(&v);
    assert_eq!(
        json,
        r#"{"list":["a",""],"ordered":{"k":[1,2]},"unordered":{"only":{"n":7,"f":0.25}},"opt_list":[]}"#
    );
    assert_eq!(decode::<Collections>(&json), v);
    assert_eq!(
        decode::<Collections>(r#"{"list":null,"ordered":null,"unordered":null,"opt_list":null}"#),
        Collections::default()
    );
    // `null` is read as a default for *fields*; inside a collection it is an element like any
    // other and must be of the element type.
    let err = JsonCodec
        .decode::<Collections>(br#"{"unordered":{"x":null}}"#)
        .expect_err("null is not a Nested");
    assert_eq!(err.path(), Some("unordered.x"));
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
struct Blobs {
    #[serde(with = "tg_schema::base64_bytes")]
    vec: Vec<u8>,
    #[serde(with = "tg_schema::base64_bytes")]
    bytes: bytes::Bytes,
    #[serde(with = "tg_schema::base64_bytes::option")]
    maybe: Option<Vec<u8>>,
    #[serde(with = "tg_schema::base64_bytes::option")]
    maybe_bytes: Option<bytes::Bytes>,
}

#[test]
fn base64_fields() {
    let v = Blobs {
        vec: b"abc".to_vec(),
        bytes: bytes::Bytes::from_static(b"\x00\xff"),
        maybe: None,
        maybe_bytes: Some(bytes::Bytes::new()),
    };
    let json = encode(&v);
    assert_eq!(json, r#"{"vec":"YWJj","bytes":"AP8=","maybe_bytes":""}"#);
    assert_eq!(decode::<Blobs>(&json), v);
    assert_eq!(
        decode::<Blobs>(r#"{"vec":null,"bytes":null,"maybe":null,"maybe_bytes":null}"#),
        Blobs::default()
    );
    assert_eq!(
        decode::<Blobs>(r#"{"maybe":"YQ=="}"#).maybe.as_deref(),
        Some(&b"a"[..])
    );
}

#[message]
#[derive(Debug, Clone, PartialEq)]
struct UserDefaults {
    #[serde(default = "five")]
    count: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    note: String,
    #[serde(skip)]
    local: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    opt: Option<u8>,
}

fn five() -> u32 {
    5
}

impl Default for UserDefaults {
    fn default() -> Self {
        UserDefaults {
            count: 1,
            note: String::new(),
            local: 9,
            opt: None,
        }
    }
}

#[test]
fn user_defaults_and_skips_are_kept() {
    // A hand-written Default works; field-level default beats the container's.
    let v: UserDefaults = decode("{}");
    assert_eq!(v.count, 5);
    assert_eq!(v.local, 9);
    let v = UserDefaults {
        count: 2,
        note: String::new(),
        local: 3,
        opt: Some(1),
    };
    assert_eq!(encode(&v), r#"{"count":2,"opt":1}"#);
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
struct Outer {
    id: String,
    #[serde(flatten)]
    inner: Inner,
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
struct Inner {
    a: u8,
    b: Option<u8>,
}

#[test]
fn flatten_is_left_to_serde() {
    let v = Outer {
        id: "i".into(),
        inner: Inner { a: 1, b: None },
    };
    assert_eq!(encode(&v), r#"{"id":"i","a":1}"#);
    assert_eq!(decode::<Outer>(r#"{"id":"i","a":1,"b":null}"#), v);
}

#[message]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
enum Priority {
    #[default]
    Normal,
    VeryHigh,
}

#[message]
#[derive(Debug, Clone, PartialEq)]
#[serde(tag = "kind")]
enum Event {
    Started { id: String },
    Stopped { id: String, code: i32 },
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
struct Job {
    priority: Priority,
    events: Vec<Event>,
}

#[test]
fn enums() {
    assert_eq!(Priority::NAME, "Priority");
    assert_eq!(encode(&Priority::VeryHigh), r#""very-high""#);
    assert_eq!(
        encode(&Event::Stopped {
            id: "x".into(),
            code: 1
        }),
        r#"{"kind":"Stopped","id":"x","code":1}"#
    );
    let job = Job {
        priority: Priority::VeryHigh,
        events: vec![Event::Started { id: "a".into() }],
    };
    let json = encode(&job);
    assert_eq!(
        json,
        r#"{"priority":"very-high","events":[{"kind":"Started","id":"a"}]}"#
    );
    assert_eq!(decode::<Job>(&json), job);
    assert_eq!(decode::<Job>(r#"{"priority":null}"#), Job::default());
}

#[message]
#[derive(Debug, Clone, PartialEq, Default)]
struct Envelope<T> {
    id: String,
    payload: T,
    extra: Option<T>,
}

#[test]
fn generic_messages() {
    assert_eq!(<Envelope<Nested> as Message>::NAME, "Envelope");
    let v = Envelope {
        id: "1".into(),
        payload: Nested { n: 1, f: 1.5 },
        extra: None,
    };
    let json = encode(&v);
    assert_eq!(json, r#"{"id":"1","payload":{"n":1,"f":1.5}}"#);
    assert_eq!(decode::<Envelope<Nested>>(&json), v);
    assert_eq!(
        decode::<Envelope<String>>(r#"{"payload":null,"extra":null}"#),
        Envelope::default()
    );
}

#[message(name = "custom-name")]
#[derive(Debug, Clone, PartialEq, Default)]
struct Named {}

#[test]
fn name_argument_and_empty_struct() {
    assert_eq!(Named::NAME, "custom-name");
    assert_eq!(encode(&Named {}), "{}");
    assert_eq!(decode::<Named>(r#"{"anything":[1]}"#), Named {});
}

mod reexport {
    //! `#[message(crate = ...)]` for when tg-schema is reached through another path.
    pub(crate) mod schema {
        pub(crate) use tg_schema::*;
    }
}

#[message(crate = reexport::schema)]
#[derive(Debug, Clone, PartialEq, Default)]
struct ThroughReexport {
    a: Option<u8>,
    b: bool,
}

#[message(crate = "crate::reexport::schema")]
#[derive(Debug, Clone, PartialEq, Default)]
struct ThroughReexportStr {
    a: String,
}

#[test]
fn crate_argument() {
    assert_eq!(encode(&ThroughReexport::default()), r#"{"b":false}"#);
    assert_eq!(
        decode::<ThroughReexport>(r#"{"b":null}"#),
        ThroughReexport::default()
    );
    assert_eq!(ThroughReexportStr::NAME, "ThroughReexportStr");
    assert_eq!(decode::<ThroughReexportStr>(r#"{"a":null}"#).a, "");
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct PlainSerde {
    a: u8,
}
tg_schema::impl_message!(PlainSerde);

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct PlainSerde2(u8);
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct PlainSerde3(u8);
tg_schema::impl_message!(PlainSerde2, PlainSerde3,);
mod plain {
    #[derive(serde::Serialize, serde::Deserialize)]
    pub(crate) struct Listed(pub(crate) Vec<u8>);
}
tg_schema::impl_message!(plain::Listed, "plain-list");

#[test]
fn impl_message_macro() {
    assert_eq!(PlainSerde::NAME, "PlainSerde");
    assert_eq!(PlainSerde2::NAME, "PlainSerde2");
    assert_eq!(PlainSerde3::NAME, "PlainSerde3");
    assert_eq!(<plain::Listed as Message>::NAME, "plain-list");
    // No #[message] leniency: plain serde rules.
    assert!(JsonCodec.decode::<PlainSerde>(b"{}").is_err());
    assert_eq!(encode(&PlainSerde2(3)), "3");
}

#[test]
fn messages_are_send_sync_static() {
    fn assert_message<T: Message + Send + Sync + 'static>() {}
    assert_message::<Renamed>();
    assert_message::<Envelope<Nested>>();
    assert_message::<tg_schema::trustgraph::TextCompletionResponse>();
}

#[derive(Debug, Clone, PartialEq, Default)]
#[message]
struct DeriveFirst {
    a: Option<u8>,
    b: String,
}

#[test]
fn derive_before_message_works_too() {
    assert_eq!(encode(&DeriveFirst::default()), r#"{"b":""}"#);
    assert_eq!(
        decode::<DeriveFirst>(r#"{"b":null}"#),
        DeriveFirst::default()
    );
}
