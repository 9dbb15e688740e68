//! Wire interop with the Python framework (trustgraph-base 2.11.1, its `AsyncRabbitMQBackend` on
//! aio-pika) on the same RabbitMQ: raw JSON payloads, the `id` header, its exchange and queue
//! names and declare arguments.
//!
//! | framework queue | exchange | tg topic |
//! |---|---|---|
//! | `flow:tg:NAME` | `tg.flow.NAME` | `q1/tg/flow/NAME` |
//! | `request:tg:NAME` | `tg.request.NAME` | `q0/tg/request/NAME` |
//! | `response:tg:NAME` | `tg.response.NAME` | `q0/tg/response/NAME` |
//!
//! The broker: `RABBITMQ_URL`, else the local one (`amqp://guest:guest@localhost:5672/%2f`). The
//! framework: `PULSAR_PYTHON`, else the venv `target/pulsar-venv` that `cargo xtask services`
//! (and `cargo xtask test pulsar|all`) creates with trustgraph-base, whose dependencies bring
//! aio-pika. Without them the tests say why and pass, except under `CI=true`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

mod support;

use tg_backend_api::{Backend, BackendExt, ConsumerOptions, Properties, Topic};
use tg_backend_rabbitmq::{RabbitBackend, RabbitConfig};
use tg_schema::trustgraph::{TextCompletionRequest, TextCompletionResponse};
use tg_testkit::support::skip;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEFAULT_URL: &str = "amqp://guest:guest@localhost:5672/%2f";

struct Env {
    url: String,
    python: PathBuf,
}

fn env() -> Option<Env> {
    let python = std::env::var_os("PULSAR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/pulsar-venv/bin/python")
        });
    if !python.is_file() {
        skip(&format!(
            "no python with trustgraph-base at {} (run `cargo xtask services`, which creates the venv)",
            python.display()
        ));
        return None;
    }
    let url = std::env::var("RABBITMQ_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    Some(Env { url, python })
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("interop")
        .join(name)
}

/// Starts a script of tests/interop with the venv's python.
fn spawn(env: &Env, name: &str, args: &[String]) -> Child {
    Command::new(&env.python)
        .arg(script(name))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} {name}: {e}", env.python.display()))
}

/// Runs a script to its end; its stdout lines (it must succeed).
async fn python(env: &Env, name: &str, args: &[String]) -> Vec<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        spawn(env, name, args).wait_with_output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{name} did not end within 90 s"))
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

/// Reads the next stdout line of a running script.
async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    name: &str,
) -> String {
    tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("{name} printed nothing within 60 s"))
        .unwrap()
        .unwrap_or_else(|| panic!("{name} ended early"))
}

async fn backend(env: &Env) -> RabbitBackend {
    RabbitBackend::connect(RabbitConfig::from_url(&env.url).unwrap())
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

/// Deletes the queue of `subscription` (if any) and the exchange of `topic` the test made on the
/// shared broker.
async fn cleanup(env: &Env, backend: &RabbitBackend, topic: &Topic, subscription: &str) {
    if let Ok(c) = backend
        .create_consumer(topic, ConsumerOptions::new(subscription))
        .await
    {
        let _ = c.unsubscribe().await;
    }
    support::delete_exchanges(&env.url, &[exchange(topic)]).await;
}

fn exchange(topic: &Topic) -> String {
    format!("{}.{}.{}", topic.tenant(), topic.namespace(), topic.queue())
}

/// (1) The framework's producer sends a TextCompletionRequest on
/// `flow:tg:NAME:ws1:default`; a tg-pubsub consumer of `q1/tg/flow/NAME:ws1:default`, subscribed
/// first, decodes it into our struct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_to_rust_consumer() {
    let Some(env) = env() else { return };
    let backend = backend(&env).await;
    let name = unique("text-completion-request");
    let topic = Topic::parse(&format!("q1/tg/flow/{name}:ws1:default")).unwrap();
    let consumer = backend
        .typed_consumer::<TextCompletionRequest>(&topic, ConsumerOptions::new("rust-llm"))
        .await
        .unwrap();
    let id = unique("req");
    let lines = python(
        &env,
        "produce_request.py",
        &[
            env.url.clone(),
            format!("flow:tg:{name}:ws1:default"),
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
            ..Default::default()
        }
    );
    assert_eq!(got.property("id"), Some(id.as_str()));
    // the framework writes `null` for None and fields we do not have: both are accepted
    let raw = String::from_utf8_lossy(got.message().payload()).into_owned();
    assert!(raw.contains("null"), "{raw}");
    consumer.acknowledge(&got).await.unwrap();
    drop(consumer);
    cleanup(&env, &backend, &topic, "rust-llm").await;
    backend.close().await.unwrap();
}

/// (2) A tg-pubsub service answers the framework's RequestResponseClient: it consumes
/// `q0/tg/request/NAME:ws1:default` and replies on the response queue with the request's `id`
/// header copied; the client's own response queue (server-named, exclusive) gets it.
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
        let request = requests.receive(Duration::from_secs(60)).await.unwrap();
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
        &env,
        "request_response.py",
        &[
            env.url.clone(),
            format!("request:tg:{name}:ws1:default"),
            format!("response:tg:{name}:ws1:default"),
            "ping".into(),
        ],
    )
    .await;
    let id = service.await.unwrap();
    assert!(!id.is_empty());
    assert_eq!(lines[0], "ready");
    let response: serde_json::Value =
        serde_json::from_str(lines.last().expect("a response line")).unwrap();
    assert_eq!(response["response"], "echo: ping", "{response}");
    assert_eq!(response["model"], "tg-pubsub-rust", "{response}");
    assert_eq!(response["end_of_stream"], true, "{response}");
    assert!(response["error"].is_null(), "{response}");
    cleanup(&env, &backend, &request_topic, "llm").await;
    support::delete_exchanges(&env.url, &[exchange(&response_topic)]).await;
    backend.close().await.unwrap();
}

/// (3) A tg-pubsub producer's message decodes in the framework's consumer (subscribed first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_producer_to_python_consumer() {
    let Some(env) = env() else { return };
    let backend = backend(&env).await;
    let name = unique("text-completion-request");
    let topic = Topic::parse(&format!("q1/tg/flow/{name}:ws1:default")).unwrap();
    let mut child = spawn(
        &env,
        "consume.py",
        &[
            env.url.clone(),
            format!("flow:tg:{name}:ws1:default"),
            "py".into(),
            "1".into(),
        ],
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(next_line(&mut lines, "consume.py").await, "ready");
    let producer = backend
        .typed_producer::<TextCompletionRequest>(&topic)
        .await
        .unwrap();
    let sent = TextCompletionRequest {
        system: "sys".into(),
        prompt: "from rust ✓".into(),
        streaming: false,
        schema: Some([("k".to_owned(), serde_json::json!({"type": "string"}))].into()),
        ..Default::default()
    };
    producer
        .send_with(&sent, [("id".to_owned(), "rust-1".to_owned())].into())
        .await
        .unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&next_line(&mut lines, "consume.py").await).unwrap();
    assert_eq!(got["value"]["system"], "sys", "{got}");
    assert_eq!(got["value"]["prompt"], "from rust ✓", "{got}");
    assert_eq!(got["value"]["streaming"], false, "{got}");
    assert_eq!(got["value"]["operation"], "completion", "{got}");
    assert_eq!(got["value"]["schema"]["k"]["type"], "string", "{got}");
    assert_eq!(got["properties"]["id"], "rust-1", "{got}");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "consume.py: {status}");
    cleanup(&env, &backend, &topic, "py").await;
    backend.close().await.unwrap();
}

/// (4) Both sides declare the same exchange and queue, in either order, without a precondition
/// error: a `flow` queue (durable) and a `request` queue (transient).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_declare_the_same_queue_in_either_order() {
    let Some(env) = env() else { return };
    let backend = backend(&env).await;
    let mut exchanges = Vec::new();
    for (qos, class) in [("q1", "flow"), ("q0", "request")] {
        // the framework first, then tg-pubsub, which then consumes what is sent
        let name = unique(&format!("py-first-{class}"));
        let lines = python(
            &env,
            "declare.py",
            &[
                env.url.clone(),
                format!("{class}:tg:{name}"),
                "shared".into(),
            ],
        )
        .await;
        assert_eq!(lines, ["declared"], "{class}");
        let topic = Topic::parse(&format!("{qos}/tg/{class}/{name}")).unwrap();
        exchanges.push(exchange(&topic));
        let consumer = backend
            .create_consumer(&topic, ConsumerOptions::new("shared"))
            .await
            .unwrap_or_else(|e| panic!("{class}: tg-pubsub after the framework: {e}"));
        let producer = backend
            .create_producer(&topic, Default::default())
            .await
            .unwrap();
        producer
            .send(tg_backend_api::OutboundMessage::new("after both"))
            .await
            .unwrap()
            .await
            .unwrap();
        let got = consumer.receive(Duration::from_secs(15)).await.unwrap();
        assert_eq!(got.payload().as_ref(), b"after both");
        consumer.acknowledge(&got).await.unwrap();
        consumer.unsubscribe().await.unwrap();

        // tg-pubsub first, then the framework
        let name = unique(&format!("rust-first-{class}"));
        let topic = Topic::parse(&format!("{qos}/tg/{class}/{name}")).unwrap();
        exchanges.push(exchange(&topic));
        let consumer = backend
            .create_consumer(&topic, ConsumerOptions::new("shared"))
            .await
            .unwrap();
        let lines = python(
            &env,
            "declare.py",
            &[
                env.url.clone(),
                format!("{class}:tg:{name}"),
                "shared".into(),
            ],
        )
        .await;
        assert_eq!(
            lines,
            ["declared"],
            "{class}: the framework after tg-pubsub"
        );
        consumer.unsubscribe().await.unwrap();
    }
    support::delete_exchanges(&env.url, &exchanges).await;
    backend.close().await.unwrap();
}
