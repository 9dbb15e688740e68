//! A request/response service and its client, on the embedded (in-memory) backend.
//!
//! `cargo run -p tg-pubsub --example request_response`
//!
//! The service is a `ConsumerRunner` over the request queue that answers on the response queue
//! with the request's `id` property (`reply_properties`), as the Python framework's services do;
//! the client is a `RequestResponse`, which sets a fresh `id` on each request and routes the
//! answers back to the waiting call: one answer, or a stream of them ended by `end_of_stream`.
use std::sync::Arc;
use std::time::Duration;

use tg_pubsub::runtime::reply_properties;
use tg_pubsub::trustgraph::{TextCompletionRequest as Request, TextCompletionResponse as Response};
use tg_pubsub::{
    BackendExt, ConsumerOptions, ConsumerRunner, HandlerError, PubSubConfig, QueueId,
    RequestResponse, TypedMessage,
};

#[tokio::main]
async fn main() -> tg_pubsub::Result<()> {
    let backend = tg_pubsub::connect(&PubSubConfig::new()).await?;
    // The framework's queue ids: `request:` and `response:` map to q0 (best effort) topics.
    let requests: QueueId = "request:tg:text-completion".parse()?;
    let responses: QueueId = "response:tg:text-completion".parse()?;
    println!(
        "backend {}: {} -> {}",
        backend.name(),
        requests.to_topic(),
        responses.to_topic()
    );

    // The service: upper-cases the prompt; a streaming request gets one answer per word.
    let replies = Arc::new(
        backend
            .typed_producer::<Response>(&responses.to_topic())
            .await?,
    );
    let service = ConsumerRunner::new(
        backend.clone(),
        requests.to_topic(),
        ConsumerOptions::for_queue_class(requests.class(), "text-completion"),
        move |request: TypedMessage<Request>| {
            let replies = replies.clone();
            async move {
                let answer = request.value().prompt.to_uppercase();
                let words: Vec<&str> = if request.value().streaming {
                    answer.split(' ').collect()
                } else {
                    vec![answer.as_str()]
                };
                for (i, word) in words.iter().enumerate() {
                    let reply = Response {
                        response: (*word).to_owned(),
                        end_of_stream: i + 1 == words.len(),
                        model: Some("upper-case".into()),
                        ..Default::default()
                    };
                    replies
                        .send_with(&reply, reply_properties(request.message()))
                        .await
                        .map_err(HandlerError::failed)?;
                }
                Ok(())
            }
        },
    )
    .start()
    .await?;

    // The client.
    let client = RequestResponse::<Request, Response>::new(
        backend.clone(),
        requests.to_topic(),
        responses.to_topic(),
    )
    .await?;
    for prompt in ["hello", "what is pub/sub?", "bye"] {
        let request = Request {
            prompt: prompt.into(),
            ..Default::default()
        };
        let answer = client.request(&request, Duration::from_secs(5)).await?;
        println!(
            "request {prompt:?} -> {:?} (id {})",
            answer.value().response,
            answer.property("id").unwrap_or("?")
        );
    }
    let streaming = Request {
        prompt: "one word at a time".into(),
        streaming: true,
        ..Default::default()
    };
    let stream = client
        .request_stream(&streaming, Duration::from_secs(5), |r: &Response| {
            r.end_of_stream
        })
        .await?;
    let parts = stream.collect().await?;
    let words: Vec<&str> = parts.iter().map(|p| p.value().response.as_str()).collect();
    println!(
        "streaming request {:?} -> {} answers {words:?}",
        streaming.prompt,
        parts.len()
    );
    assert_eq!(words, ["ONE", "WORD", "AT", "A", "TIME"]);

    client.close().await?;
    let report = service.shutdown().await?;
    backend.close().await?;
    println!(
        "done: the service handled {} requests, {} failed",
        report.stats.succeeded, report.stats.failed
    );
    assert_eq!(report.stats.succeeded, 4);
    Ok(())
}
