//! Overhead of the consumer runner over driving the backend consumer directly, on the memory
//! backend and on Redis q1 (when `REDIS_URL`, default the local server, answers), in the same
//! run: N JSON messages of ~200 bytes are published first (not timed), then the consumer side
//! receives, decodes, handles and acknowledges each — directly in a loop that calls the handler,
//! or through a `ConsumerRunner` running the same handler — and the time to drain the
//! subscription is compared. Both sides also run in batches of [`BATCH`]: the direct loop with
//! `receive_batch` and `acknowledge_batch`, the runner in its batch mode (`max_batch`), so the
//! batch mode's overhead is read against both direct loops. The handler (a counter) is the same value in both paths, so the
//! difference is the runner's own work: its workers, attempt accounting, panic catching,
//! statistics and shutdown bookkeeping.
//!
//! Single-threaded runtime and the best of 15 (Redis: 3) alternating rounds, to keep the noise of
//! a shared machine out of the ratio: on the 2 shared cores this was written on, one memory run
//! took 40 ms or, as often, 70-120 ms (on-CPU time the same: the host, not the scheduler), so the
//! best of 5 often missed the undisturbed speed of one path and the ratio moved by ±20%. Besides
//! wall time, the on-CPU time of the runtime's thread (Linux `/proc/thread-self/schedstat`) is
//! compared: on a loaded machine wall time mostly measures the other processes.
//!
//! `cargo bench -p tg-runtime --bench overhead` (N from `TG_BENCH_MESSAGES`, default 100,000 on
//! memory; `TG_BENCH_REDIS_MESSAGES`, default 20,000 on Redis; `TG_BENCH_ROUNDS`, default 15, the
//! rounds on memory; `TG_BENCH_PROFILE=direct|runner1|runner16|direct-batch|runner16-batch` runs
//! one path on memory only, for a profiler).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tg_backend_api::{Backend, BackendExt, ConsumerOptions, Topic, TypedMessage};
use tg_backend_memory::{MemoryBackend, MemoryConfig};
use tg_backend_redis::{RedisBackend, RedisConfig};
use tg_runtime::{ConsumerRunner, Handler, HandlerError, RunnerConfig};
use tg_testkit::bench::{print_table, Row};
use tokio::sync::Notify;

/// On-CPU time of this thread so far (Linux), if known.
fn cpu_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// The handler both paths run: counts, and wakes the bench when `n` messages were handled.
#[derive(Clone)]
struct Count(Arc<(AtomicU64, u64, Notify)>);

impl Count {
    fn new(n: u64) -> Self {
        Self(Arc::new((AtomicU64::new(0), n, Notify::new())))
    }

    fn handled(&self) -> u64 {
        self.0 .0.load(Ordering::Relaxed)
    }
}

impl Handler<String> for Count {
    async fn handle(&self, msg: TypedMessage<String>) -> Result<(), HandlerError> {
        std::hint::black_box(msg.value().len());
        let (count, n, done) = &*self.0;
        if count.fetch_add(1, Ordering::Relaxed) + 1 == *n {
            done.notify_one();
        }
        Ok(())
    }
}

fn payload() -> String {
    "x".repeat(198) // 200 bytes as a JSON string
}

/// The backend a path runs on: a fresh memory backend per run, or one Redis connection with a
/// new queue per run.
#[derive(Clone)]
enum Target {
    Memory,
    Redis(Arc<dyn Backend>),
}

static RUN: AtomicU64 = AtomicU64::new(0);

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Memory => "memory",
            Target::Redis(_) => "redis",
        }
    }

    /// A backend and a topic nobody used before, with subscription `s` holding `n` messages.
    async fn prefilled(&self, n: u64) -> (Arc<dyn Backend>, Topic) {
        let backend = match self {
            Target::Memory => {
                let capacity = usize::try_from(n).unwrap_or(usize::MAX).saturating_add(1);
                Arc::new(MemoryBackend::with_config(
                    MemoryConfig::default().subscription_capacity(capacity),
                )) as Arc<dyn Backend>
            }
            Target::Redis(b) => b.clone(),
        };
        let run = RUN.fetch_add(1, Ordering::Relaxed);
        let topic = tg_topic::topic(&format!("bench-{run}")).expect("topic");
        let c = backend
            .create_consumer(&topic, ConsumerOptions::new("s"))
            .await
            .expect("consumer");
        c.close().await.expect("close");
        let p = backend
            .typed_producer::<String>(&topic)
            .await
            .expect("producer");
        let value = payload();
        for _ in 0..n {
            let _receipt = p
                .send_nowait(&value, Default::default())
                .await
                .expect("send");
        }
        p.flush().await.expect("flush");
        (backend, topic)
    }
}

/// Messages per batch on the batch paths: what a service that keeps up takes at once, and the
/// Redis backend's default read size.
const BATCH: usize = 64;

/// Receives, decodes, handles and acknowledges `n` messages in a plain loop.
async fn direct(target: &Target, n: u64) -> (Duration, Option<Duration>) {
    let (backend, topic) = target.prefilled(n).await;
    let consumer = backend
        .typed_consumer::<String>(&topic, ConsumerOptions::new("s"))
        .await
        .expect("consumer");
    let handler = Count::new(n);
    let started = Instant::now();
    let cpu0 = cpu_time();
    while handler.handled() < n {
        let msg = consumer
            .receive(Duration::from_secs(5))
            .await
            .expect("receive");
        let raw = msg.message().clone();
        handler.handle(msg).await.expect("handler");
        consumer.acknowledge(&raw).await.expect("ack");
    }
    let elapsed = (started.elapsed(), cpu_since(cpu0));
    consumer.inner().close().await.expect("close");
    elapsed
}

/// The same in batches of [`BATCH`]: one `receive_batch`, the handler on each message, one
/// `acknowledge_batch`.
async fn direct_batch(target: &Target, n: u64) -> (Duration, Option<Duration>) {
    let (backend, topic) = target.prefilled(n).await;
    let consumer = backend
        .typed_consumer::<String>(&topic, ConsumerOptions::new("s"))
        .await
        .expect("consumer");
    let handler = Count::new(n);
    let started = Instant::now();
    let cpu0 = cpu_time();
    let mut raw = Vec::with_capacity(BATCH);
    while handler.handled() < n {
        let batch = consumer
            .receive_batch(BATCH, Duration::from_secs(5))
            .await
            .expect("receive");
        assert!(!batch.is_empty(), "the subscription ran dry");
        raw.clear();
        for msg in batch {
            let msg = msg.expect("decode");
            raw.push(msg.message().clone());
            handler.handle(msg).await.expect("handler");
        }
        consumer.inner().acknowledge_batch(&raw).await.expect("ack");
    }
    let elapsed = (started.elapsed(), cpu_since(cpu0));
    consumer.inner().close().await.expect("close");
    elapsed
}

fn cpu_since(cpu0: Option<Duration>) -> Option<Duration> {
    cpu0.zip(cpu_time()).map(|(a, b)| b.saturating_sub(a))
}

/// The same through a `ConsumerRunner`.
/// `max_batch` above 1 runs the runner's batch mode (the same handler, called for each message of
/// a batch).
async fn runner(
    target: &Target,
    n: u64,
    concurrency: usize,
    max_batch: usize,
) -> (Duration, Option<Duration>) {
    let (backend, topic) = target.prefilled(n).await;
    let handler = Count::new(n);
    let started = Instant::now();
    let cpu0 = cpu_time();
    let config = RunnerConfig::default()
        .concurrency(concurrency)
        .max_batch(max_batch);
    let handle = ConsumerRunner::new(backend, topic, ConsumerOptions::new("s"), handler.clone())
        .config(config)
        .start()
        .await
        .expect("runner");
    handler.0 .2.notified().await;
    let elapsed = (started.elapsed(), cpu_since(cpu0));
    let report = handle.shutdown().await.expect("shutdown");
    assert_eq!(report.stats.succeeded, n);
    elapsed
}

/// Connects to the Redis of `REDIS_URL` (default: the local one), or says why not.
async fn redis_target(prefix: &str) -> Option<Target> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| RedisConfig::DEFAULT_URL.to_owned());
    let config = match RedisConfig::from_url(&url) {
        Ok(c) => c.prefix(prefix),
        Err(e) => {
            println!("redis: skipped ({e})");
            return None;
        }
    };
    match RedisBackend::connect(config).await {
        Ok(b) => Some(Target::Redis(Arc::new(b))),
        Err(e) => {
            println!("redis: skipped, no server ({e})");
            None
        }
    }
}

/// Deletes the keys under `prefix` (what the Redis runs created).
async fn redis_cleanup(prefix: &str) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| RedisConfig::DEFAULT_URL.to_owned());
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    if let Ok(keys) = redis::cmd("KEYS")
        .arg(format!("{prefix}/*"))
        .query_async::<Vec<String>>(&mut conn)
        .await
    {
        if !keys.is_empty() {
            let _ = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await;
        }
    }
}

const PATHS: [&str; 5] = [
    "backend consumer, direct",
    "ConsumerRunner, concurrency 1",
    "ConsumerRunner, concurrency 16",
    "backend consumer, direct, batches of 64",
    "ConsumerRunner, concurrency 16, max_batch 64",
];

/// The path [`PATHS`]`[i]` on `n` messages.
async fn run_path(target: &Target, i: usize, n: u64) -> (Duration, Option<Duration>) {
    match i {
        0 => direct(target, n).await,
        1 => runner(target, n, 1, 1).await,
        2 => runner(target, n, 16, 1).await,
        3 => direct_batch(target, n).await,
        _ => runner(target, n, 16, BATCH).await,
    }
}

/// Best of `rounds` alternating runs of each path: wall and on-CPU times.
async fn measure(target: &Target, n: u64, rounds: usize) -> Vec<Row> {
    for i in 0..PATHS.len() {
        run_path(target, i, n / 10).await;
    }
    let mut wall = [Duration::MAX; PATHS.len()];
    let mut cpu: [Option<Duration>; PATHS.len()] = [None; PATHS.len()];
    let best = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    for _ in 0..rounds {
        for i in 0..PATHS.len() {
            let (w, c) = run_path(target, i, n).await;
            wall[i] = wall[i].min(w);
            cpu[i] = best(cpu[i], c);
        }
    }
    let mut rows = Vec::new();
    let name = target.name();
    for (i, path) in PATHS.iter().enumerate() {
        let row = Row::new(format!("{name}, wall time"), *path, n, wall[i]);
        rows.push(if i == 0 { row.baseline() } else { row });
    }
    if cpu.iter().all(Option::is_some) {
        for (i, path) in PATHS.iter().enumerate() {
            let row = Row::new(
                format!("{name}, on-CPU time"),
                *path,
                n,
                cpu[i].unwrap_or_default(),
            );
            rows.push(if i == 0 { row.baseline() } else { row });
        }
    }
    rows
}

fn main() {
    let n: u64 = std::env::var("TG_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let redis_n: u64 = std::env::var("TG_BENCH_REDIS_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // For profilers: `TG_BENCH_PROFILE=<path>` runs only that path on memory.
    if let Ok(path) = std::env::var("TG_BENCH_PROFILE") {
        let i = match path.as_str() {
            "direct" => 0,
            "runner1" => 1,
            "runner16" => 2,
            "direct-batch" => 3,
            "runner16-batch" => 4,
            other => panic!(
                "TG_BENCH_PROFILE={other}: use direct, runner1, runner16, direct-batch or runner16-batch"
            ),
        };
        rt.block_on(async {
            for _ in 0..5 {
                run_path(&Target::Memory, i, n).await;
            }
        });
        return;
    }
    let rounds: usize = std::env::var("TG_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    rt.block_on(async {
        let mut rows = measure(&Target::Memory, n, rounds.max(1)).await;
        let prefix = format!("tgps-overhead-{}", std::process::id());
        if let Some(redis) = redis_target(&prefix).await {
            rows.extend(measure(&redis, redis_n, 3).await);
            redis_cleanup(&prefix).await;
        }
        print_table(
            "consumer runner overhead (receive, decode, handle, ack)",
            &rows,
        );
        for row in &rows {
            if let Some(base) = rows.iter().find(|r| r.is_baseline && r.group == row.group) {
                if !row.is_baseline {
                    let overhead = row.elapsed.as_secs_f64() / base.elapsed.as_secs_f64() - 1.0;
                    println!(
                        "{} ({}): overhead {:+.1}% vs direct",
                        row.path,
                        row.group,
                        overhead * 100.0
                    );
                }
            }
            // The batch mode against the loop that batches the same way.
            if row.path == PATHS[4] {
                let direct_batches = rows
                    .iter()
                    .find(|r| r.group == row.group && r.path == PATHS[3]);
                if let Some(base) = direct_batches {
                    let overhead = row.elapsed.as_secs_f64() / base.elapsed.as_secs_f64() - 1.0;
                    println!(
                        "{} ({}): overhead {:+.1}% vs direct batches",
                        row.path,
                        row.group,
                        overhead * 100.0
                    );
                }
            }
        }
    });
}
