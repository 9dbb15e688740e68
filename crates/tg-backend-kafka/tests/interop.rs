//! Wire interop with the Python framework (trustgraph-base 2.11.1, its Kafka backend on
//! aiokafka) on the same broker: raw JSON payloads, the `id` property as a record header, its
//! topic names and consumer groups.
//!
//! | framework queue | Kafka topic | tg topic |
//! |---|---|---|
//! | `flow:tg:NAME` | `tg.flow.NAME` (`:` in NAME as `.`) | `q1/tg/flow/NAME` |
//! | `request:tg:NAME` | `tg.request.NAME` | `q0/tg/request/NAME` |
//! | `response:tg:NAME` | `tg.response.NAME` | `q0/tg/response/NAME` |
//!
//! Needs `KAFKA_URL`, `KAFKA_BOOTSTRAP_SERVERS` (the same broker as the framework names it) and
//! `KAFKA_PYTHON` (a python with trustgraph-base and aiokafka), all set by `cargo xtask test
//! kafka`. Without them the tests say why and pass, except under `CI=true`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tg_backend_api::{Backend, BackendExt, ConsumerOptions, Properties, Topic};
use tg_backend_api::{QueueId, TypedMessage};
use tg_backend_kafka::{KafkaBackend, KafkaConfig};
use tg_schema::trustgraph::{
    EmbeddingsRequest, Metadata, Term, TextCompletionRequest, TextCompletionResponse, Triple,
    Triples,
};
use tg_schema::{Codec, JsonCodec};
use tg_testkit::support::skip;

struct Env {
    kafka_url: String,
    bootstrap: String,
    python: String,
}

fn env() -> Option<Env> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("KAFKA_URL"),
        get("KAFKA_BOOTSTRAP_SERVERS"),
        get("KAFKA_PYTHON"),
    ) {
        (Some(kafka_url), Some(bootstrap), Some(python)) => Some(Env {
            kafka_url,
            bootstrap,
            python,
        }),
        _ => {
            skip("KAFKA_URL, KAFKA_BOOTSTRAP_SERVERS and KAFKA_PYTHON are not all set (run `cargo xtask test kafka`)");
            None
        }
    }
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("interop")
        .join(name)
}

/// Runs a script of tests/interop with the venv's python; its stdout lines.
async fn python(python: &str, name: &str, args: Vec<String>) -> Vec<String> {
    let python = python.to_owned();
    let path = script(name);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(&path)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python} {}: {e}", path.display()))
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn backend(env: &Env) -> KafkaBackend {
    KafkaBackend::connect(KafkaConfig::from_url(&env.kafka_url).unwrap())
        .await
        .unwrap()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    )
}

/// (1) The framework's producer sends a TextCompletionRequest on
/// `flow:tg:text-completion-request:ws1:default`; a tg-pubsub consumer of
/// `q1/tg/flow/text-completion-request:ws1:default` decodes it into our struct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_to_rust_consumer() {
    let Some(env) = env() else { return };
    let backend = backend(&env).await;
    let topic = Topic::parse("q1/tg/flow/text-completion-request:ws1:default").unwrap();
    let consumer = backend
        .typed_consumer::<TextCompletionRequest>(&topic, ConsumerOptions::new(unique("rust-llm")))
        .await
        .unwrap();
    let id = unique("req");
    let lines = python(
        &env.python,
        "produce_request.py",
        vec![
            env.bootstrap.clone(),
            "flow:tg:text-completion-request:ws1:default".into(),
            "what is a graph?".into(),
            id.clone(),
        ],
    )
    .await;
    assert_eq!(lines, ["sent"]);
    let got = consumer.receive(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        got.value(),
        &TextCompletionRequest {
            system: "be brief".into(),
            prompt: "what is a graph?".into(),
            streaming: true,
            ..Default::default()
        }
    );
    assert_eq!(got.property("id"), Some(id.as_str()));
    // the framework writes `null` for None and fields we do not have: both are accepted
    let raw = String::from_utf8_lossy(got.message().payload()).into_owned();
    assert!(raw.contains("\"response_format\": null"), "{raw}");
    consumer.acknowledge(&got).await.unwrap();
    backend.close().await.unwrap();
}

/// (2) A tg-pubsub service answers the framework's RequestResponseClient: it consumes
/// `q0/tg/request/text-completion:ws1:default` and replies on the response queue with the
/// request's `id` property copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_service_answers_python_request_response_client() {
    let Some(env) = env() else { return };
    let backend = backend(&env).await;
    let name = unique("text-completion");
    let request_topic = Topic::parse(&format!("q0/tg/request/{name}:ws1:default")).unwrap();
    let response_topic = Topic::parse(&format!("q0/tg/response/{name}:ws1:default")).unwrap();
    let requests = backend
        .typed_consumer::<TextCompletionRequest>(&request_topic, ConsumerOptions::new("llm"))
        .await
        .unwrap();
    let responses = backend
        .typed_producer::<TextCompletionResponse>(&response_topic)
        .await
        .unwrap();
    let service = tokio::spawn(async move {
        let request = requests.receive(Duration::from_secs(80)).await.unwrap();
        let id = request
            .property("id")
            .expect("the request has an id")
            .to_owned();
        let reply = TextCompletionResponse {
            response: format!("echo: {}", request.value().prompt),
            model: Some("tg-pubsub-rust".into()),
            end_of_stream: true,
            ..Default::default()
        };
        let props: Properties = [("id".to_owned(), id.clone())].into();
        responses.send_with(&reply, props).await.unwrap();
        requests.acknowledge(&request).await.unwrap();
        id
    });
    let lines = python(
        &env.python,
        "request_response.py",
        vec![
            env.bootstrap.clone(),
            format!("request:tg:{name}:ws1:default"),
            format!("response:tg:{name}:ws1:default"),
            "ping".into(),
        ],
    )
    .await;
    let id = service.await.unwrap();
    assert!(!id.is_empty());
    let response: serde_json::Value =
        serde_json::from_str(lines.last().expect("a response line")).unwrap();
    assert_eq!(response["response"], "echo: ping", "{response}");
    assert_eq!(response["model"], "tg-pubsub-rust", "{response}");
    assert_eq!(response["end_of_stream"], true, "{response}");
    assert!(response["error"].is_null(), "{response}");
    backend.close().await.unwrap();
}

/// (3) A tg-pubsub producer's message decodes in the framework's consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_producer_to_python_consumer() {
    let Some(env) = env() else { return };
    let backend = backend(&env).await;
    let name = unique("text-completion-request");
    let topic = Topic::parse(&format!("q1/tg/flow/{name}:ws1:default")).unwrap();
    let producer = backend
        .typed_producer::<TextCompletionRequest>(&topic)
        .await
        .unwrap();
    let sent = TextCompletionRequest {
        system: "sys".into(),
        prompt: "from rust ✓".into(),
        streaming: false,
        operation: "completion".into(),
        schema: Some([("k".to_owned(), serde_json::json!({"type": "string"}))].into()),
        ..Default::default()
    };
    producer
        .send_with(&sent, [("id".to_owned(), "rust-1".to_owned())].into())
        .await
        .unwrap();
    let lines = python(
        &env.python,
        "consume.py",
        vec![
            env.bootstrap.clone(),
            format!("flow:tg:{name}:ws1:default"),
            unique("py"),
            "1".into(),
        ],
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(got["value"]["system"], "sys", "{got}");
    assert_eq!(got["value"]["prompt"], "from rust ✓", "{got}");
    assert_eq!(got["value"]["streaming"], false, "{got}");
    assert_eq!(got["value"]["operation"], "completion", "{got}");
    assert_eq!(got["value"]["schema"]["k"]["type"], "string", "{got}");
    assert_eq!(got["properties"]["id"], "rust-1", "{got}");
    backend.close().await.unwrap();
}

/// (5) A Rust and a Python consumer of one subscription are members of one consumer group: the
/// framework's consumer resumes where the Rust one committed, and the next Rust consumer where
/// the Python one did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_python_consumers_share_a_group() {
    let Some(env) = env() else { return };
    let backend = backend(&env).await;
    let name = unique("shared-group");
    let topic = Topic::parse(&format!("q1/tg/flow/{name}")).unwrap();
    let group = unique("svc");
    let request = |prompt: &str| TextCompletionRequest {
        prompt: prompt.into(),
        ..Default::default()
    };
    let consumer = backend
        .typed_consumer::<TextCompletionRequest>(&topic, ConsumerOptions::new(group.clone()))
        .await
        .unwrap();
    let producer = backend
        .typed_producer::<TextCompletionRequest>(&topic)
        .await
        .unwrap();
    for prompt in ["first", "second"] {
        producer.send(&request(prompt)).await.unwrap();
    }
    let first = consumer.receive(Duration::from_secs(60)).await.unwrap();
    assert_eq!(first.value().prompt, "first");
    consumer.acknowledge(&first).await.unwrap();
    consumer.close().await.unwrap();
    let lines = python(
        &env.python,
        "consume.py",
        vec![
            env.bootstrap.clone(),
            format!("flow:tg:{name}"),
            group.clone(),
            "1".into(),
        ],
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(got["value"]["prompt"], "second", "{got}");
    producer.send(&request("third")).await.unwrap();
    let next = backend
        .typed_consumer::<TextCompletionRequest>(&topic, ConsumerOptions::new(group))
        .await
        .unwrap();
    let third = next.receive(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        third.value().prompt,
        "third",
        "the Python consumer's commit was not kept"
    );
    next.acknowledge(&third).await.unwrap();
    backend.close().await.unwrap();
}

/// `null` (the framework's `None`) removed everywhere, since we leave such keys out.
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(without_nulls).collect())
        }
        other => other,
    }
}

/// One generated type both ways, each way on a queue of its own addressed by the framework's
/// queue id: the framework builds `value` from our JSON and sends it, and a tg-pubsub consumer of
/// that id's topic must decode the same value; then tg-pubsub sends it and the framework's
/// consumer must decode a dataclass whose JSON is ours.
async fn both_ways<T>(env: &Env, backend: &KafkaBackend, class: &str, value: T)
where
    T: tg_schema::Message + PartialEq + std::fmt::Debug,
{
    let json = String::from_utf8(JsonCodec.encode(&value).unwrap()).unwrap();

    let to_rust: QueueId = format!("flow:tg:{}", unique(&format!("{class}-in")))
        .parse()
        .unwrap();
    let consumer = backend
        .typed_consumer::<T>(
            &to_rust.to_topic(),
            ConsumerOptions::for_queue_class(to_rust.class(), unique("rust")),
        )
        .await
        .unwrap();
    let id = unique("py");
    let lines = python(
        &env.python,
        "send_typed.py",
        vec![
            env.bootstrap.clone(),
            to_rust.to_string(),
            class.to_owned(),
            json.clone(),
            id.clone(),
        ],
    )
    .await;
    assert_eq!(lines, ["sent"], "{class}");
    let got: TypedMessage<T> = consumer.receive(Duration::from_secs(60)).await.unwrap();
    assert_eq!(got.value(), &value, "{class}: framework → tg-pubsub");
    assert_eq!(got.property("id"), Some(id.as_str()));
    consumer.acknowledge(&got).await.unwrap();

    let to_python: QueueId = format!("flow:tg:{}", unique(&format!("{class}-out")))
        .parse()
        .unwrap();
    let producer = backend
        .typed_producer::<T>(&to_python.to_topic())
        .await
        .unwrap();
    producer
        .send_with(&value, [("id".to_owned(), "rust-1".to_owned())].into())
        .await
        .unwrap();
    let lines = python(
        &env.python,
        "receive_typed.py",
        vec![
            env.bootstrap.clone(),
            to_python.to_string(),
            class.to_owned(),
            unique("py"),
            "1".into(),
        ],
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let ours: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        without_nulls(got["value"].clone()),
        ours,
        "{class}: tg-pubsub → framework"
    );
    assert_eq!(got["properties"]["id"], "rust-1", "{got}");
}

/// (4) Three generated types of different shapes travel both ways between the framework and
/// tg-pubsub, addressed by the framework's queue ids: defaults and options
/// (TextCompletionRequest), a list (EmbeddingsRequest), nested and recursive types (Triples).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_types_travel_both_ways_by_queue_id() {
    let Some(env) = env() else { return };
    let backend = backend(&env).await;
    both_ways(
        &env,
        &backend,
        "TextCompletionRequest",
        TextCompletionRequest {
            system: "be brief".into(),
            prompt: "Wer ist ein Graph? ✓".into(),
            streaming: true,
            response_format: Some("json".into()),
            ..Default::default()
        },
    )
    .await;
    both_ways(
        &env,
        &backend,
        "EmbeddingsRequest",
        EmbeddingsRequest {
            texts: vec!["one".into(), "two".into(), String::new()],
        },
    )
    .await;
    let iri = |s: &str| Term {
        r#type: "i".into(),
        iri: s.into(),
        ..Default::default()
    };
    both_ways(
        &env,
        &backend,
        "Triples",
        Triples {
            metadata: Some(Metadata {
                id: "doc-1".into(),
                root: "doc".into(),
                collection: "default".into(),
            }),
            triples: vec![Triple {
                s: Some(iri("http://example.org/a")),
                p: Some(iri("http://example.org/knows")),
                o: Some(Term {
                    r#type: "t".into(),
                    triple: Some(Box::new(Triple {
                        s: Some(iri("http://example.org/b")),
                        p: Some(iri("http://example.org/says")),
                        o: Some(Term {
                            r#type: "l".into(),
                            value: "hello".into(),
                            language: "en".into(),
                            ..Default::default()
                        }),
                        g: None,
                    })),
                    ..Default::default()
                }),
                g: Some("http://example.org/graph".into()),
            }],
        },
    )
    .await;
    backend.close().await.unwrap();
}
