//! Lenient decoding: unknown keys ignored, missing keys default, `null` → `None` / default, and
//! JSON as the Python framework writes it decodes.

use std::collections::BTreeMap;

mod common;

use common::{
    Document, EmbeddingsResponse, Error, GraphQuery, Metadata, TextCompletionRequest,
    TextCompletionResponse, Triple, Triples, Value,
};
use tg_schema::{Codec, JsonCodec, Message};

#[track_caller]
fn decode<T: Message>(json: &str) -> T {
    JsonCodec
        .decode(json.as_bytes())
        .unwrap_or_else(|err| panic!("decoding {json}: {err}"))
}

#[test]
fn unknown_keys_are_ignored() {
    let req: TextCompletionRequest = decode(
        r#"{"system":"s","future_field":{"deep":[1,2,{"x":null}]},"prompt":"p","streaming":true,"zzz":1.5}"#,
    );
    assert_eq!(
        req,
        TextCompletionRequest {
            system: "s".into(),
            prompt: "p".into(),
            streaming: true,
            metadata: None,
        }
    );
}

#[test]
fn missing_keys_take_defaults() {
    assert_eq!(decode::<TextCompletionRequest>("{}"), Default::default());
    assert_eq!(decode::<GraphQuery>("{}"), Default::default());
    assert_eq!(decode::<Triples>("{}"), Default::default());
    assert_eq!(decode::<Document>("{}"), Default::default());

    let resp: TextCompletionResponse = decode(r#"{"response":"r"}"#);
    assert_eq!(
        resp,
        TextCompletionResponse {
            response: "r".into(),
            ..Default::default()
        }
    );

    // Missing keys inside nested structs too.
    let q: GraphQuery = decode(r#"{"triples":[{"s":{"value":"a"},"o":{}}]}"#);
    assert_eq!(
        q.triples,
        vec![Triple {
            s: Value {
                value: "a".into(),
                is_uri: false
            },
            ..Default::default()
        }]
    );
}

#[test]
fn null_reads_as_none_for_options() {
    let req: TextCompletionRequest =
        decode(r#"{"system":"s","prompt":"p","streaming":false,"metadata":null}"#);
    assert_eq!(req.metadata, None);

    let resp: TextCompletionResponse = decode(
        r#"{"error":null,"response":"x","in_token":null,"out_token":null,"model":null,"end_of_stream":true}"#,
    );
    assert_eq!(
        resp,
        TextCompletionResponse {
            response: "x".into(),
            end_of_stream: true,
            ..Default::default()
        }
    );
}

#[test]
fn null_reads_as_default_for_plain_fields() {
    // String and bool.
    let req: TextCompletionRequest =
        decode(r#"{"system":null,"prompt":null,"streaming":null,"metadata":{}}"#);
    assert_eq!(
        req,
        TextCompletionRequest {
            metadata: Some(BTreeMap::new()),
            ..Default::default()
        }
    );
    // Vec and nested struct.
    let t: Triples = decode(r#"{"metadata":null,"triples":null}"#);
    assert_eq!(t, Triples::default());
    // Nested struct fields, inside a Vec.
    let q: GraphQuery = decode(r#"{"triples":[{"s":null,"p":{"value":null,"is_uri":null}}]}"#);
    assert_eq!(q.triples, vec![Triple::default()]);
    // Vec of Vec of floats; integers read as floats.
    let e: EmbeddingsResponse = decode(r#"{"error":null,"vectors":null}"#);
    assert_eq!(e, EmbeddingsResponse::default());
    let e: EmbeddingsResponse = decode(r#"{"vectors":[[1,2.5],[]]}"#);
    assert_eq!(e.vectors, vec![vec![1.0, 2.5], vec![]]);
    // Bytes.
    let d: Document = decode(r#"{"metadata":{"id":null},"data":null}"#);
    assert_eq!(d, Document::default());
}

#[test]
fn options_hold_empty_values() {
    let resp: TextCompletionResponse =
        decode(r#"{"model":"","in_token":0,"error":{"type":"","message":""}}"#);
    assert_eq!(resp.model.as_deref(), Some(""));
    assert_eq!(resp.in_token, Some(0));
    assert_eq!(resp.error, Some(Error::default()));
}

#[test]
fn python_framework_output_decodes() {
    // json.dumps(dataclasses.asdict(...)) in the Python framework: spaces, nulls for None,
    // fields this side does not know, keys in another order.
    let from_python = br#"{
        "metadata": {"id": "doc-7", "metadata": [], "user": "trustgraph", "collection": "default", "root": null},
        "triples": [
            {"s": {"value": "http://ex/a", "is_uri": true},
             "p": {"value": "http://ex/b", "is_uri": true},
             "o": {"value": "lit", "is_uri": false, "datatype": null},
             "g": null}
        ]
    }"#;
    let t: Triples = JsonCodec.decode(from_python).expect("decode");
    assert_eq!(
        t,
        Triples {
            metadata: Metadata {
                id: "doc-7".into(),
                root: String::new(),
                user: "trustgraph".into(),
                collection: "default".into(),
            },
            triples: vec![Triple {
                s: Value {
                    value: "http://ex/a".into(),
                    is_uri: true
                },
                p: Value {
                    value: "http://ex/b".into(),
                    is_uri: true
                },
                o: Value {
                    value: "lit".into(),
                    is_uri: false
                },
            }],
        }
    );

    let resp: TextCompletionResponse = JsonCodec
        .decode(
            br#"{"error": null, "response": "Paris", "in_token": 10, "out_token": 1, "model": "claude", "end_of_stream": null, "extra": "x"}"#,
        )
        .expect("decode");
    assert_eq!(
        resp,
        TextCompletionResponse {
            error: None,
            response: "Paris".into(),
            in_token: Some(10),
            out_token: Some(1),
            model: Some("claude".into()),
            end_of_stream: false,
        }
    );

    let err: TextCompletionResponse = JsonCodec
        .decode(br#"{"error": {"type": "llm-error", "message": "overloaded"}, "response": null}"#)
        .expect("decode");
    assert_eq!(
        err.error,
        Some(Error {
            kind: "llm-error".into(),
            message: "overloaded".into()
        })
    );
    assert_eq!(err.response, "");
}

#[test]
fn base64_is_lenient_about_padding() {
    let padded: Document = decode(r#"{"data":"aGk="}"#);
    let unpadded: Document = decode(r#"{"data":"aGk"}"#);
    assert_eq!(padded.data, b"hi");
    assert_eq!(unpadded.data, b"hi");
    // A plain serde byte array is accepted too.
    let array: Document = decode(r#"{"data":[104,105]}"#);
    assert_eq!(array.data, b"hi");
}

#[test]
fn whitespace_around_the_value_is_fine() {
    let req: TextCompletionRequest = decode(" \n {\"prompt\" : \"p\"} \n");
    assert_eq!(req.prompt, "p");
}
