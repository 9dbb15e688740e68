//! Fixture types of the codec tests, declared with `#[message]`: shaped like framework messages
//! of an earlier version (the framework's own types are generated into `tg_schema::trustgraph`),
//! they exercise what `#[message]` does with nested types, maps, options and base64 bytes.
#![allow(dead_code)] // each test file uses some of the fixtures Field names are the
//! ones TrustGraph puts on the wire; `Option` fields are omitted from the JSON when `None`; every
//! field reads leniently (absent or `null` → default).

use std::collections::BTreeMap;

use tg_schema::message;

/// An RDF term: a URI (`is_uri`) or a literal.
#[message]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct Value {
    /// The URI or the literal text.
    pub(crate) value: String,
    /// Whether `value` is a URI rather than a literal.
    pub(crate) is_uri: bool,
}

/// An RDF triple of nested [`Value`]s.
#[message]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct Triple {
    /// Subject.
    pub(crate) s: Value,
    /// Predicate.
    pub(crate) p: Value,
    /// Object.
    pub(crate) o: Value,
}

/// A graph query: a list of triple patterns with optional metadata (the nested-types example of
/// the schema design).
#[message]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct GraphQuery {
    /// The triple patterns.
    pub(crate) triples: Vec<Triple>,
    /// Free-form metadata. `None` is omitted from the JSON; `Some(empty)` is written as `{}`.
    pub(crate) metadata: Option<BTreeMap<String, String>>,
}

/// A request to an LLM text-completion service (the optional-fields example of the schema
/// design).
#[message]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TextCompletionRequest {
    /// The system prompt.
    pub(crate) system: String,
    /// The user prompt.
    pub(crate) prompt: String,
    /// Whether the response should be streamed as several [`TextCompletionResponse`]s.
    pub(crate) streaming: bool,
    /// Free-form metadata; omitted when `None`, written as `{}` when empty.
    pub(crate) metadata: Option<BTreeMap<String, String>>,
}

/// TrustGraph's error record, carried in the `error` field of responses.
///
/// The wire name of [`kind`](Error::kind) is `type` (a Rust keyword), which shows
/// `#[serde(rename = ...)]` under `#[message]`.
#[message]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct Error {
    /// The error kind (`"type"` on the wire), e.g. `"llm-error"`, `"rate-limit"`.
    #[serde(rename = "type")]
    pub(crate) kind: String,
    /// Human-readable description.
    pub(crate) message: String,
}

/// A response (or, when streaming, one chunk of a response) from a text-completion service.
#[message]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TextCompletionResponse {
    /// Set when the request failed.
    pub(crate) error: Option<Error>,
    /// The completion text (or this chunk of it).
    pub(crate) response: String,
    /// Input tokens used, when the service reports it.
    pub(crate) in_token: Option<i64>,
    /// Output tokens produced, when the service reports it.
    pub(crate) out_token: Option<i64>,
    /// The model that answered, when known.
    pub(crate) model: Option<String>,
    /// Whether this is the last chunk of a streamed response.
    pub(crate) end_of_stream: bool,
}

/// Where a piece of knowledge comes from and whom it belongs to.
#[message]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct Metadata {
    /// Source identifier.
    pub(crate) id: String,
    /// Identifier of the root document this item derives from.
    pub(crate) root: String,
    /// Owning user.
    pub(crate) user: String,
    /// Collection within the user's data.
    pub(crate) collection: String,
}

/// A batch of triples extracted from a source.
#[message]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Triples {
    /// Where the triples come from.
    pub(crate) metadata: Metadata,
    /// The triples.
    pub(crate) triples: Vec<Triple>,
}

/// A raw document (PDF, text, ...) entering the pipeline; `data` travels as base64.
#[message]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Document {
    /// Where the document comes from.
    pub(crate) metadata: Metadata,
    /// The document's bytes, base64 on the wire (`null` reads as empty).
    #[serde(with = "tg_schema::base64_bytes")]
    pub(crate) data: Vec<u8>,
}

/// A request to an embeddings service.
#[message]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct EmbeddingsRequest {
    /// The text to embed.
    pub(crate) text: String,
}

/// The answer of an embeddings service: one vector per chunk of the input.
#[message]
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct EmbeddingsResponse {
    /// Set when the request failed.
    pub(crate) error: Option<Error>,
    /// The embedding vectors.
    pub(crate) vectors: Vec<Vec<f64>>,
}
