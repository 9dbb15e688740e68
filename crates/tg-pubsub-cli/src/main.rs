//! `tg-pubsub`: publish, listen, a round-trip self-test and a benchmark on the backend chosen by
//! `--pubsub-backend` / `PUBSUB_BACKEND` (memory by default).

#![forbid(unsafe_code)]

mod bench;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tg_pubsub::{
    trustgraph::TextCompletionRequest, Backend, BackendExt, ConsumerOptions, ConsumerType,
    ErrorKind, InitialPosition, OutboundMessage, Properties, PubSubConfig, Result, Topic,
};

/// Publish, listen, self-test and benchmark tg-pubsub on any backend.
#[derive(Parser, Debug)]
#[command(name = "tg-pubsub", version, about)]
struct Cli {
    #[command(flatten)]
    pubsub: PubSubConfig,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish text messages to a topic.
    Publish {
        /// Topic, `{qos}/{tenant}/{namespace}/{queue}`.
        #[arg(long, default_value = "q1/tg/flow/tg-pubsub-cli")]
        topic: Topic,
        /// The message text (each message gets ` #<n>` appended when --count > 1).
        #[arg(long, default_value = "hello from tg-pubsub")]
        message: String,
        /// How many messages.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// A property `key=value` (repeatable).
        #[arg(long = "property", value_parser = parse_property)]
        properties: Vec<(String, String)>,
    },
    /// Print the messages of a subscription, acknowledging each, until Ctrl-C / SIGTERM.
    Listen {
        /// Topic, `{qos}/{tenant}/{namespace}/{queue}`.
        #[arg(long, default_value = "q1/tg/flow/tg-pubsub-cli")]
        topic: Topic,
        /// Subscription name.
        #[arg(long, default_value = "tg-pubsub-cli")]
        subscription: String,
        /// Start from the earliest retained message instead of new ones.
        #[arg(long)]
        earliest: bool,
        /// shared, exclusive or failover.
        #[arg(long, default_value = "shared")]
        consumer_type: ConsumerType,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds without a message.
        #[arg(long)]
        idle_timeout: Option<f64>,
    },
    /// Round-trip self-test: subscribe, publish typed messages, receive and check every one.
    Both {
        /// Topic, `{qos}/{tenant}/{namespace}/{queue}`; a fresh queue name by default.
        #[arg(long)]
        topic: Option<Topic>,
        /// How many messages.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Seconds to wait for each message.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Move messages producer task → consumer task and print msg/s and latency p50/p99/max.
    Bench(bench::BenchArgs),
}

fn parse_property(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("property {s:?} is not key=value"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // colour codes only for a terminal: logs redirected to a file or pipe stay plain text
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let backend = tg_pubsub::connect(&cli.pubsub).await?;
    let outcome = match cli.command {
        Command::Publish {
            topic,
            message,
            count,
            properties,
        } => {
            publish(
                &*backend,
                &topic,
                &message,
                count,
                properties.into_iter().collect(),
            )
            .await
        }
        Command::Listen {
            topic,
            subscription,
            earliest,
            consumer_type,
            count,
            idle_timeout,
        } => {
            let position = if earliest {
                InitialPosition::Earliest
            } else {
                InitialPosition::Latest
            };
            let options = ConsumerOptions::new(subscription)
                .initial_position(position)
                .consumer_type(consumer_type);
            listen(
                &*backend,
                &topic,
                options,
                count,
                idle_timeout.map(Duration::from_secs_f64),
            )
            .await
        }
        Command::Both {
            topic,
            count,
            timeout,
        } => both(&*backend, topic, count, Duration::from_secs_f64(timeout)).await,
        Command::Bench(args) => bench::run(&*backend, &args).await,
    };
    let closed = backend.close().await;
    outcome.and(closed)
}

async fn publish(
    backend: &dyn Backend,
    topic: &Topic,
    text: &str,
    count: u64,
    properties: Properties,
) -> Result<()> {
    let producer = backend.create_producer(topic, Default::default()).await?;
    let mut receipts = Vec::new();
    for i in 1..=count {
        let body = if count > 1 {
            format!("{text} #{i}")
        } else {
            text.to_owned()
        };
        let msg = OutboundMessage::new(body).with_properties(properties.clone());
        receipts.push(producer.send(msg).await?);
    }
    for receipt in receipts {
        receipt.await?;
    }
    producer.close().await?;
    println!(
        "published {count} message(s) to {topic} on {}",
        backend.name()
    );
    Ok(())
}

async fn listen(
    backend: &dyn Backend,
    topic: &Topic,
    options: ConsumerOptions,
    count: Option<u64>,
    idle_timeout: Option<Duration>,
) -> Result<()> {
    let consumer = backend.create_consumer(topic, options).await?;
    // SIGTERM or Ctrl-C: stop receiving, acknowledge what was printed, close the consumer. Polled
    // once here so the signal handlers are installed before anyone is told we listen.
    let stop = tg_pubsub::runtime::shutdown_signal();
    tokio::pin!(stop);
    let mut stopped_early = false;
    std::future::poll_fn(|cx| {
        stopped_early = std::future::Future::poll(stop.as_mut(), cx).is_ready();
        std::task::Poll::Ready(())
    })
    .await;
    eprintln!(
        "listening on {topic} as {:?} ({}); Ctrl-C to stop",
        consumer.subscription(),
        backend.name()
    );
    let mut received = 0u64;
    let mut last = Instant::now();
    while !stopped_early && count.is_none_or(|c| received < c) {
        let msg = tokio::select! {
            _ = &mut stop => { eprintln!("stopping"); break; }
            r = consumer.receive(Duration::from_millis(500)) => r,
        };
        match msg {
            Ok(m) => {
                received += 1;
                last = Instant::now();
                let text = String::from_utf8_lossy(m.payload());
                let shown: String = text.chars().take(200).collect();
                println!(
                    "{} redelivery={} properties={:?} payload={shown}",
                    m.id(),
                    m.redelivery_count(),
                    m.properties()
                );
                consumer.acknowledge(&m).await?;
            }
            Err(e) if e.kind() == ErrorKind::Timeout => {
                if idle_timeout.is_some_and(|t| last.elapsed() >= t) {
                    eprintln!(
                        "no message for {:?}; stopping",
                        idle_timeout.unwrap_or_default()
                    );
                    break;
                }
            }
            Err(e) => return Err(e),
        }
    }
    consumer.close().await?;
    eprintln!("received {received} message(s)");
    Ok(())
}

async fn both(
    backend: &dyn Backend,
    topic: Option<Topic>,
    count: u64,
    timeout: Duration,
) -> Result<()> {
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let topic = match topic {
        Some(t) => t,
        None => tg_pubsub::topic(&format!("self-test-{}", &run_id[..12]))?,
    };
    let consumer = backend
        .typed_consumer::<TextCompletionRequest>(
            &topic,
            ConsumerOptions::new(format!("self-test-{}", &run_id[..12])),
        )
        .await?;
    let producer = backend
        .typed_producer::<TextCompletionRequest>(&topic)
        .await?;
    let start = Instant::now();
    for i in 0..count {
        let request = TextCompletionRequest {
            system: "self-test".into(),
            prompt: format!("{run_id}:{i}"),
            streaming: i % 2 == 0,
            ..Default::default()
        };
        producer
            .send_with(&request, [("id".to_owned(), i.to_string())].into())
            .await?;
    }
    let mut seen = vec![false; usize::try_from(count).unwrap_or(usize::MAX)];
    let mut problems = Vec::new();
    for _ in 0..count {
        let msg = match consumer.receive(timeout).await {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::Timeout => break,
            Err(e) => return Err(e),
        };
        consumer.acknowledge(&msg).await?;
        let value = msg.value();
        let index = value
            .prompt
            .strip_prefix(&format!("{run_id}:"))
            .and_then(|i| i.parse::<usize>().ok());
        match index {
            Some(i) if i < seen.len() && !seen[i] => {
                seen[i] = true;
                if msg.property("id") != Some(&i.to_string()) || value.streaming != (i % 2 == 0) {
                    problems.push(format!(
                        "message {i} came back altered: {value:?} {:?}",
                        msg.message().properties()
                    ));
                }
            }
            _ => problems.push(format!("unexpected message {value:?}")),
        }
    }
    let missing: Vec<usize> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| !**s)
        .map(|(i, _)| i)
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "{} of {count} messages never arrived (first: {:?})",
            missing.len(),
            &missing[..missing.len().min(5)]
        ));
    }
    consumer.unsubscribe().await?;
    producer.close().await?;
    if problems.is_empty() {
        println!(
            "round trip OK: {count}/{count} messages on {topic} through {} in {:.1} ms",
            backend.name(),
            start.elapsed().as_secs_f64() * 1000.0
        );
        Ok(())
    } else {
        Err(tg_pubsub::Error::new(
            ErrorKind::Unexpected,
            format!("round trip FAILED: {}", problems.join("; ")),
        ))
    }
}
