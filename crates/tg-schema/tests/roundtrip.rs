//! Property tests: `decode(encode(x)) == x`, and `None` never reaches the wire.

use std::collections::BTreeMap;

use proptest::prelude::*;
mod common;

use common::{
    EmbeddingsResponse, Error, GraphQuery, TextCompletionRequest, TextCompletionResponse, Triple,
    Value,
};
use tg_schema::{Codec, JsonCodec};

fn value() -> impl Strategy<Value = Value> {
    (any::<String>(), any::<bool>()).prop_map(|(value, is_uri)| Value { value, is_uri })
}

fn triple() -> impl Strategy<Value = Triple> {
    (value(), value(), value()).prop_map(|(s, p, o)| Triple { s, p, o })
}

fn metadata() -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
    proptest::option::of(proptest::collection::btree_map(
        any::<String>(),
        any::<String>(),
        0..4,
    ))
}

fn graph_query() -> impl Strategy<Value = GraphQuery> {
    (proptest::collection::vec(triple(), 0..5), metadata())
        .prop_map(|(triples, metadata)| GraphQuery { triples, metadata })
}

fn text_completion_request() -> impl Strategy<Value = TextCompletionRequest> {
    (any::<String>(), any::<String>(), any::<bool>(), metadata()).prop_map(
        |(system, prompt, streaming, metadata)| TextCompletionRequest {
            system,
            prompt,
            streaming,
            metadata,
        },
    )
}

fn text_completion_response() -> impl Strategy<Value = TextCompletionResponse> {
    (
        proptest::option::of(
            (any::<String>(), any::<String>()).prop_map(|(kind, message)| Error { kind, message }),
        ),
        any::<String>(),
        any::<Option<i64>>(),
        any::<Option<i64>>(),
        any::<Option<String>>(),
        any::<bool>(),
    )
        .prop_map(
            |(error, response, in_token, out_token, model, end_of_stream)| TextCompletionResponse {
                error,
                response,
                in_token,
                out_token,
                model,
                end_of_stream,
            },
        )
}

proptest! {
    #[test]
    fn graph_query_round_trips(q in graph_query()) {
        let bytes = JsonCodec.encode(&q).unwrap();
        let back: GraphQuery = JsonCodec.decode(&bytes).unwrap();
        prop_assert_eq!(back, q);
    }

    #[test]
    fn text_completion_request_round_trips(r in text_completion_request()) {
        let bytes = JsonCodec.encode(&r).unwrap();
        let back: TextCompletionRequest = JsonCodec.decode(&bytes).unwrap();
        prop_assert_eq!(&back, &r);
        // `None` is omitted, `Some` is written, never as `null`.
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let object = json.as_object().unwrap();
        prop_assert_eq!(object.contains_key("metadata"), r.metadata.is_some());
        prop_assert!(object.values().all(|v| !v.is_null()));
    }

    #[test]
    fn text_completion_response_round_trips(r in text_completion_response()) {
        let bytes = JsonCodec.encode(&r).unwrap();
        let back: TextCompletionResponse = JsonCodec.decode(&bytes).unwrap();
        prop_assert_eq!(&back, &r);
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        prop_assert!(json.as_object().unwrap().values().all(|v| !v.is_null()));
    }

    /// What the Python framework writes (None as `null`) decodes to the same value.
    #[test]
    fn python_style_nulls_decode_the_same(r in text_completion_response()) {
        let mut json = serde_json::to_value(&r).unwrap();
        let object = json.as_object_mut().unwrap();
        for key in ["error", "in_token", "out_token", "model"] {
            object.entry(key).or_insert(serde_json::Value::Null);
        }
        let bytes = serde_json::to_vec(&json).unwrap();
        let back: TextCompletionResponse = JsonCodec.decode(&bytes).unwrap();
        prop_assert_eq!(back, r);
    }

    /// Floats survive bit for bit (serde_json's `float_roundtrip`), as in Python.
    #[test]
    fn embeddings_round_trip_exactly(
        vectors in proptest::collection::vec(
            proptest::collection::vec(
                prop_oneof![
                    -1.0f64..1.0,
                    proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO,
                ],
                0..50,
            ),
            0..4,
        )
    ) {
        let resp = EmbeddingsResponse { error: None, vectors };
        let bytes = JsonCodec.encode(&resp).unwrap();
        let back: EmbeddingsResponse = JsonCodec.decode(&bytes).unwrap();
        let bits = |r: &EmbeddingsResponse| -> Vec<Vec<u64>> {
            r.vectors.iter().map(|v| v.iter().map(|f| f.to_bits()).collect()).collect()
        };
        prop_assert_eq!(bits(&back), bits(&resp));
    }

    /// Bytes survive base64 both ways.
    #[test]
    fn document_round_trips(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let doc = common::Document { data, ..Default::default() };
        let bytes = JsonCodec.encode(&doc).unwrap();
        let back: common::Document = JsonCodec.decode(&bytes).unwrap();
        prop_assert_eq!(back, doc);
    }
}
