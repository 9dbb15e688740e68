//! A Rust service answering the Python framework's text-completion requests.
use tg_pubsub::trustgraph::{TextCompletionRequest as Request, TextCompletionResponse as Response};
use tg_pubsub::{runtime::reply_properties, BackendExt, ConsumerOptions, PubSubConfig};
#[tokio::main]
async fn main() -> tg_pubsub::Result<()> {
    let backend = tg_pubsub::connect(&PubSubConfig::from_env()?).await?;
    let requests: tg_pubsub::QueueId = "request:tg:text-completion".parse()?;
    let responses: tg_pubsub::QueueId = "response:tg:text-completion".parse()?;
    let options = ConsumerOptions::for_queue_class(requests.class(), "text-completion");
    let consumer = backend
        .typed_consumer::<Request>(&requests.to_topic(), options)
        .await?;
    let producer = backend
        .typed_producer::<Response>(&responses.to_topic())
        .await?;
    // Serves until no request came for 5 s (or the broker fails).
    while let Ok(request) = consumer.receive(std::time::Duration::from_secs(5)).await {
        let answer = Response {
            response: request.value().prompt.to_uppercase(),
            end_of_stream: true,
            ..Default::default()
        };
        producer
            .send_with(&answer, reply_properties(request.message()))
            .await?;
        consumer.acknowledge(&request).await?;
    }
    Ok(())
}
