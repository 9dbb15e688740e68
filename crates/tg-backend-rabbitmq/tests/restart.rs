//! The runtime's broker-restart run on RabbitMQ: 20,000 q1 messages go through a
//! [`RetryingProducer`] and a [`ConsumerRunner`] (concurrency 16, de-duplication on the `id`
//! property) while the test stops a RabbitMQ node of its own (SIGTERM, a clean shutdown), keeps it
//! down for a second and starts it again with the same data. The shared broker on 5672 is not
//! touched.
//!
//! Checked: no message is lost; the handler sees each id once; the duplicates the broker delivers
//! (dropped by the de-duplicator) are no more than what was in flight at the restart (the
//! consumer's concurrency and prefetch, the producer's window); the runner consumes again soon
//! after the broker is back. The run prints its counts and the time from broker-back to the first
//! message handled. (The scenario is tg-runtime's `tests/restart.rs`, which holds it for the other
//! brokers; it lives here until the testkit can start a RabbitMQ node.)

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use support::node::OwnNode;
use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage, Qos, Result, Topic, TypedMessage};
use tg_backend_rabbitmq::{RabbitBackend, RabbitConfig};
use tg_runtime::{
    ConsumerRunner, Deduplicator, HandlerError, ProducerConfig, RetryingProducer, RunnerConfig,
};
use tg_schema::{Codec, JsonCodec};

const MESSAGES: usize = 20_000;
/// Messages the producer sends per 5 ms tick: 4,000 msg/s, a run of about 5 s.
const PER_TICK: usize = 20;
/// Sends in flight at once.
const PRODUCER_WINDOW: usize = 128;
const CONCURRENCY: usize = 16;
/// Time each message takes to handle: 16 × 500/s = 8,000 msg/s of capacity, about half used.
const HANDLER_WORK: Duration = Duration::from_millis(2);
/// The broker goes down once this many distinct messages were handled.
const RESTART_AT: usize = MESSAGES / 4;
const DOWN: Duration = Duration::from_secs(1);
/// How long after the broker is back every message must have been handled.
const DRAIN: Duration = Duration::from_secs(120);
/// Spec 003 SC-007: consuming again within 10 s of the broker being reachable (issue 6 aims at
/// 2 s; the measured figure is printed).
const RESUME_LIMIT: Duration = Duration::from_secs(10);

/// One restart test at a time: each starts its own server, but they share two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What the handler saw.
struct Seen {
    counts: Mutex<Vec<u32>>,
    distinct: AtomicU64,
    /// When the broker was back up.
    back: OnceLock<Instant>,
    /// The first message handled after that.
    first_after_back: OnceLock<Instant>,
}

impl Seen {
    fn new() -> Self {
        Self {
            counts: Mutex::new(vec![0; MESSAGES]),
            distinct: AtomicU64::new(0),
            back: OnceLock::new(),
            first_after_back: OnceLock::new(),
        }
    }

    fn handled(&self, seq: usize) {
        let first = {
            let mut counts = self.counts.lock().unwrap();
            counts[seq] += 1;
            counts[seq] == 1
        };
        if first {
            self.distinct.fetch_add(1, Ordering::Relaxed);
        }
        if self.back.get().is_some() {
            let _ = self.first_after_back.set(Instant::now());
        }
    }

    fn distinct(&self) -> usize {
        self.distinct.load(Ordering::Relaxed) as usize
    }
}

async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Runs the scenario on `server` (started here) with the backend `connect` builds from its URL.
/// `prefetch`: messages the backend's consumer may hold beyond the runner's concurrency.
async fn restart_run<F, Fut>(name: &str, server: OwnNode, prefetch: usize, connect: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<Arc<dyn Backend>>>,
{
    restart_run_with(name, server, prefetch, connect, || {}).await;
}

/// [`restart_run`], calling `while_down` once the broker has stopped.
async fn restart_run_with<F, Fut>(
    name: &str,
    mut server: OwnNode,
    prefetch: usize,
    connect: F,
    while_down: impl FnOnce() + Send + 'static,
) where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<Arc<dyn Backend>>>,
{
    let url = server.url("");
    let server_task = tokio::task::spawn_blocking(move || {
        server.start();
        server
    });
    let mut server = server_task.await.expect("start the server");
    let backend = connect(url).await.expect("connect");
    let ns = format!("r{}", std::process::id());
    let topic = Topic::new(Qos::Q1, "tgrestart", &ns, "work").expect("topic");

    let seen = Arc::new(Seen::new());
    let handler_seen = seen.clone();
    let handler = move |msg: TypedMessage<String>| {
        let seen = handler_seen.clone();
        async move {
            let seq: usize = msg.value()[..5].parse().map_err(HandlerError::permanent)?;
            // Some work, so that messages are in flight (received, not yet acknowledged) when
            // the broker goes down.
            tokio::time::sleep(HANDLER_WORK).await;
            seen.handled(seq);
            Ok::<(), HandlerError>(())
        }
    };
    let dedup = Arc::new(Deduplicator::new(MESSAGES * 2, Duration::from_secs(600)));
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("restart"),
        handler,
    )
    .config(RunnerConfig::default().concurrency(CONCURRENCY))
    .deduplicate(dedup, |m| m.property("id").map(str::to_owned))
    .start()
    .await
    .expect("start the runner");

    // The producer: 4,000 msg/s, PRODUCER_WINDOW sends in flight, retrying through the outage.
    let producer = Arc::new(RetryingProducer::new(
        backend.clone(),
        topic.clone(),
        ProducerConfig::default()
            .max_attempts(100_000)
            .max_elapsed(Duration::from_secs(120)),
    ));
    let rejected = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let produce = {
        let (producer, rejected, accepted) = (producer.clone(), rejected.clone(), accepted.clone());
        tokio::spawn(async move {
            let window = Arc::new(tokio::sync::Semaphore::new(PRODUCER_WINDOW));
            let mut tasks = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let pad = "x".repeat(190);
            for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(PER_TICK) {
                tick.tick().await;
                for &seq in chunk {
                    let permit = window.clone().acquire_owned().await.expect("window");
                    let payload = JsonCodec
                        .encode(&format!("{seq:05}-{pad}"))
                        .expect("encode");
                    let message = OutboundMessage::new(payload).property("id", seq.to_string());
                    let (producer, rejected, accepted) =
                        (producer.clone(), rejected.clone(), accepted.clone());
                    tasks.spawn(async move {
                        match producer.send(message).await {
                            Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                eprintln!("send of {seq} failed for good: {e}");
                                rejected.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                        drop(permit);
                    });
                }
            }
            while tasks.join_next().await.is_some() {}
        })
    };

    // Progress, every 5 s (shown with --nocapture, or when the test fails).
    let progress = {
        let (seen, accepted) = (seen.clone(), accepted.clone());
        let name = name.to_owned();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                eprintln!(
                    "restart({name}) at {:.0} s: {} accepted by the broker, {} handled",
                    started.elapsed().as_secs_f64(),
                    accepted.load(Ordering::Relaxed),
                    seen.distinct()
                );
            }
        })
    };

    // The restart, once a quarter of the messages were handled.
    let started = Instant::now();
    assert!(
        wait_until(started + Duration::from_secs(60), || seen.distinct()
            >= RESTART_AT)
        .await,
        "{name}: only {} messages handled in 60 s before the restart ({} accepted by the broker; runner: {:?})",
        seen.distinct(),
        accepted.load(Ordering::Relaxed),
        runner.stats(),
    );
    let at_stop = runner.stats();
    let restart = tokio::task::spawn_blocking(move || {
        let stopping = Instant::now();
        server.stop();
        while_down();
        std::thread::sleep(DOWN);
        server.start();
        (server, stopping.elapsed())
    });
    let (server, outage) = restart.await.expect("restart the server");
    let _ = seen.back.set(Instant::now());

    produce.await.expect("producer task");
    let back = *seen.back.get().expect("set above");
    let all = wait_until(back + DRAIN, || seen.distinct() >= MESSAGES).await;
    // Let redeliveries still on their way arrive, so duplicates are counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    progress.abort();
    let report = runner.shutdown().await.expect("shutdown");
    let _ = producer.close().await;
    let _ = backend.close().await;
    drop(server);

    let counts = seen.counts.lock().unwrap().clone();
    let lost = counts.iter().filter(|&&c| c == 0).count();
    let handled_twice: u32 = counts.iter().map(|&c| c.saturating_sub(1)).sum();
    let redelivered = report.stats.duplicates;
    let resume = seen
        .first_after_back
        .get()
        .map(|t| t.saturating_duration_since(back));
    let in_flight_bound = (CONCURRENCY + prefetch + PRODUCER_WINDOW) as u64;
    println!(
        "restart({name}): {MESSAGES} sent, {} rejected, lost {lost}, handler saw a duplicate {handled_twice} times, \
         duplicates delivered (dropped by de-duplication) {redelivered} (bound: in flight at the restart ≤ {in_flight_bound}: \
         {} received and not yet acknowledged when the stop began, consumer concurrency {CONCURRENCY} + prefetch {prefetch}, \
         producer window {PRODUCER_WINDOW}), broker stopped and started in {:.2} s, first message handled {} after the broker was back, \
         consumer reconnects {}, ack errors {}",
        rejected.load(Ordering::Relaxed),
        at_stop.received - at_stop.succeeded - at_stop.duplicates,
        outage.as_secs_f64(),
        resume.map_or("never".to_owned(), |d| format!("{:.3} s", d.as_secs_f64())),
        report.stats.reconnects,
        report.stats.ack_errors,
    );
    assert_eq!(
        rejected.load(Ordering::Relaxed),
        0,
        "{name}: sends failed for good"
    );
    assert!(all && lost == 0, "{name}: {lost} messages lost");
    assert_eq!(
        handled_twice, 0,
        "{name}: the handler saw duplicates despite de-duplication"
    );
    assert!(
        redelivered <= in_flight_bound,
        "{name}: {redelivered} duplicates, more than could have been in flight ({in_flight_bound})"
    );
    let resume = resume.expect("something was handled after the restart");
    assert!(
        resume <= RESUME_LIMIT,
        "{name}: consuming again took {resume:?} after the broker was back"
    );
}

fn run(test: impl Future<Output = ()>) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // `RUST_LOG=tg_backend_mqtt=debug` (say) shows what the backends and the runner log.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test);
}

#[test]
fn rabbitmq_restart_loses_nothing() {
    let Some(server) = OwnNode::new() else {
        return;
    };
    let config = RabbitConfig::default();
    let prefetch = usize::from(config.options.prefetch);
    run(restart_run(
        "rabbitmq",
        server,
        prefetch,
        |url| async move {
            // a dead connection is noticed at once here (the node closes it); the heartbeat matters
            // only for silent deaths
            let config = RabbitConfig::from_url(&url)?.reconnect_max(Duration::from_secs(1));
            Ok(Arc::new(RabbitBackend::connect(config).await?) as Arc<dyn Backend>)
        },
    ));
}
