//! Codec errors name the type, the direction and the field path.

use std::collections::BTreeMap;
use std::error::Error as _;

mod common;

use common::{Document, GraphQuery, TextCompletionRequest, Triples};
use tg_schema::{message, Codec, CodecError, Direction, JsonCodec};

fn decode_err<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: &str) -> CodecError {
    JsonCodec
        .decode::<T>(json.as_bytes())
        .expect_err("decoding should fail")
}

#[test]
fn wrong_type_names_type_and_field() {
    let err = decode_err::<TextCompletionRequest>(r#"{"system":"s","streaming":"yes"}"#);
    assert_eq!(err.direction(), Direction::Decode);
    assert_eq!(err.type_name(), "TextCompletionRequest");
    assert_eq!(err.path(), Some("streaming"));
    assert_eq!(
        err.to_string(),
        r#"cannot decode TextCompletionRequest: field "streaming": invalid type: string "yes", expected a boolean at line 1 column 31"#
    );
    // The serde_json error is the source.
    let source = err.source().expect("source");
    assert!(source.is::<serde_json::Error>(), "{source:?}");
}

#[test]
fn nested_path() {
    let err = decode_err::<GraphQuery>(
        r#"{"triples":[{"s":{"value":"a","is_uri":"no"},"p":{},"o":{}}]}"#,
    );
    assert_eq!(err.type_name(), "GraphQuery");
    assert_eq!(err.path(), Some("triples[0].s.is_uri"));
    let text = err.to_string();
    assert!(
        text.starts_with(r#"cannot decode GraphQuery: field "triples[0].s.is_uri": invalid type: string "no", expected a boolean"#),
        "{text}"
    );

    let err = decode_err::<Triples>(r#"{"triples":[{},{"o":{"value":7}}]}"#);
    assert_eq!(err.path(), Some("triples[1].o.value"));
    assert!(
        err.to_string()
            .contains("invalid type: integer `7`, expected a string"),
        "{err}"
    );
}

#[test]
fn map_value_path() {
    let err = decode_err::<GraphQuery>(r#"{"metadata":{"k":1}}"#);
    assert_eq!(err.path(), Some("metadata.k"));
}

#[test]
fn not_json_names_the_type() {
    let err = decode_err::<TextCompletionRequest>("hello");
    assert_eq!(err.direction(), Direction::Decode);
    assert_eq!(err.path(), None);
    assert_eq!(
        err.to_string(),
        "cannot decode TextCompletionRequest: expected value at line 1 column 1"
    );

    let err = JsonCodec
        .decode::<TextCompletionRequest>(&[0xff, 0xfe])
        .expect_err("binary is not JSON");
    assert!(
        err.to_string()
            .starts_with("cannot decode TextCompletionRequest: "),
        "{err}"
    );

    let err = decode_err::<TextCompletionRequest>("");
    assert_eq!(
        err.to_string(),
        "cannot decode TextCompletionRequest: EOF while parsing a value at line 1 column 0"
    );
}

#[test]
fn wrong_top_level_type() {
    let err = decode_err::<TextCompletionRequest>("42");
    assert_eq!(err.path(), None);
    assert_eq!(
        err.to_string(),
        "cannot decode TextCompletionRequest: invalid type: integer `42`, expected struct TextCompletionRequest at line 1 column 2"
    );
}

#[test]
fn trailing_characters() {
    let err = decode_err::<TextCompletionRequest>(r#"{"prompt":"p"} x"#);
    assert_eq!(err.path(), None);
    assert_eq!(
        err.to_string(),
        "cannot decode TextCompletionRequest: trailing characters at line 1 column 16"
    );
}

#[test]
fn truncated_input() {
    let err = decode_err::<TextCompletionRequest>(r#"{"system":"s","prompt":"#);
    assert!(err.to_string().contains("EOF while parsing"), "{err}");
}

#[test]
fn invalid_base64_names_the_field() {
    let err = decode_err::<Document>(r#"{"data":"not base64!"}"#);
    assert_eq!(err.path(), Some("data"));
    assert!(err.to_string().contains("invalid base64"), "{err}");
}

#[test]
fn generic_type_names_are_shortened() {
    let err = decode_err::<Vec<GraphQuery>>(r#"[{"triples":1}]"#);
    assert_eq!(err.type_name(), "Vec<errors::common::GraphQuery>");
    assert_eq!(err.path(), Some("[0].triples"));
}

#[message]
#[derive(Debug, Default)]
struct IntKeyed {
    map: BTreeMap<Vec<u8>, u8>,
}

#[test]
fn encode_error_names_type_and_field() {
    let value = IntKeyed {
        map: BTreeMap::from([(vec![1], 1)]),
    };
    let err = JsonCodec.encode(&value).expect_err("non-string keys");
    assert_eq!(err.direction(), Direction::Encode);
    assert_eq!(err.type_name(), "IntKeyed");
    assert_eq!(err.path(), Some("map"));
    assert_eq!(
        err.to_string(),
        r#"cannot encode IntKeyed: field "map": key must be a string"#
    );
}

#[test]
fn custom_codec_errors() {
    let err = CodecError::new::<TextCompletionRequest>(Direction::Encode, None, "too large");
    assert_eq!(
        err.to_string(),
        "cannot encode TextCompletionRequest: too large"
    );
    let err = CodecError::new::<str>(Direction::Decode, Some("a.b".into()), "bad");
    assert_eq!(err.to_string(), r#"cannot decode str: field "a.b": bad"#);
}
