//! A broker restart in the middle of a q1 run, on every broker backend: 20,000 messages go
//! through a [`RetryingProducer`] and a [`ConsumerRunner`] (concurrency 16, de-duplication on the
//! `id` property) while the test stops the broker (its clean shutdown signal), keeps it down for
//! a second and starts it again with the same data; the last 1,000 messages are sent only once
//! it is back. Each backend runs against a server of the test's own ([`OwnServer`]: Redis with
//! an fsync-always append-only file, PostgreSQL in its own cluster, Mosquitto with
//! persistence), never the shared local one.
//!
//! Checked: no message is lost; the handler sees each id once; the duplicates the broker
//! delivers (dropped by the de-duplicator) are no more than what was in flight at the restart
//! (the consumer's concurrency and prefetch, the producer's window); the runner consumes again
//! soon after the broker is back. Each run prints its counts and the time from broker-back to
//! the first message handled.
//!
//! The servers' binaries come from the machine (pulsar-lite from `PULSAR_LITE_BIN`, which
//! `cargo xtask test pulsar|all` sets, behind the checksum relay of docs/pulsar.md; tansu, the
//! Kafka test broker, from `TANSU_BIN`, which `cargo xtask test kafka|all` sets); when one is
//! missing the test says so and passes, unless `CI=true`, where it fails.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tg_backend_api::{Backend, ConsumerOptions, OutboundMessage, Qos, Result, Topic, TypedMessage};
use tg_backend_kafka::{KafkaBackend, KafkaConfig};
use tg_backend_mqtt::{MqttBackend, MqttConfig};
use tg_backend_postgres::{PostgresBackend, PostgresConfig};
use tg_backend_pulsar::{PulsarBackend, PulsarConfig};
use tg_backend_redis::{RedisBackend, RedisConfig};
use tg_runtime::{
    ConsumerRunner, Deduplicator, HandlerError, ProducerConfig, RetryingProducer, RunnerConfig,
};
use tg_schema::{Codec, JsonCodec};
use tg_testkit::pulsar_relay::Relay;
use tg_testkit::servers::OwnServer;

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
/// Messages the producer holds back until the broker is back, so that the consumer has
/// something to fetch from the restarted broker: a consumer that prefetches much (Kafka's fetch
/// queue) can otherwise have taken every message before the stop and handle the last one while
/// the broker is still down, leaving nothing to show that it consumes again.
const TAIL: usize = 1_000;
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
async fn restart_run<F, Fut>(name: &str, server: OwnServer, prefetch: usize, connect: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<Arc<dyn Backend>>>,
{
    restart_run_with(name, server, prefetch, connect, || {}).await;
}

/// [`restart_run`], calling `while_down` once the broker has stopped.
async fn restart_run_with<F, Fut>(
    name: &str,
    mut server: OwnServer,
    prefetch: usize,
    connect: F,
    while_down: impl FnOnce() + Send + 'static,
) where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<Arc<dyn Backend>>>,
{
    let url = server.url().to_owned();
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
    let broker_back = Arc::new(tokio::sync::Notify::new());
    let produce = {
        let (producer, rejected, accepted) = (producer.clone(), rejected.clone(), accepted.clone());
        let broker_back = broker_back.clone();
        tokio::spawn(async move {
            let window = Arc::new(tokio::sync::Semaphore::new(PRODUCER_WINDOW));
            let mut tasks = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let pad = "x".repeat(190);
            for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(PER_TICK) {
                if chunk[0] == MESSAGES - TAIL {
                    broker_back.notified().await;
                    tick.reset();
                }
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
    // `notify_one` keeps the wake-up for a producer not yet waiting for it.
    broker_back.notify_one();

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
fn redis_restart_loses_nothing() {
    let Some(server) = OwnServer::redis() else {
        return;
    };
    let prefetch = RedisConfig::default().batch;
    run(restart_run("redis", server, prefetch, |url| async move {
        let config = RedisConfig::from_url(&url)?;
        Ok(Arc::new(RedisBackend::connect(config).await?) as Arc<dyn Backend>)
    }));
}

#[test]
fn postgres_restart_loses_nothing() {
    let Some(server) = OwnServer::postgres() else {
        return;
    };
    let config = PostgresConfig::default();
    let prefetch = config.prefetch.max(config.batch_size);
    run(restart_run(
        "postgres",
        server,
        prefetch,
        |url| async move {
            let config = PostgresConfig::from_url(&url)?;
            Ok(Arc::new(PostgresBackend::connect(config).await?) as Arc<dyn Backend>)
        },
    ));
}

#[test]
fn mqtt_restart_loses_nothing() {
    let Some(server) = OwnServer::mosquitto("") else {
        return;
    };
    let config = MqttConfig::default();
    let prefetch = usize::from(config.receive_maximum) + usize::from(config.inflight);
    run(restart_run("mqtt", server, prefetch, |url| async move {
        let config = MqttConfig::from_url(&url)?;
        Ok(Arc::new(MqttBackend::connect(config).await?) as Arc<dyn Backend>)
    }));
}

#[test]
fn pulsar_restart_loses_nothing() {
    let Some(binary) = std::env::var_os("PULSAR_LITE_BIN") else {
        tg_testkit::support::skip("PULSAR_LITE_BIN is not set (run `cargo xtask test pulsar`)");
        return;
    };
    let Some(server) = OwnServer::pulsar_lite(std::path::Path::new(&binary)) else {
        return;
    };
    let broker = std::net::SocketAddr::from(([127, 0, 0, 1], server.port()));
    let relay = Arc::new(Relay::start(broker).expect("start the checksum relay"));
    let relay_url = relay.url();
    let config = PulsarConfig::from_url(&relay_url).expect("relay URL");
    // Batches are acknowledged whole: a batch cut by the restart comes again entire.
    let prefetch = config.receiver_queue as usize + config.batch_size as usize;
    let cut = relay.clone();
    run(restart_run_with(
        "pulsar",
        server,
        prefetch,
        move |_| {
            let url = relay_url.clone();
            async move {
                let config = PulsarConfig::from_url(&url)?;
                Ok(Arc::new(PulsarBackend::connect(config).await?) as Arc<dyn Backend>)
            }
        },
        // The relay holds the client side open; a real broker's death closes it.
        move || cut.cut_connections(),
    ));
}

#[test]
fn kafka_restart_loses_nothing() {
    let Some(binary) = std::env::var_os("TANSU_BIN") else {
        tg_testkit::support::skip("TANSU_BIN is not set (run `cargo xtask test kafka`)");
        return;
    };
    let Some(server) = OwnServer::tansu(std::path::Path::new(&binary)) else {
        return;
    };
    // tansu 0.6.0 panics on the first idempotent produce after a restart that cut batches in
    // flight, and then serves nothing (docs/kafka.md, known defects): the run uses plain
    // acks=all producers, whose retries may duplicate (the de-duplicator drops those)
    let options = "idempotence=false&commit_interval=10ms&reconnect_max=1s";
    let url = format!("{}?{options}", server.url());
    let config = KafkaConfig::from_url(&url).expect("Kafka URL");
    // what a member may have fetched and not committed when the broker stops
    let prefetch = config.options.receiver_queue;
    run(restart_run("kafka", server, prefetch, move |_| {
        let url = url.clone();
        async move {
            let config = KafkaConfig::from_url(&url)?;
            Ok(Arc::new(KafkaBackend::connect(config).await?) as Arc<dyn Backend>)
        }
    }));
}
