//! One service, moved between brokers by one setting: `PUBSUB_BACKEND` (memory when unset).
//!
//! ```text
//! cargo run -p tg-pubsub --example switch_backend                    # in-memory, no server
//! PUBSUB_BACKEND=redis cargo run -p tg-pubsub --features redis --example switch_backend
//! PUBSUB_BACKEND=postgres cargo run -p tg-pubsub --features postgres --example switch_backend
//! PUBSUB_BACKEND=mqtt cargo run -p tg-pubsub --features mqtt --example switch_backend
//! PUBSUB_BACKEND=rabbitmq cargo run -p tg-pubsub --features rabbitmq --example switch_backend
//! ```
//!
//! Each broker backend is a Cargo feature of tg-pubsub; the example runs on whichever of the
//! compiled-in backends `PUBSUB_BACKEND` names, reached through that backend's own settings
//! (`REDIS_URL`, `DATABASE_URL`, `MQTT_URL`, `RABBITMQ_URL`, … with local defaults). Nothing
//! below the `connect` line knows which broker it talks to.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tg_pubsub::runtime::{reply_properties, RunnerHandle};
use tg_pubsub::trustgraph::{TextCompletionRequest as Request, TextCompletionResponse as Response};
use tg_pubsub::{
    Backend, BackendExt, ConsumerOptions, ConsumerRunner, HandlerError, PubSubConfig, QueueId,
    RequestResponse, TypedMessage,
};

#[tokio::main]
async fn main() -> tg_pubsub::Result<()> {
    let compiled: Vec<&str> = tg_pubsub::drivers().iter().map(|d| d.name).collect();
    let config = PubSubConfig::from_env()?;
    println!(
        "compiled-in backends: {}; PUBSUB_BACKEND chooses {}",
        compiled.join(", "),
        config.backend_name()
    );
    let backend = match tg_pubsub::connect(&config).await {
        Ok(backend) => backend,
        Err(e) => {
            eprintln!("cannot use backend {:?}: {e}", config.backend_name());
            return Err(e);
        }
    };

    let requests: QueueId = "request:tg:switch-example".parse()?;
    let responses: QueueId = "response:tg:switch-example".parse()?;
    let service = serve(backend.clone(), &requests, &responses).await?;

    let client = RequestResponse::<Request, Response>::new(
        backend.clone(),
        requests.to_topic(),
        responses.to_topic(),
    )
    .await?;
    for prompt in ["ping", "same code", "any broker"] {
        let started = Instant::now();
        let request = Request {
            prompt: prompt.into(),
            ..Default::default()
        };
        let answer = client.request(&request, Duration::from_secs(10)).await?;
        assert_eq!(answer.value().response, prompt.to_uppercase());
        println!(
            "{}: {prompt:?} -> {:?} in {:.1} ms",
            backend.name(),
            answer.value().response,
            started.elapsed().as_secs_f64() * 1e3
        );
    }

    client.close().await?;
    let report = service.shutdown().await?;
    backend.close().await?;
    println!(
        "done on {}: {} requests answered",
        backend.name(),
        report.stats.succeeded
    );
    Ok(())
}

/// The service: answers each text-completion request with its prompt in upper case, on any
/// backend.
async fn serve(
    backend: Arc<dyn Backend>,
    requests: &QueueId,
    responses: &QueueId,
) -> tg_pubsub::Result<RunnerHandle> {
    let replies = Arc::new(
        backend
            .typed_producer::<Response>(&responses.to_topic())
            .await?,
    );
    ConsumerRunner::new(
        backend,
        requests.to_topic(),
        ConsumerOptions::for_queue_class(requests.class(), "switch-example"),
        move |request: TypedMessage<Request>| {
            let replies = replies.clone();
            async move {
                let answer = Response {
                    response: request.value().prompt.to_uppercase(),
                    end_of_stream: true,
                    ..Default::default()
                };
                replies
                    .send_with(&answer, reply_properties(request.message()))
                    .await
                    .map_err(HandlerError::failed)?;
                Ok(())
            }
        },
    )
    .start()
    .await
}
