//! Overhead of the consumer runner over driving the backend consumer directly, on the memory
//! backend, in the same run: N JSON messages of ~200 bytes are published first (not timed), then
//! the consumer side receives, decodes, handles (a counter) and acknowledges each — directly in a
//! loop, or through a `ConsumerRunner` — and the time to drain the subscription is compared.
//! Single-threaded runtime and the best of 5 alternating rounds, to keep the noise of a shared
//! machine out of the ratio. Besides wall time, the on-CPU time of the runtime's thread (Linux
//! `/proc/thread-self/schedstat`) is compared: on a loaded machine wall time mostly measures the
//! other processes.
//!
//! `cargo bench -p tg-runtime --bench overhead` (N from `TG_BENCH_MESSAGES`, default 100,000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tg_backend_api::{Backend, BackendExt, ConsumerOptions, Topic, TypedMessage};
use tg_backend_memory::{MemoryBackend, MemoryConfig};
use tg_runtime::{ConsumerRunner, HandlerError, RunnerConfig};
use tg_testkit::bench::{print_table, Row};
use tokio::sync::Notify;

/// On-CPU time of this thread so far (Linux), if known.
fn cpu_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

fn payload() -> String {
    "x".repeat(198) // 200 bytes as a JSON string
}

fn backend(n: u64) -> Arc<dyn Backend> {
    let capacity = usize::try_from(n).unwrap_or(usize::MAX).saturating_add(1);
    Arc::new(MemoryBackend::with_config(
        MemoryConfig::default().subscription_capacity(capacity),
    ))
}

/// Creates subscription `s` and fills it with `n` messages.
async fn prefill(backend: &Arc<dyn Backend>, topic: &Topic, n: u64) {
    let c = backend
        .create_consumer(topic, ConsumerOptions::new("s"))
        .await
        .expect("consumer");
    c.close().await.expect("close");
    produce(backend.clone(), topic.clone(), n).await;
}

async fn produce(backend: Arc<dyn Backend>, topic: Topic, n: u64) {
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
}

async fn raw(n: u64) -> (Duration, Option<Duration>) {
    let backend = backend(n);
    let topic = tg_topic::topic("bench-raw").expect("topic");
    prefill(&backend, &topic, n).await;
    let consumer = backend
        .typed_consumer::<String>(&topic, ConsumerOptions::new("s"))
        .await
        .expect("consumer");
    let started = Instant::now();
    let cpu0 = cpu_time();
    let count = AtomicU64::new(0);
    while count.load(Ordering::Relaxed) < n {
        let msg = consumer
            .receive(Duration::from_secs(5))
            .await
            .expect("receive");
        std::hint::black_box(msg.value().len());
        count.fetch_add(1, Ordering::Relaxed);
        consumer.acknowledge(&msg).await.expect("ack");
    }
    (started.elapsed(), cpu_since(cpu0))
}

fn cpu_since(cpu0: Option<Duration>) -> Option<Duration> {
    cpu0.zip(cpu_time()).map(|(a, b)| b.saturating_sub(a))
}

async fn runner(n: u64, concurrency: usize) -> (Duration, Option<Duration>) {
    let backend = backend(n);
    let topic = tg_topic::topic("bench-runner").expect("topic");
    prefill(&backend, &topic, n).await;
    let started = Instant::now();
    let cpu0 = cpu_time();
    let count = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let (c, d) = (count.clone(), done.clone());
    let handle = ConsumerRunner::new(
        backend.clone(),
        topic.clone(),
        ConsumerOptions::new("s"),
        move |msg: TypedMessage<String>| {
            let (c, d) = (c.clone(), d.clone());
            async move {
                std::hint::black_box(msg.value().len());
                if c.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    d.notify_one();
                }
                Ok::<_, HandlerError>(())
            }
        },
    )
    .config(RunnerConfig::default().concurrency(concurrency))
    .start()
    .await
    .expect("runner");
    done.notified().await;
    let elapsed = (started.elapsed(), cpu_since(cpu0));
    let report = handle.shutdown().await.expect("shutdown");
    assert_eq!(report.stats.succeeded, n);
    elapsed
}

fn main() {
    let n: u64 = std::env::var("TG_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Warm up, then take the best of 5 alternating runs of each path.
        raw(n / 10).await;
        runner(n / 10, 16).await;
        let paths = [
            "backend consumer, direct",
            "ConsumerRunner, concurrency 1",
            "ConsumerRunner, concurrency 16",
        ];
        let mut wall = [Duration::MAX; 3];
        let mut cpu: [Option<Duration>; 3] = [None; 3];
        let best = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for _ in 0..5 {
            for (i, (w, c)) in [raw(n).await, runner(n, 1).await, runner(n, 16).await]
                .into_iter()
                .enumerate()
            {
                wall[i] = wall[i].min(w);
                cpu[i] = best(cpu[i], c);
            }
        }
        let mut rows = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let row = Row::new("wall time", *path, n, wall[i]);
            rows.push(if i == 0 { row.baseline() } else { row });
        }
        if cpu.iter().all(Option::is_some) {
            for (i, path) in paths.iter().enumerate() {
                let row = Row::new("on-CPU time", *path, n, cpu[i].unwrap_or_default());
                rows.push(if i == 0 { row.baseline() } else { row });
            }
        }
        print_table(
            "consumer runner overhead on memory (receive, decode, handle, ack)",
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
        }
    });
}
