//! `tg-pubsub bench`: N messages producer task → consumer task through the selected backend.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tg_pubsub::{
    message, Backend, BackendExt, Consumer, ConsumerOptions, Error, ErrorKind, OutboundMessage,
    Qos, Result, SendReceipt, Topic,
};
use tg_testkit::bench::{print_table, read_stamp, stamped_payload, LatencyRecorder, Row};

/// Arguments of `bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Messages for the raw (bytes) throughput run.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Messages for the typed (JSON encode + decode) throughput run; 0 skips it.
    #[arg(long, default_value_t = 300_000)]
    typed_messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Quality of service of the bench topic.
    #[arg(long, default_value = "q1")]
    qos: Qos,
    /// Sends in flight before the producer waits for the oldest receipt.
    #[arg(long, default_value_t = 4096)]
    window: usize,
    /// Rate (msg/s) of the latency run; 0 skips it.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 2.0)]
    rate_seconds: f64,
}

/// The typed bench message: about 200 bytes of JSON.
#[message]
#[derive(Debug, Clone, Default, PartialEq)]
struct BenchMessage {
    seq: u64,
    sent_ns: u64,
    body: String,
}

/// The subscription every bench consumer uses.
const SUBSCRIPTION: &str = "bench";

/// The bench's topics: a namespace of the run's own, so runs never share a stream, table rows,
/// queue or group, and one queue per part of the run.
const QUEUES: [&str; 3] = ["raw", "typed", "latency"];

/// Runs the bench on topics of its own and removes them afterwards (messages, subscriptions,
/// streams, rows, queues), also when it fails or is interrupted with Ctrl-C, so that runs leave
/// nothing behind on the broker.
pub(crate) async fn run(backend: &dyn Backend, args: &BenchArgs) -> Result<()> {
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let topic = Topic::new(args.qos, "tg", &format!("bench-{}", &run_id[..12]), "raw")?;
    let result = tokio::select! {
        result = bench(backend, args, &topic) => result,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted; removing the bench topics");
            Err(Error::new(ErrorKind::Closed, "the bench was interrupted"))
        }
    };
    let cleaned = remove_topics(backend, &topic).await;
    result.and(cleaned)
}

/// Deletes the run's topics; where the backend cannot delete topics, removes the bench's
/// subscription instead (its queue, group or session: what such a broker keeps for it).
async fn remove_topics(backend: &dyn Backend, topic: &Topic) -> Result<()> {
    for queue in QUEUES {
        let t = topic.with_queue(queue)?;
        match backend.delete_topic(&t).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                let consumer = backend
                    .create_consumer(&t, ConsumerOptions::new(SUBSCRIPTION))
                    .await?;
                consumer.unsubscribe().await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn bench(backend: &dyn Backend, args: &BenchArgs, topic: &Topic) -> Result<()> {
    println!(
        "bench on backend {} topics {}/{}/{}/…: {} raw + {} typed messages of ~{} bytes",
        backend.name(),
        topic.qos(),
        topic.tenant(),
        topic.namespace(),
        args.messages,
        args.typed_messages,
        args.size
    );
    let mut rows = Vec::new();
    if args.messages > 0 {
        let (elapsed, _) = raw_run(
            backend,
            &topic.with_queue(QUEUES[0])?,
            args.messages,
            args.size,
            args.window,
            None,
        )
        .await?;
        rows.push(Row::new("throughput", "raw bytes", args.messages, elapsed).baseline());
    }
    if args.typed_messages > 0 {
        let elapsed = typed_run(backend, &topic.with_queue(QUEUES[1])?, args).await?;
        rows.push(Row::new(
            "throughput",
            "typed JSON",
            args.typed_messages,
            elapsed,
        ));
    }
    if args.rate > 0 {
        let count = (args.rate as f64 * args.rate_seconds).round() as u64;
        let (elapsed, latency) = raw_run(
            backend,
            &topic.with_queue(QUEUES[2])?,
            count,
            args.size,
            args.window,
            Some(args.rate),
        )
        .await?;
        rows.push(
            Row::new(format!("{} msg/s", args.rate), "raw bytes", count, elapsed)
                .with_latency(latency.summary()),
        );
    }
    print_table(
        &format!("tg-pubsub bench: backend {}, {}", backend.name(), args.qos),
        &rows,
    );
    Ok(())
}

fn progress(total: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

const PROGRESS_STEP: u64 = 8192;

/// Sends in flight: at most `window` receipts are pending before the producer waits for the oldest.
struct InFlight {
    receipts: VecDeque<SendReceipt>,
    window: usize,
}

impl InFlight {
    fn new(window: usize) -> Self {
        let window = window.max(1);
        Self {
            receipts: VecDeque::with_capacity(window),
            window,
        }
    }

    /// Waits for the oldest receipt while the window is full.
    async fn make_room(&mut self) -> Result<()> {
        if self.receipts.len() >= self.window {
            if let Some(r) = self.receipts.pop_front() {
                r.await?;
            }
        }
        Ok(())
    }

    fn push(&mut self, receipt: SendReceipt) {
        self.receipts.push_back(receipt);
    }

    /// Waits for every pending receipt.
    async fn drain(self) -> Result<()> {
        for r in self.receipts {
            r.await?;
        }
        Ok(())
    }
}

/// Most messages the bench consumer takes and acknowledges at once: the batch path a service
/// that keeps up uses (one read and one acknowledgement per batch on brokers that batch).
const BATCH: usize = 512;

/// How long the bench consumer waits for the next message before it gives up.
const STALL: Duration = Duration::from_secs(30);

fn stalled(got: u64, n: u64) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("bench consumer got {got} of {n} messages, then nothing for {STALL:?}"),
    )
}

async fn receive_n(
    consumer: &dyn Consumer,
    n: u64,
    t0: Instant,
    bar: &ProgressBar,
    every: u64,
) -> Result<LatencyRecorder> {
    let mut latency = LatencyRecorder::new();
    let mut got = 0u64;
    while got < n {
        let want = usize::try_from(n - got).unwrap_or(BATCH).min(BATCH);
        let batch = consumer.receive_batch(want, STALL).await?;
        if batch.is_empty() {
            return Err(stalled(got, n));
        }
        for msg in &batch {
            if got.is_multiple_of(every) {
                if let Some(l) = read_stamp(msg.payload(), t0) {
                    latency.record(l);
                }
            }
            got += 1;
        }
        consumer.acknowledge_batch(&batch).await?;
        if got % PROGRESS_STEP < batch.len() as u64 {
            bar.set_position(got);
        }
    }
    bar.finish_and_clear();
    Ok(latency)
}

/// Raw bytes: returns the time until the consumer got the last message, and latencies (every
/// message at a fixed rate, a sample of 1 in 64 otherwise). The producer runs in a task of its
/// own and the consumer on the calling task, as in the backends' compare benches, so both are
/// measured the same way.
async fn raw_run(
    backend: &dyn Backend,
    topic: &Topic,
    n: u64,
    size: usize,
    window: usize,
    rate: Option<u64>,
) -> Result<(Duration, LatencyRecorder)> {
    let consumer = backend
        .create_consumer(topic, ConsumerOptions::new(SUBSCRIPTION))
        .await?;
    let producer = backend.create_producer(topic, Default::default()).await?;
    // One message goes through before the clock starts. A fresh process's first message waits
    // for the client's connections to the broker and for the topic's metadata, which a service
    // pays once at start: on Kafka (tansu) its receipt took 0.55 s and its delivery 1.1 s, a
    // third of a 100,000-message run, while the backends' compare benches run on a backend
    // that is already connected.
    producer
        .send(OutboundMessage::new(Vec::new()))
        .await?
        .await?;
    let first = consumer.receive(STALL).await?;
    consumer.acknowledge(&first).await?;
    let bar = progress(n, if rate.is_some() { "latency" } else { "raw" });
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let mut in_flight = InFlight::new(window);
        let mut ticker =
            rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(1) as f64)));
        for _ in 0..n {
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            in_flight.make_room().await?;
            in_flight.push(
                producer
                    .send(OutboundMessage::new(stamped_payload(size, t0)))
                    .await?,
            );
        }
        in_flight.drain().await?;
        producer.flush().await?;
        Ok::<_, Error>(producer)
    });
    let every = if rate.is_some() { 1 } else { 64 };
    let received = receive_n(&*consumer, n, t0, &bar, every).await;
    let elapsed = t0.elapsed();
    let written = writer.await.map_err(|e| {
        Error::new(
            ErrorKind::Unexpected,
            format!("bench producer task failed: {e}"),
        )
    })?;
    // a failed send says more than the consumer's wait for what was never sent
    let producer = written?;
    let latency = received?;
    producer.close().await?;
    consumer.unsubscribe().await?;
    Ok((elapsed, latency))
}

/// Typed: encode and decode a ~200-byte JSON message on every send and receive.
async fn typed_run(backend: &dyn Backend, topic: &Topic, args: &BenchArgs) -> Result<Duration> {
    let n = args.typed_messages;
    let consumer = backend
        .typed_consumer::<BenchMessage>(topic, ConsumerOptions::new(SUBSCRIPTION))
        .await?;
    let producer = backend.typed_producer::<BenchMessage>(topic).await?;
    let body = "x".repeat(args.size.saturating_sub(48));
    let bar = progress(n, "typed");
    let t0 = Instant::now();
    let reader = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut got = 0u64;
            while got < n {
                let want = usize::try_from(n - got).unwrap_or(BATCH).min(BATCH);
                let batch = consumer.receive_batch(want, STALL).await?;
                if batch.is_empty() {
                    return Err(stalled(got, n));
                }
                let batch = batch.into_iter().collect::<Result<Vec<_>>>()?;
                for msg in &batch {
                    if msg.value().seq >= n {
                        return Err(Error::new(
                            ErrorKind::Decode,
                            format!("bench message decoded with seq {} of {n}", msg.value().seq),
                        ));
                    }
                }
                got += batch.len() as u64;
                consumer.acknowledge_batch(&batch).await?;
                if got % PROGRESS_STEP < batch.len() as u64 {
                    bar.set_position(got);
                }
            }
            bar.finish_and_clear();
            consumer.unsubscribe().await?;
            Ok::<_, Error>(t0.elapsed())
        })
    };
    let mut in_flight = InFlight::new(args.window);
    for seq in 0..n {
        in_flight.make_room().await?;
        let sent_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let value = BenchMessage {
            seq,
            sent_ns,
            body: body.clone(),
        };
        in_flight.push(producer.send_nowait(&value, Default::default()).await?);
    }
    in_flight.drain().await?;
    let elapsed = reader.await.map_err(|e| {
        Error::new(
            ErrorKind::Unexpected,
            format!("bench consumer task failed: {e}"),
        )
    })??;
    producer.close().await?;
    Ok(elapsed)
}
