//! Golden JSON: `JsonCodec.encode` produces exactly these bytes (field order = declaration order,
//! `None` omitted, empty values written), and decoding them gives the value back.

use std::collections::BTreeMap;

mod common;

use common::{
    Document, EmbeddingsRequest, EmbeddingsResponse, Error, GraphQuery, Metadata,
    TextCompletionRequest, TextCompletionResponse, Triple, Triples, Value,
};
use tg_schema::{Codec, JsonCodec, Message};

/// Encodes `value`, checks the bytes, decodes them and checks the value comes back.
#[track_caller]
fn golden<T: Message + PartialEq + std::fmt::Debug>(value: &T, expected: &str) {
    let bytes = JsonCodec.encode(value).expect("encode");
    assert_eq!(
        std::str::from_utf8(&bytes).expect("utf-8"),
        expected,
        "encoding of {}",
        T::NAME
    );
    let back: T = JsonCodec.decode(expected.as_bytes()).expect("decode");
    assert_eq!(&back, value, "round trip of {}", T::NAME);
}

fn uri(v: &str) -> Value {
    Value {
        value: v.into(),
        is_uri: true,
    }
}

fn lit(v: &str) -> Value {
    Value {
        value: v.into(),
        is_uri: false,
    }
}

#[test]
fn text_completion_request_none_metadata_is_omitted() {
    golden(
        &TextCompletionRequest {
            system: "s".into(),
            prompt: "p".into(),
            streaming: false,
            metadata: None,
        },
        r#"{"system":"s","prompt":"p","streaming":false}"#,
    );
}

#[test]
fn text_completion_request_empty_metadata_is_written() {
    golden(
        &TextCompletionRequest {
            system: "s".into(),
            prompt: "p".into(),
            streaming: true,
            metadata: Some(BTreeMap::new()),
        },
        r#"{"system":"s","prompt":"p","streaming":true,"metadata":{}}"#,
    );
}

#[test]
fn text_completion_request_metadata_entries_in_key_order() {
    let metadata = BTreeMap::from([
        ("user".to_string(), "alice".to_string()),
        ("flow".to_string(), "default".to_string()),
    ]);
    golden(
        &TextCompletionRequest {
            system: String::new(),
            prompt: "why?".into(),
            streaming: false,
            metadata: Some(metadata),
        },
        r#"{"system":"","prompt":"why?","streaming":false,"metadata":{"flow":"default","user":"alice"}}"#,
    );
}

#[test]
fn default_values_are_all_written() {
    golden(
        &TextCompletionRequest::default(),
        r#"{"system":"","prompt":"","streaming":false}"#,
    );
    golden(&GraphQuery::default(), r#"{"triples":[]}"#);
    golden(
        &TextCompletionResponse::default(),
        r#"{"response":"","end_of_stream":false}"#,
    );
    golden(&EmbeddingsResponse::default(), r#"{"vectors":[]}"#);
}

#[test]
fn graph_query_nested_triples() {
    golden(
        &GraphQuery {
            triples: vec![Triple {
                s: uri("http://ex/a"),
                p: uri("http://ex/name"),
                o: lit("A \"quoted\" name"),
            }],
            metadata: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
        },
        concat!(
            r#"{"triples":[{"s":{"value":"http://ex/a","is_uri":true},"#,
            r#""p":{"value":"http://ex/name","is_uri":true},"#,
            r#""o":{"value":"A \"quoted\" name","is_uri":false}}],"#,
            r#""metadata":{"k":"v"}}"#
        ),
    );
}

#[test]
fn triples_with_metadata() {
    golden(
        &Triples {
            metadata: Metadata {
                id: "doc-1".into(),
                root: "root-1".into(),
                user: "trustgraph".into(),
                collection: "default".into(),
            },
            triples: vec![Triple {
                s: uri("a"),
                p: uri("b"),
                o: lit("c"),
            }],
        },
        concat!(
            r#"{"metadata":{"id":"doc-1","root":"root-1","user":"trustgraph","collection":"default"},"#,
            r#""triples":[{"s":{"value":"a","is_uri":true},"p":{"value":"b","is_uri":true},"#,
            r#""o":{"value":"c","is_uri":false}}]}"#
        ),
    );
}

#[test]
fn error_kind_is_renamed_to_type() {
    golden(
        &Error {
            kind: "llm-error".into(),
            message: "boom".into(),
        },
        r#"{"type":"llm-error","message":"boom"}"#,
    );
}

#[test]
fn text_completion_response_full_and_partial() {
    golden(
        &TextCompletionResponse {
            error: None,
            response: "Hi".into(),
            in_token: Some(12),
            out_token: Some(0),
            model: Some("gpt".into()),
            end_of_stream: true,
        },
        r#"{"response":"Hi","in_token":12,"out_token":0,"model":"gpt","end_of_stream":true}"#,
    );
    golden(
        &TextCompletionResponse {
            error: Some(Error {
                kind: "rate-limit".into(),
                message: String::new(),
            }),
            response: String::new(),
            in_token: None,
            out_token: Some(-1),
            model: Some(String::new()),
            end_of_stream: false,
        },
        r#"{"error":{"type":"rate-limit","message":""},"response":"","out_token":-1,"model":"","end_of_stream":false}"#,
    );
}

#[test]
fn document_bytes_are_base64() {
    golden(
        &Document {
            metadata: Metadata::default(),
            data: vec![0, 1, 2, 0xfe, 0xff],
        },
        r#"{"metadata":{"id":"","root":"","user":"","collection":""},"data":"AAEC/v8="}"#,
    );
    golden(
        &Document {
            metadata: Metadata {
                id: "d".into(),
                ..Default::default()
            },
            data: Vec::new(),
        },
        r#"{"metadata":{"id":"d","root":"","user":"","collection":""},"data":""}"#,
    );
}

#[test]
fn embeddings_floats() {
    golden(
        &EmbeddingsRequest {
            text: "héllo\n".into(),
        },
        r#"{"text":"héllo\n"}"#,
    );
    golden(
        &EmbeddingsResponse {
            error: None,
            vectors: vec![vec![0.5, -1.0, 1e-7], vec![], vec![3.25]],
        },
        r#"{"vectors":[[0.5,-1.0,1e-7],[],[3.25]]}"#,
    );
}

#[test]
fn content_type_is_json() {
    assert_eq!(JsonCodec.content_type(), "application/json");
}

#[test]
fn untyped_messages() {
    assert_eq!(<serde_json::Value as Message>::NAME, "json");
    assert_eq!(<String as Message>::NAME, "string");
    golden(
        &serde_json::json!({"a": [1, null, "x"]}),
        r#"{"a":[1,null,"x"]}"#,
    );
    golden(&"plain \"text\"".to_string(), r#""plain \"text\"""#);
}
