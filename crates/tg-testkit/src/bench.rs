//! Helpers for benchmarks that compare tg-pubsub with a raw client crate in the same run.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use tg_testkit::bench::{read_stamp, stamped_payload, LatencyRecorder, Row, format_table};
//!
//! let t0 = Instant::now();
//! let payload = stamped_payload(200, t0);
//! let mut latency = LatencyRecorder::new();
//! latency.record(read_stamp(&payload, t0).unwrap());
//! let rows = vec![
//!     Row::new("q1", "raw client", 1000, Duration::from_millis(10)).baseline(),
//!     Row::new("q1", "tg-pubsub", 1000, Duration::from_millis(11)).with_latency(latency.summary()),
//! ];
//! let table = format_table("example", &rows);
//! assert!(table.contains("| q1 | tg-pubsub | 1000 |"));
//! assert!(table.contains("0.91"));
//! ```

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Bytes of a payload taken by the send-time stamp.
pub const STAMP_LEN: usize = 8;

/// A payload of `size` bytes (at least [`STAMP_LEN`]) whose first 8 bytes hold the nanoseconds
/// since `t0`, the rest filler.
pub fn stamped_payload(size: usize, t0: Instant) -> Vec<u8> {
    let mut payload = vec![b'x'; size.max(STAMP_LEN)];
    let nanos = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    payload[..STAMP_LEN].copy_from_slice(&nanos.to_le_bytes());
    payload
}

/// Time since the stamp of a [`stamped_payload`] was written, or `None` for a short payload.
pub fn read_stamp(payload: &[u8], t0: Instant) -> Option<Duration> {
    let bytes: [u8; STAMP_LEN] = payload.get(..STAMP_LEN)?.try_into().ok()?;
    let sent = Duration::from_nanos(u64::from_le_bytes(bytes));
    Some(t0.elapsed().saturating_sub(sent))
}

/// Records latencies (microsecond resolution, up to an hour).
#[derive(Debug, Clone)]
pub struct LatencyRecorder {
    hist: Histogram<u64>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyRecorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
        }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, 3_600_000_000);
        self.hist.saturating_record(micros);
    }

    /// Adds another recorder's samples.
    pub fn merge(&mut self, other: &LatencyRecorder) {
        let _ = self.hist.add(&other.hist);
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The percentiles.
    pub fn summary(&self) -> LatencySummary {
        let at = |q: f64| Duration::from_micros(self.hist.value_at_quantile(q));
        LatencySummary {
            p50: at(0.50),
            p99: at(0.99),
            max: Duration::from_micros(self.hist.max()),
            count: self.count(),
        }
    }
}

/// Latency percentiles of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencySummary {
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
    /// Samples.
    pub count: u64,
}

/// One line of a comparison table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What is compared within (e.g. `q0`, `q1`).
    pub group: String,
    /// Which path (e.g. `raw redis`, `tg-pubsub`).
    pub path: String,
    /// Messages moved.
    pub messages: u64,
    /// Time taken end to end.
    pub elapsed: Duration,
    /// Latency at a low fixed rate, if measured.
    pub latency: Option<LatencySummary>,
    /// Whether this row is the baseline the group's ratios are computed against.
    pub is_baseline: bool,
}

impl Row {
    /// A row.
    pub fn new(
        group: impl Into<String>,
        path: impl Into<String>,
        messages: u64,
        elapsed: Duration,
    ) -> Self {
        Self {
            group: group.into(),
            path: path.into(),
            messages,
            elapsed,
            latency: None,
            is_baseline: false,
        }
    }

    /// Marks the row as its group's baseline.
    #[must_use]
    pub fn baseline(mut self) -> Self {
        self.is_baseline = true;
        self
    }

    /// Adds latency figures.
    #[must_use]
    pub fn with_latency(mut self, latency: LatencySummary) -> Self {
        self.latency = Some(latency);
        self
    }

    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Ratio of `row`'s rate to its group's baseline rate, if the group has a baseline.
pub fn ratio(rows: &[Row], row: &Row) -> Option<f64> {
    rows.iter()
        .find(|r| r.is_baseline && r.group == row.group)
        .map(|b| row.rate() / b.rate())
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// A markdown table of the rows: group, path, messages, seconds, msg/s, ratio to the baseline,
/// latency p50/p99/max in milliseconds.
pub fn format_table(title: &str, rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n### {title}\n");
    out.push_str(
        "| group | path | messages | seconds | msg/s | ratio | p50 ms | p99 ms | max ms |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in rows {
        let ratio = match ratio(rows, row) {
            Some(r) => format!("{r:.2}"),
            None => "-".to_owned(),
        };
        let (p50, p99, max) = match row.latency {
            Some(l) => (ms(l.p50), ms(l.p99), ms(l.max)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.3} | {:.0} | {} | {} | {} | {} |",
            row.group,
            row.path,
            row.messages,
            row.elapsed.as_secs_f64(),
            row.rate(),
            ratio,
            p50,
            p99,
            max
        );
    }
    out
}

/// Prints [`format_table`].
pub fn print_table(title: &str, rows: &[Row]) {
    println!("{}", format_table(title, rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let t0 = Instant::now();
        let p = stamped_payload(200, t0);
        assert_eq!(p.len(), 200);
        std::thread::sleep(Duration::from_millis(2));
        assert!(read_stamp(&p, t0).unwrap() >= Duration::from_millis(2));
        assert!(read_stamp(b"short", t0).is_none());
    }

    #[test]
    fn percentiles() {
        let mut r = LatencyRecorder::new();
        for i in 1..=100 {
            r.record(Duration::from_micros(i * 10));
        }
        let s = r.summary();
        assert_eq!(s.count, 100);
        assert!(
            s.p50 >= Duration::from_micros(495) && s.p50 <= Duration::from_micros(505),
            "{s:?}"
        );
        assert!(s.max >= Duration::from_micros(999), "{s:?}");
    }

    #[test]
    fn ratio_against_group_baseline() {
        let rows = vec![
            Row::new("q0", "raw", 100, Duration::from_secs(1)).baseline(),
            Row::new("q0", "tg", 90, Duration::from_secs(1)),
            Row::new("q1", "tg", 50, Duration::from_secs(1)),
        ];
        assert!((ratio(&rows, &rows[1]).unwrap() - 0.9).abs() < 1e-9);
        assert!(ratio(&rows, &rows[2]).is_none());
    }
}

/// The consumer and producer of one tg-pubsub run of a compare bench on `topic`.
async fn open_pair(
    backend: &dyn tg_backend_api::Backend,
    topic: &tg_backend_api::Topic,
    options: tg_backend_api::ConsumerOptions,
) -> (
    Box<dyn tg_backend_api::Consumer>,
    Box<dyn tg_backend_api::Producer>,
) {
    let consumer = backend
        .create_consumer(topic, options)
        .await
        .expect("consumer");
    let producer = backend
        .create_producer(topic, Default::default())
        .await
        .expect("producer");
    (consumer, producer)
}

/// tg-pubsub one message per call, the same on every broker's compare bench that runs it: a
/// producer task sends `n` stamped messages with `send` (paced at `rate` msg/s when given; the
/// receipts awaited at the end, after `flush`), while the consumer receives and acknowledges
/// each with `receive` and `acknowledge`, recording its latency.
#[derive(Debug, Clone, Copy)]
pub struct SingleCallRun {
    /// Bytes per message.
    pub payload: usize,
    /// How long the consumer waits for a message before it gives up.
    pub idle: Duration,
}

impl SingleCallRun {
    /// Moves `n` messages on `topic`, the consumer subscribed with `options`. Returns the
    /// messages received, the time from the first send to the last message received, and the
    /// latencies. With `BENCH_VERBOSE` set it says when the producer finished.
    pub async fn run(
        self,
        backend: &dyn tg_backend_api::Backend,
        topic: &tg_backend_api::Topic,
        options: tg_backend_api::ConsumerOptions,
        n: usize,
        rate: Option<u64>,
    ) -> (usize, Duration, LatencyRecorder) {
        use tg_backend_api::OutboundMessage;
        let (consumer, producer) = open_pair(backend, topic, options).await;
        let t0 = Instant::now();
        let sender = tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(n);
            for i in 0..n {
                if let Some(rate) = rate {
                    let due = t0 + Duration::from_micros(i as u64 * 1_000_000 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let msg = OutboundMessage::new(stamped_payload(self.payload, t0));
                receipts.push(producer.send(msg).await.expect("send"));
            }
            producer.flush().await.expect("flush");
            for r in receipts {
                r.await.expect("receipt");
            }
            if std::env::var_os("BENCH_VERBOSE").is_some() {
                println!("  tg-pubsub producer done after {:?}", t0.elapsed());
            }
            producer
        });
        let mut latency = LatencyRecorder::new();
        let mut got = 0;
        let mut last = t0;
        while got < n {
            match consumer.receive(self.idle).await {
                Ok(m) => {
                    if let Some(l) = read_stamp(m.payload(), t0) {
                        latency.record(l);
                    }
                    consumer.acknowledge(&m).await.expect("ack");
                    got += 1;
                    last = Instant::now();
                }
                Err(e) => {
                    eprintln!("tg-pubsub: stopped after {got} of {n}: {e}");
                    break;
                }
            }
        }
        let producer = sender.await.expect("sender task");
        let _ = producer.close().await;
        let _ = consumer.close().await;
        (got, last - t0, latency)
    }
}

/// tg-pubsub's batch API end to end, the same on every broker's compare bench: a producer task
/// sends `n` stamped messages with `send_batch` in chunks of `send_batch` (the receipts awaited
/// at the end, after `flush`), while the consumer takes up to `receive_max` with `receive_batch`
/// and acknowledges each batch with one `acknowledge_batch`.
#[derive(Debug, Clone, Copy)]
pub struct BatchApiRun {
    /// Bytes per message.
    pub payload: usize,
    /// Messages per `send_batch`.
    pub send_batch: usize,
    /// `max` of `receive_batch`.
    pub receive_max: usize,
    /// How long the consumer waits for a batch before it gives up.
    pub idle: Duration,
}

impl BatchApiRun {
    /// Moves `n` messages on `topic`, the consumer subscribed with `options`. Returns the
    /// messages received and the time from the first send to the last batch received. With
    /// `BENCH_VERBOSE` set it says when the producer finished.
    pub async fn run(
        self,
        backend: &dyn tg_backend_api::Backend,
        topic: &tg_backend_api::Topic,
        options: tg_backend_api::ConsumerOptions,
        n: usize,
    ) -> (usize, Duration) {
        use tg_backend_api::OutboundMessage;
        let (consumer, producer) = open_pair(backend, topic, options).await;
        let t0 = Instant::now();
        let sender = tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(n);
            let mut sent = 0;
            while sent < n {
                let k = self.send_batch.min(n - sent);
                let batch = (0..k)
                    .map(|_| OutboundMessage::new(stamped_payload(self.payload, t0)))
                    .collect();
                receipts.extend(producer.send_batch(batch).await.expect("send_batch"));
                sent += k;
            }
            producer.flush().await.expect("flush");
            for r in receipts {
                r.await.expect("receipt");
            }
            if std::env::var_os("BENCH_VERBOSE").is_some() {
                println!("  tg-pubsub batch producer done after {:?}", t0.elapsed());
            }
            producer
        });
        let mut got = 0;
        let mut last = t0;
        while got < n {
            match consumer.receive_batch(self.receive_max, self.idle).await {
                Ok(batch) if !batch.is_empty() => {
                    consumer.acknowledge_batch(&batch).await.expect("ack");
                    got += batch.len();
                    last = Instant::now();
                }
                other => {
                    eprintln!(
                        "tg-pubsub batch: stopped after {got} of {n}: {:?}",
                        other.map(|b| b.len())
                    );
                    break;
                }
            }
        }
        let producer = sender.await.expect("sender task");
        let _ = producer.close().await;
        let _ = consumer.close().await;
        (got, last - t0)
    }
}
