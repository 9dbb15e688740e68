//! Wire interop with the Python framework (trustgraph-base 2.11.1, its Pulsar backend) on the
//! same broker: raw JSON payloads, the `id` property, its queue names.
//!
//! | framework queue | Pulsar topic | tg topic |
//! |---|---|---|
//! | `flow:tg:NAME` | `persistent://tg/flow/NAME` | `q1/tg/flow/NAME` |
//! | `request:tg:NAME` | `non-persistent://tg/request/NAME` | `q0/tg/request/NAME` |
//! | `response:tg:NAME` | `non-persistent://tg/response/NAME` | `q0/tg/response/NAME` |
//!
//! Needs `PULSAR_URL` (tg-pubsub's way to the broker: through the checksum relay on
//! pulsar-lite), `PULSAR_LITE_URL` (the same broker, direct: the Python client does not need the
//! relay) and `PULSAR_PYTHON` (a python with trustgraph-base), all set by `cargo xtask test
//! pulsar`. Without them the tests say why and pass, except under `CI=true`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tg_backend_api::{Backend, BackendExt, ConsumerOptions, Properties, Topic};
use tg_backend_pulsar::{PulsarBackend, PulsarConfig};
use tg_schema::messages::{TextCompletionRequest, TextCompletionResponse};
use tg_testkit::support::skip;

struct Env {
    pulsar_url: String,
    lite_url: String,
    python: String,
}

fn env() -> Option<Env> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("PULSAR_URL"),
        get("PULSAR_LITE_URL"),
        get("PULSAR_PYTHON"),
    ) {
        (Some(pulsar_url), Some(lite_url), Some(python)) => Some(Env {
            pulsar_url,
            lite_url,
            python,
        }),
        _ => {
            skip("PULSAR_URL, PULSAR_LITE_URL and PULSAR_PYTHON are not all set (run `cargo xtask test pulsar`)");
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

async fn backend(env: &Env) -> PulsarBackend {
    PulsarBackend::connect(PulsarConfig::from_url(&env.pulsar_url).unwrap())
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
            env.lite_url.clone(),
            "flow:tg:text-completion-request:ws1:default".into(),
            "what is a graph?".into(),
            id.clone(),
        ],
    )
    .await;
    assert_eq!(lines, ["sent"]);
    let got = consumer.receive(Duration::from_secs(15)).await.unwrap();
    assert_eq!(
        got.value(),
        &TextCompletionRequest {
            system: "be brief".into(),
            prompt: "what is a graph?".into(),
            streaming: true,
            metadata: None,
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
        let request = requests.receive(Duration::from_secs(40)).await.unwrap();
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
            env.lite_url.clone(),
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
        metadata: Some([("k".to_owned(), "v".to_owned())].into()),
    };
    producer
        .send_with(&sent, [("id".to_owned(), "rust-1".to_owned())].into())
        .await
        .unwrap();
    let lines = python(
        &env.python,
        "consume.py",
        vec![
            env.lite_url.clone(),
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
    // a field the framework's TextCompletionRequest does not have is dropped by its decoder;
    // its own defaults fill the rest
    assert_eq!(got["value"]["operation"], "completion", "{got}");
    assert_eq!(got["properties"]["id"], "rust-1", "{got}");
    backend.close().await.unwrap();
}
