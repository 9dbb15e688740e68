//! A consumer runner with retries and a dead-letter topic, on the embedded (in-memory) backend.
//!
//! `cargo run -p tg-pubsub --example runner_dead_letter`
//!
//! Five jobs go in: two succeed at once, one fails twice and then succeeds on its third attempt,
//! one always fails (dead-lettered once its 3 attempts are used up), one is refused as permanent
//! (dead-lettered at once); and a payload that is not a job at all is dead-lettered as `decode`.
//! A consumer of the dead-letter topic `q1/tg/flow/jobs:dlq` prints why each one landed there.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tg_pubsub::api::Backoff;
use tg_pubsub::runtime::{DLQ_ATTEMPTS_PROPERTY, DLQ_ERROR_PROPERTY, DLQ_REASON_PROPERTY};
use tg_pubsub::{
    BackendExt, Bytes, ConsumerOptions, ConsumerRunner, HandlerError, ProducerOptions,
    PubSubConfig, RunnerConfig, TypedMessage,
};

/// A unit of work.
#[tg_pubsub::message]
#[derive(Debug, Clone, PartialEq, Default)]
struct Job {
    name: String,
}

#[tokio::main]
async fn main() -> tg_pubsub::Result<()> {
    let backend = tg_pubsub::connect(&PubSubConfig::new()).await?;
    let jobs = tg_pubsub::topic("jobs")?;
    let dead_letters = tg_pubsub::topic("jobs:dlq")?; // the runner's default for `jobs`
    let dlq = backend
        .create_consumer(&dead_letters, ConsumerOptions::new("inspector"))
        .await?;

    // Attempts per job, counted by the handler itself to show the retries (it runs on several
    // tasks at once).
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let runner = ConsumerRunner::new(
        backend.clone(),
        jobs.clone(),
        ConsumerOptions::new("workers"),
        move |job: TypedMessage<Job>| {
            let attempt = {
                let mut attempts = attempts.lock().unwrap_or_else(|e| e.into_inner());
                let n = attempts.entry(job.value().name.clone()).or_default();
                *n += 1;
                *n
            };
            async move {
                let name = job.value().name.as_str();
                println!("handle   {name:<10} attempt {attempt}");
                match name {
                    "flaky" if attempt < 3 => {
                        Err(HandlerError::failed("the printer is warming up"))
                    }
                    "broken" => Err(HandlerError::failed("the printer is on fire")),
                    "forbidden" => Err(HandlerError::permanent("not allowed to print this")),
                    _ => Ok(()),
                }
            }
        },
    )
    .config(
        RunnerConfig::default()
            .max_attempts(3)
            // Short delays so the example ends quickly; the default starts at 100 ms.
            .retry_backoff(Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(200),
            )),
    )
    .start()
    .await?;

    let producer = backend.typed_producer::<Job>(&jobs).await?;
    for name in ["invoice", "receipt", "flaky", "broken", "forbidden"] {
        producer.send(&Job { name: name.into() }).await?;
    }
    // A payload that does not decode as a Job: the runner dead-letters it without calling the
    // handler.
    let raw = backend
        .create_producer(&jobs, ProducerOptions::new())
        .await?;
    raw.send_and_wait(Bytes::from_static(b"not json"), Default::default())
        .await?;

    // Three of the six end in the dead-letter topic; print each as it arrives.
    for _ in 0..3 {
        let dead = dlq.receive(Duration::from_secs(10)).await?;
        let property = |name| dead.property(name).unwrap_or("-");
        println!(
            "dead     {:<10} reason {:<9} after {} attempt(s): {}",
            String::from_utf8_lossy(dead.payload()).to_string(),
            property(DLQ_REASON_PROPERTY),
            property(DLQ_ATTEMPTS_PROPERTY),
            property(DLQ_ERROR_PROPERTY),
        );
        dlq.acknowledge(&dead).await?;
    }

    // Wait (bounded) until the runner has settled all six, then shut it down.
    let deadline = Instant::now() + Duration::from_secs(10);
    while runner.stats().succeeded + runner.stats().dead_lettered < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = runner.shutdown().await?;
    let stats = report.stats;
    println!(
        "done: {} received, {} succeeded, {} failed attempts, {} dead-lettered",
        stats.received, stats.succeeded, stats.failed, stats.dead_lettered
    );
    assert_eq!((stats.succeeded, stats.dead_lettered), (3, 3));
    producer.close().await?;
    raw.close().await?;
    dlq.close().await?;
    backend.close().await
}
