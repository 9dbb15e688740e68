//! A silent network in the middle of a q1 run, on every broker backend: 20,000 messages go
//! through a [`RetryingProducer`] and a [`ConsumerRunner`] (concurrency 16, de-duplication on the
//! `id` property), as in `restart.rs`, but the broker stays up: the test's TCP proxy
//! ([`tg_testkit::proxy`]) between the backend and the broker black-holes every connection a
//! quarter of the way — bytes vanish both ways, no FIN, no RST, a side that gives up is not told
//! to the other — for longer than the backend's configured keep-alive or timeout, then passes
//! traffic again. The connections it caught stay dead: the backend must have noticed and opened
//! new ones.
//!
//! The proxy's host acknowledges every TCP segment, so TCP keep-alive sees a live peer: only the
//! protocols' own keep-alives and request timeouts can notice. Each backend is configured short
//! through its URL options (the case's `settings`), and the bound it must notice within follows
//! from them (`notice_within`, stated with each test).
//!
//! Checked: the client notices within that bound — it closes a caught connection or opens a new
//! one (the proxy notes when each side closed its socket, and counts connections); it keeps no
//! caught connection open once consuming should have resumed (a client may hold a dead socket
//! until its replacement is up, not for good); consuming resumes soon after traffic passes
//! again; no message is lost; the handler sees each id once; the duplicates the broker delivers
//! (dropped by the de-duplicator) are no more than what was in flight (the consumer's
//! concurrency and prefetch, the producer's window); the runner shuts down and the backend
//! closes. Every backend that de-duplicates on q2 runs the same on a q2 topic, each send carrying
//! its sequence number as `tg-dedup-id`: a send the producer retried through the silence must not
//! be stored twice, so only what the consumer held can be delivered again (the bound drops the
//! producer's window). Each run prints when the client noticed, when it closed each caught connection, when
//! the broker did, the first new connection, and its counts.
//!
//! Servers: the shared local Redis (6379), PostgreSQL (5432, database `test`) and RabbitMQ (5672,
//! guest/guest) — the proxy, not the server, is disturbed — and servers of the test's own for
//! MQTT (Mosquitto with `max_queued_messages` raised: its default 1,000 drops a backlog),
//! Pulsar (pulsar-lite from `PULSAR_LITE_BIN` behind the checksum relay, the proxy between the
//! relay and the broker) and Kafka (tansu from `TANSU_BIN`, advertising the proxy's address, so
//! that the clients' broker connections go through it too). When a server or binary is missing
//! the test says so and passes, unless `CI=true`, where it fails. A run that a known defect of
//! the test broker stopped (tansu leaving the partition to nobody, `broker_defect`) ends as
//! skipped with the evidence, once the client's noticing was checked; any other stall fails.

use std::future::Future;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tg_backend_api::{
    Backend, ConsumerOptions, OutboundMessage, Qos, Result, Topic, TypedMessage, DEDUP_ID_PROPERTY,
};
use tg_backend_kafka::{KafkaBackend, KafkaConfig};
use tg_backend_mqtt::{MqttBackend, MqttConfig};
use tg_backend_postgres::{PostgresBackend, PostgresConfig};
use tg_backend_pulsar::{PulsarBackend, PulsarConfig};
use tg_backend_rabbitmq::{RabbitBackend, RabbitConfig};
use tg_backend_redis::{RedisBackend, RedisConfig};
use tg_runtime::{
    ConsumerRunner, Deduplicator, HandlerError, ProducerConfig, RetryingProducer, RunnerConfig,
};
use tg_schema::{Codec, JsonCodec};
use tg_testkit::proxy::{Caught, Mode, Proxy};
use tg_testkit::pulsar_relay::Relay;
use tg_testkit::servers::OwnServer;

const MESSAGES: usize = 20_000;
/// Messages the producer sends per 5 ms tick: 4,000 msg/s.
const PER_TICK: usize = 20;
/// Sends in flight at once.
const PRODUCER_WINDOW: usize = 128;
const CONCURRENCY: usize = 16;
/// Time each message takes to handle, so that messages are in flight when the network goes.
const HANDLER_WORK: Duration = Duration::from_millis(2);
/// The network goes silent once this many distinct messages were handled.
const SILENT_AT: usize = MESSAGES / 4;
/// How long after traffic passes again every message must have been handled.
const DRAIN: Duration = Duration::from_secs(120);
/// Consuming again within this of traffic passing again: by then the backend has noticed and
/// is reconnecting, at most its reconnect back-off ceiling (1–2 s here) apart.
const RESUME_LIMIT: Duration = Duration::from_secs(10);
/// Bound of the runner's shutdown and the backend's close at the end (a hang is a finding).
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// One run at a time: they share two cores, and the timings are the point.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A backend's run: what it is configured with and what it must achieve.
struct Case {
    name: &'static str,
    /// q1, or q2: then every send carries its sequence number as the de-duplication id, so a
    /// send retried through the silence must not be stored twice.
    qos: Qos,
    /// The options that make it notice a silent connection (printed with the result).
    settings: &'static str,
    /// The client must notice the silence within this (close a caught connection or open a new
    /// one), from its keep-alive or timeouts as configured.
    notice_within: Duration,
    /// How long the network stays silent: longer than `notice_within`.
    silent_for: Duration,
    /// Messages the backend's consumer may hold beyond the runner's concurrency.
    prefetch: usize,
    /// When not every message was handled: the evidence, if the test broker's known defect is
    /// what stopped consuming (then the run shows nothing more about the backend and ends there).
    broker_defect: Option<fn(Instant) -> Option<String>>,
}

/// What the handler saw.
struct Seen {
    counts: Mutex<Vec<u32>>,
    distinct: AtomicU64,
    /// When traffic passed again.
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

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// `at - since` as text, or `never`.
fn after(at: Option<Instant>, since: Instant) -> String {
    at.map_or("never".to_owned(), |t| {
        secs(t.saturating_duration_since(since))
    })
}

/// Runs the scenario through `proxy` with the backend `connect` builds (pointed at the proxy).
async fn silent_run<F, Fut>(case: Case, proxy: &Proxy, connect: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Arc<dyn Backend>>>,
{
    // 'static, as the case's own name was: the progress task below outlives any borrow (one short
    // string per run).
    let name: &'static str = format!("{} {}", case.name, case.qos).leak();
    assert!(
        case.silent_for > case.notice_within,
        "{name}: the network must stay silent longer than the client has to notice"
    );
    let backend = connect().await.expect("connect");
    if case.qos == Qos::Q2 && !backend.capabilities(Qos::Q2).deduplication {
        tg_testkit::support::skip(&format!("{name}: the backend does not de-duplicate on q2"));
        let _ = backend.close().await;
        return;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() % 1_000_000);
    let ns = format!("s{}x{stamp}", std::process::id());
    let topic = Topic::new(case.qos, "tgsilent", &ns, "work").expect("topic");
    let q2 = case.qos == Qos::Q2;

    let seen = Arc::new(Seen::new());
    let handler_seen = seen.clone();
    let handler = move |msg: TypedMessage<String>| {
        let seen = handler_seen.clone();
        async move {
            let seq: usize = msg.value()[..5].parse().map_err(HandlerError::permanent)?;
            tokio::time::sleep(HANDLER_WORK).await;
            seen.handled(seq);
            Ok::<(), HandlerError>(())
        }
    };
    let dedup = Arc::new(Deduplicator::new(MESSAGES * 2, Duration::from_secs(600)));
    let runner = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("silent"),
        handler,
    )
    .config(RunnerConfig::default().concurrency(CONCURRENCY))
    .deduplicate(dedup, |m| m.property("id").map(str::to_owned))
    .start()
    .await
    .expect("start the runner");

    // The producer: 4,000 msg/s, PRODUCER_WINDOW sends in flight, retrying through the silence.
    let producer = Arc::new(RetryingProducer::new(
        backend.clone(),
        topic.clone(),
        ProducerConfig::default()
            .max_attempts(100_000)
            .max_elapsed(Duration::from_secs(300)),
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
                    let mut message = OutboundMessage::new(payload).property("id", seq.to_string());
                    if q2 {
                        message = message.property(DEDUP_ID_PROPERTY, seq.to_string());
                    }
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
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                eprintln!(
                    "silent({name}) at {:.0} s: {} accepted by the broker, {} handled",
                    started.elapsed().as_secs_f64(),
                    accepted.load(Ordering::Relaxed),
                    seen.distinct()
                );
            }
        })
    };

    // Silence, once a quarter of the messages were handled.
    let started = Instant::now();
    assert!(
        wait_until(started + Duration::from_secs(60), || seen.distinct() >= SILENT_AT).await,
        "{name}: only {} messages handled in 60 s before the silence ({} accepted by the broker; runner: {:?})",
        seen.distinct(),
        accepted.load(Ordering::Relaxed),
        runner.stats(),
    );
    let at_silence = runner.stats();
    let connections_before = proxy.accepted();
    proxy.set(Mode::BlackHole);
    let silent = Instant::now();
    // The first connection the client opens after the silence began: it noticed something.
    let mut first_new = None;
    while silent.elapsed() < case.silent_for {
        if first_new.is_none() && proxy.accepted() > connections_before {
            first_new = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handled_in_silence = seen.distinct();
    proxy.set(Mode::Pass);
    let back = Instant::now();
    let _ = seen.back.set(back);
    let connections_in_silence = proxy.accepted() - connections_before;

    let produced = tokio::time::timeout_at((back + DRAIN).into(), produce)
        .await
        .is_ok();
    let all = wait_until(back + DRAIN, || seen.distinct() >= MESSAGES).await;
    let broker_defect = if all {
        None
    } else {
        case.broker_defect.and_then(|check| check(back))
    };
    // Let redeliveries still on their way arrive, so duplicates are counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    progress.abort();
    let stats = runner.stats();
    let shut_down = tokio::time::timeout(CLOSE_LIMIT, runner.shutdown())
        .await
        .is_ok();
    let closed = tokio::time::timeout(CLOSE_LIMIT, async {
        let _ = producer.close().await;
        let _ = backend.close().await;
    })
    .await
    .is_ok();
    let closed_at = Instant::now();
    // Everything of the backend's gone: its sockets should be closed now, dead ones included.
    drop(producer);
    drop(backend);
    let everything_closed = wait_until(Instant::now() + Duration::from_secs(3), || {
        proxy.caught().iter().all(|c| c.client_closed.is_some())
    })
    .await;

    // What the black hole caught: when each side gave up, relative to the silence.
    let caught: Vec<Caught> = proxy.caught();
    let client_gave_up = |c: &Caught| {
        c.client_closed
            .filter(|&t| t <= back)
            .map(|t| t.saturating_duration_since(c.black_holed))
    };
    let given_up: Vec<Duration> = caught.iter().filter_map(client_gave_up).collect();
    // A client may keep a dead socket until its replacement is up (the `pulsar` crate does),
    // but not beyond: one still open once consuming should have resumed was never given up.
    let kept = caught
        .iter()
        .filter(|c| c.client_closed.is_none_or(|t| t > back + RESUME_LIMIT))
        .count();
    // each caught connection's end on the client's side
    let fate = |c: &Caught| match c.client_closed {
        Some(t) if t <= back => secs(t.saturating_duration_since(c.black_holed)),
        Some(t) if t <= back + RESUME_LIMIT => format!(
            "{} (after traffic passed again)",
            secs(t.saturating_duration_since(c.black_holed))
        ),
        Some(t) if t <= closed_at => format!(
            "{} (late, after traffic passed again)",
            secs(t.saturating_duration_since(c.black_holed))
        ),
        Some(_) => "when the backend was closed".to_owned(),
        None => "never (still open after the backend was dropped)".to_owned(),
    };
    let client_fates: Vec<String> = caught.iter().map(fate).collect();
    let broker_times: Vec<Duration> = caught
        .iter()
        .filter_map(|c| {
            c.broker_closed
                .filter(|&t| t <= back)
                .map(|t| t.saturating_duration_since(c.black_holed))
        })
        .collect();
    // the first sign of the client noticing: a caught socket closed, or a new connection
    let noticed = given_up
        .iter()
        .copied()
        .chain(first_new.map(|t| t.saturating_duration_since(silent)))
        .min();

    let counts = seen.counts.lock().unwrap().clone();
    let lost = counts.iter().filter(|&&c| c == 0).count();
    let handled_twice: u32 = counts.iter().map(|&c| c.saturating_sub(1)).sum();
    let redelivered = stats.duplicates;
    let resume = seen
        .first_after_back
        .get()
        .map(|t| t.saturating_duration_since(back));
    // On q2 a send retried through the silence is not stored twice: only what the consumer held
    // can come again.
    let producer_window = if q2 { 0 } else { PRODUCER_WINDOW };
    let in_flight_bound = (CONCURRENCY + case.prefetch + producer_window) as u64;
    println!(
        "silent({name}): settings {}, silent for {}, notice bound {}; noticed after {}; client closed the {} caught \
         connections after [{}]; broker closed {} of them while silent, first after {}; first new connection after {}, \
         {connections_in_silence} opened while silent; {} handled while silent; first message handled {} after traffic \
         passed again; {MESSAGES} sent, {} rejected, lost {lost}, handler saw a duplicate {handled_twice} times, \
         duplicates delivered (dropped by de-duplication) {redelivered} (bound {in_flight_bound}: {} received and not \
         yet acknowledged at the silence, concurrency {CONCURRENCY} + prefetch {}, producer window {producer_window}); \
         consumer reconnects {}, ack errors {}{}{}{}",
        case.settings,
        secs(case.silent_for),
        secs(case.notice_within),
        noticed.map_or("never".to_owned(), secs),
        caught.len(),
        client_fates.join(", "),
        broker_times.len(),
        broker_times.iter().min().copied().map_or("never".to_owned(), secs),
        after(first_new, silent),
        handled_in_silence - SILENT_AT.min(handled_in_silence),
        resume.map_or("never".to_owned(), secs),
        rejected.load(Ordering::Relaxed),
        at_silence.received - at_silence.succeeded - at_silence.duplicates,
        case.prefetch,
        stats.reconnects,
        stats.ack_errors,
        if produced { "" } else { "; the producer was still sending at the end" },
        if shut_down { "" } else { "; the runner's shutdown hung" },
        if closed { "" } else { "; closing the backend hung" },
    );

    assert!(
        !caught.is_empty(),
        "{name}: the black hole caught no connection"
    );
    assert!(
        noticed.is_some_and(|d| d <= case.notice_within),
        "{name}: no sign of the client noticing the silence within {:?} (no caught connection closed, no new \
         one opened)",
        case.notice_within
    );
    assert!(
        kept == 0,
        "{name}: the client kept {kept} of the {} silent connections open beyond {RESUME_LIMIT:?} after \
         traffic passed again: [{}]",
        caught.len(),
        client_fates.join(", ")
    );
    if let Some(evidence) = broker_defect {
        // what the client was to notice it did (asserted above); what follows needs a broker
        // that hands the partition out again
        eprintln!(
            "SKIPPED: {name}: a known defect of the test broker stopped consuming, not the backend: {evidence}"
        );
        return;
    }
    let resume = resume.unwrap_or_else(|| {
        panic!("{name}: nothing was handled after traffic passed again ({lost} lost)")
    });
    assert!(
        resume <= RESUME_LIMIT,
        "{name}: consuming again took {resume:?} after traffic passed again"
    );
    assert_eq!(
        rejected.load(Ordering::Relaxed),
        0,
        "{name}: sends failed for good"
    );
    assert!(
        produced,
        "{name}: sends still pending {DRAIN:?} after traffic passed again"
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
    assert!(
        shut_down,
        "{name}: the runner's shutdown hung for {CLOSE_LIMIT:?}"
    );
    assert!(
        closed,
        "{name}: closing the backend hung for {CLOSE_LIMIT:?}"
    );
    assert!(
        everything_closed,
        "{name}: sockets still open after the backend was closed and dropped: [{}]",
        client_fates.join(", ")
    );
}

/// Every assignment the Kafka backend's group member was given (its `partitions assigned` debug
/// event), with when: the evidence of tansu's orphaned partition.
static KAFKA_ASSIGNMENTS: Mutex<Vec<(Instant, String)>> = Mutex::new(Vec::new());

/// Records the Kafka member's assignments into [`KAFKA_ASSIGNMENTS`], whatever `RUST_LOG` says.
struct KafkaAssignments;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for KafkaAssignments {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            message: String,
            partitions: Option<String>,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "message" => self.message = format!("{value:?}"),
                    "partitions" => self.partitions = Some(format!("{value:?}")),
                    _ => {}
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let (true, Some(partitions)) =
            (fields.message == "partitions assigned", fields.partitions)
        {
            KAFKA_ASSIGNMENTS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((Instant::now(), partitions));
        }
    }
}

/// tansu 0.6.0 can leave a partition to nobody (docs/kafka.md, known defects): after the
/// silence, a new incarnation of the consumer's group member timed out in the client, the next
/// one joined while the broker still counted the old one, and the old id got the partition; when
/// a heartbeat then found the old id expired, tansu dropped it without a new generation, so the
/// live member kept its empty share. The run's only consumer being given nothing, and still
/// nothing long after any session could have expired (a broker rebalances then), is that defect:
/// a broker that works hands the sole live member every partition.
fn tansu_left_the_partition_to_nobody(back: Instant) -> Option<String> {
    let assignments = KAFKA_ASSIGNMENTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (last_at, last) = assignments.last()?;
    let settled_for = last_at.elapsed();
    (last == "[]" && settled_for > Duration::from_secs(30)).then(|| {
        let history: Vec<String> = assignments
            .iter()
            .map(|(at, partitions)| {
                let since = if *at >= back {
                    format!("+{:.1} s", at.duration_since(back).as_secs_f64())
                } else {
                    format!("-{:.1} s", back.duration_since(*at).as_secs_f64())
                };
                format!("{since} {partitions}")
            })
            .collect();
        format!(
            "tansu 0.6.0 left the partition to nobody (docs/kafka.md, known defects): the only \
             consumer's assignments, from traffic passing again: [{}]; the last, empty, for {}",
            history.join(", "),
            secs(settled_for)
        )
    })
}

fn run(test: impl Future<Output = ()>) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // `RUST_LOG=tg_backend_mqtt=debug` (say) shows what the backends and the runner log; the
    // Kafka member's assignments are recorded whatever it says.
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        use tracing_subscriber::Layer as _;
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(tracing_subscriber::EnvFilter::from_default_env()),
            )
            .with(
                KafkaAssignments.with_filter(tracing_subscriber::filter::filter_fn(|m| {
                    m.target() == "tg_backend_kafka::member"
                })),
            )
            .try_init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(test);
    // Tasks stuck on a dead connection must not hold the next test up.
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// The shared local server on `port`, or None after saying why.
fn local_server(port: u16, what: &str) -> Option<SocketAddr> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
        tg_testkit::support::skip(&format!("no {what} on {addr}"));
        return None;
    }
    Some(addr)
}

/// An own server, started.
fn started(mut server: OwnServer) -> (OwnServer, SocketAddr) {
    server.start();
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port()));
    (server, addr)
}

/// Runs `test`; when it fails, shows what `server` wrote meanwhile first.
fn showing_output(server: &OwnServer, test: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(test)) {
        eprintln!("the server's output:\n{}", server.output());
        std::panic::resume_unwind(panic);
    }
}

/// Redis has no keep-alive of its own; the backend's `keep_alive` (2 s here) bounds each command on
/// its shared connection and `PING`s that connection as often, replacing it when either goes
/// unanswered: within two keep-alives. A consumer's blocking read, on its own connection, gives up
/// after `block` + `connect_timeout` + 1 s (3 s here).
#[test]
fn redis_notices_a_silent_network_and_loses_nothing() {
    redis_silent(Qos::Q1);
}

#[test]
fn redis_q2_stores_no_retried_send_twice_through_a_silent_network() {
    redis_silent(Qos::Q2);
}

fn redis_silent(qos: Qos) {
    let Some(broker) = local_server(6379, "Redis") else {
        return;
    };
    run(async move {
        let proxy = Proxy::start(broker).await.expect("proxy");
        let url = format!(
            "redis://127.0.0.1:{}?keep_alive=2s&connect_timeout=1s&block=1s&send_timeout=5s",
            proxy.port()
        );
        let case = Case {
            name: "redis",
            qos,
            settings: "keep_alive=2s, connect_timeout=1s, block=1s, send_timeout=5s",
            notice_within: 2 * Duration::from_secs(2) + Duration::from_secs(2),
            silent_for: Duration::from_secs(10),
            prefetch: 2 * RedisConfig::default().batch,
            broker_defect: None,
        };
        silent_run(case, &proxy, || {
            let url = url.clone();
            async move {
                let config = RedisConfig::from_url(&url)?;
                Ok(Arc::new(RedisBackend::connect(config).await?) as Arc<dyn Backend>)
            }
        })
        .await;
    });
}

/// PostgreSQL has no keep-alive of its own; the backend bounds every statement by `query_timeout`
/// (2 s here), closing a connection whose statement went unanswered, and checks its `LISTEN`
/// connection (`SELECT 1`, answered within `query_timeout`) every `safety_interval` (2 s here):
/// an idle backend notices within the sum.
#[test]
fn postgres_notices_a_silent_network_and_loses_nothing() {
    postgres_silent(Qos::Q1);
}

#[test]
fn postgres_q2_stores_no_retried_send_twice_through_a_silent_network() {
    postgres_silent(Qos::Q2);
}

fn postgres_silent(qos: Qos) {
    let Some(broker) = local_server(5432, "PostgreSQL") else {
        return;
    };
    run(async move {
        let proxy = Proxy::start(broker).await.expect("proxy");
        let url = format!(
            "postgres://postgres@127.0.0.1:{}/test?query_timeout=2s&safety_interval=2s\
             &connect_timeout=1s&send_timeout=5s",
            proxy.port()
        );
        let defaults = PostgresConfig::default();
        let case = Case {
            name: "postgres",
            qos,
            settings: "query_timeout=2s, safety_interval=2s, connect_timeout=1s, send_timeout=5s",
            notice_within: Duration::from_secs(2) + Duration::from_secs(2) + Duration::from_secs(2),
            silent_for: Duration::from_secs(10),
            prefetch: defaults.prefetch.max(defaults.batch_size),
            broker_defect: None,
        };
        silent_run(case, &proxy, || {
            let url = url.clone();
            async move {
                let config = PostgresConfig::from_url(&url)?;
                Ok(Arc::new(PostgresBackend::connect(config).await?) as Arc<dyn Backend>)
            }
        })
        .await;
    });
}

/// MQTT's keep-alive (5 s, its least): rumqttc pings every keep-alive and fails the connection
/// when the next ping is due with the last unanswered, within two keep-alives.
#[test]
fn mqtt_notices_a_silent_network_and_loses_nothing() {
    mqtt_silent(Qos::Q1);
}

#[test]
fn mqtt_q2_stores_no_retried_send_twice_through_a_silent_network() {
    mqtt_silent(Qos::Q2);
}

fn mqtt_silent(qos: Qos) {
    let Some(server) = OwnServer::mosquitto("") else {
        return;
    };
    let (server, broker) = started(server);
    showing_output(&server, || {
        run(async move {
            let proxy = Proxy::start(broker).await.expect("proxy");
            let url = format!(
                "mqtt://127.0.0.1:{}?keep_alive=5s&connect_timeout=2s&reconnect_max=1s",
                proxy.port()
            );
            let defaults = MqttConfig::default();
            let case = Case {
                name: "mqtt",
                qos,
                settings: "keep_alive=5s, connect_timeout=2s, reconnect_max=1s",
                notice_within: 2 * Duration::from_secs(5) + Duration::from_secs(2),
                silent_for: Duration::from_secs(15),
                prefetch: usize::from(defaults.receive_maximum) + usize::from(defaults.inflight),
                broker_defect: None,
            };
            silent_run(case, &proxy, || {
                let url = url.clone();
                async move {
                    let config = MqttConfig::from_url(&url)?;
                    Ok(Arc::new(MqttBackend::connect(config).await?) as Arc<dyn Backend>)
                }
            })
            .await;
        });
    });
    drop(server);
}

/// The AMQP heartbeat (2 s here): lapin gives a connection up after two heartbeats without a
/// frame from the broker (it checks every half heartbeat).
#[test]
fn rabbitmq_notices_a_silent_network_and_loses_nothing() {
    rabbitmq_silent(Qos::Q1);
}

#[test]
fn rabbitmq_q2_stores_no_retried_send_twice_through_a_silent_network() {
    rabbitmq_silent(Qos::Q2);
}

fn rabbitmq_silent(qos: Qos) {
    let Some(broker) = local_server(5672, "RabbitMQ") else {
        return;
    };
    run(async move {
        let proxy = Proxy::start(broker).await.expect("proxy");
        let url = format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=2s&connect_timeout=2s&reconnect_max=1s",
            proxy.port()
        );
        let config = RabbitConfig::from_url(&url).expect("RabbitMQ URL");
        let case = Case {
            name: "rabbitmq",
            qos,
            settings: "heartbeat=2s, connect_timeout=2s, reconnect_max=1s",
            notice_within: 2 * Duration::from_secs(2) + Duration::from_secs(2),
            silent_for: Duration::from_secs(10),
            prefetch: usize::from(config.options.prefetch),
            broker_defect: None,
        };
        silent_run(case, &proxy, || {
            let url = url.clone();
            async move {
                let config = RabbitConfig::from_url(&url)?;
                Ok(Arc::new(RabbitBackend::connect(config).await?) as Arc<dyn Backend>)
            }
        })
        .await;
    });
}

/// The `pulsar` crate pings every 30 s (the backend sets this; it is no option) and gives a
/// connection up when the pong has not come within `operation_timeout` (5 s here).
#[test]
fn pulsar_notices_a_silent_network_and_loses_nothing() {
    pulsar_silent(Qos::Q1);
}

#[test]
fn pulsar_q2_stores_no_retried_send_twice_through_a_silent_network() {
    pulsar_silent(Qos::Q2);
}

fn pulsar_silent(qos: Qos) {
    let Some(binary) = std::env::var_os("PULSAR_LITE_BIN") else {
        tg_testkit::support::skip("PULSAR_LITE_BIN is not set (run `cargo xtask test pulsar`)");
        return;
    };
    let Some(server) = OwnServer::pulsar_lite(std::path::Path::new(&binary)) else {
        return;
    };
    let (server, broker) = started(server);
    showing_output(&server, || {
        run(async move {
            // client → checksum relay → proxy → broker: the relay points lookups at itself, so every
            // connection of the client passes the proxy
            let proxy = Proxy::start(broker).await.expect("proxy");
            let relay = Relay::start(proxy.addr()).expect("start the checksum relay");
            let url = format!(
                "{}?operation_timeout=5s&connect_timeout=2s&reconnect_max=1s",
                relay.url()
            );
            let config = PulsarConfig::from_url(&url).expect("Pulsar URL");
            let case = Case {
                name: "pulsar",
qos,
                settings: "keep-alive 30 s (fixed), operation_timeout=5s, connect_timeout=2s, reconnect_max=1s",
                notice_within: Duration::from_secs(30 + 5) + Duration::from_secs(2),
                silent_for: Duration::from_secs(40),
                // batches are acknowledged whole: a batch cut by the silence comes again entire
                prefetch: config.receiver_queue as usize + config.batch_size as usize,
                broker_defect: None,
            };
            silent_run(case, &proxy, || {
                let url = url.clone();
                async move {
                    let config = PulsarConfig::from_url(&url)?;
                    Ok(Arc::new(PulsarBackend::connect(config).await?) as Arc<dyn Backend>)
                }
            })
            .await;
            drop(relay);
        });
    });
    drop(server);
}

/// librdkafka gives a connection up when a request has had no answer for `socket.timeout.ms`,
/// which the backend leaves at librdkafka's 60 s (it is no option), checked once a second; a
/// fetch may add `fetch_wait` (500 ms) to that. A group member misses its heartbeats sooner:
/// after `session_timeout` (10 s) it rejoins, on a new connection to the coordinator.
#[test]
#[ignore = "on tansu 0.6.0, 4 of 20 Kafka runs of 2026-12-03 never consumed again: in 2 the \
            consumer was left with no partition (tansu's orphaned-partition defect, docs/kafka.md, \
            which the run recognises), in 1 it was assigned the partition three times after the \
            silence and fetched nothing before it lost it too (not yet understood), 1 was not \
            traced; run with --ignored"]
fn kafka_notices_a_silent_network_and_loses_nothing() {
    kafka_silent(Qos::Q1);
}

#[test]
#[ignore = "as kafka_notices_a_silent_network_and_loses_nothing; run with --ignored"]
fn kafka_q2_stores_no_retried_send_twice_through_a_silent_network() {
    kafka_silent(Qos::Q2);
}

fn kafka_silent(qos: Qos) {
    let Some(binary) = std::env::var_os("TANSU_BIN") else {
        tg_testkit::support::skip("TANSU_BIN is not set (run `cargo xtask test kafka`)");
        return;
    };
    // The proxy's port first: tansu must advertise it, or the clients would connect to the
    // broker's own address after their first metadata answer, around the proxy.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy's port");
    let proxy_port = listener.local_addr().expect("proxy address").port();
    let Some(server) =
        OwnServer::tansu_advertising(std::path::Path::new(&binary), Some(proxy_port))
    else {
        return;
    };
    let (server, broker) = started(server);
    showing_output(&server, || {
        run(async move {
            // the other Kafka case's assignments are not this run's
            KAFKA_ASSIGNMENTS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            listener.set_nonblocking(true).expect("non-blocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let proxy = Proxy::start_on(listener, broker).expect("proxy");
            // tansu 0.6.0's storage task panics on the produce of an idempotent producer that
            // retries batches whose answers were lost (`lite.rs:503`, "more or less than one
            // row", docs/kafka.md, known defects), here as after a restart, and then serves
            // nothing: the run uses plain acks=all producers, whose retries may duplicate (the
            // de-duplicator drops those)
            let options =
                "idempotence=false&reconnect_max=1s&connect_timeout=2s&commit_interval=10ms";
            let url = format!("kafka://127.0.0.1:{proxy_port}?{options}");
            let config = KafkaConfig::from_url(&url).expect("Kafka URL");
            let case = Case {
                name: "kafka",
                qos,
                settings: concat!(
                    "socket.timeout.ms 60 s (librdkafka's, no option), session_timeout 10 s, ",
                    "idempotence=false, reconnect_max=1s, connect_timeout=2s"
                ),
                notice_within: Duration::from_secs(60 + 1 + 2) + Duration::from_millis(500),
                silent_for: Duration::from_secs(70),
                // what a member may have fetched and not committed when the network goes
                prefetch: config.options.receiver_queue,
                broker_defect: Some(tansu_left_the_partition_to_nobody),
            };
            silent_run(case, &proxy, || {
                let url = url.clone();
                async move {
                    let config = KafkaConfig::from_url(&url)?;
                    Ok(Arc::new(KafkaBackend::connect(config).await?) as Arc<dyn Backend>)
                }
            })
            .await;
        });
    });
    drop(server);
}
