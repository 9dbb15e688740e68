//! The backlog check every backend runs: a q1 consumer that was subscribed but not receiving while
//! a large backlog built works it all off, without stalls, in memory bounded by its buffer.
//!
//! A consumer's buffer (prefetch, receive window, fetch queue) is what it may hold at once; a
//! backlog of any size must drain through it. The check publishes [`Backlog::messages`] messages
//! (200,000 by default) while the consumer exists but does not call `receive`, then drains them
//! in batches of up to 100 (`receive_batch`, `acknowledge_batch`: the runner's batch mode and the
//! CLI's bench drain so), and asserts:
//! every message arrives; no more than [`STALL_LIMIT`] passes without a new one; and the
//! process's peak resident memory grows no more than the backend's stated bound while draining.
//!
//! Each backend's `tests/backlog.rs` is a test target with `harness = false` of its own, so that
//! the memory measured is that of a process doing nothing else:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     tg_testkit::backlog::Backlog::for_driver(&tg_backend_memory::DRIVER).run()
//! }
//! ```
//!
//! The memory is the process's (Linux: `/proc/self/status`), and its peak is reset just before
//! draining (`/proc/self/clear_refs`), so what publishing allocated does not count; the messages
//! the backend's own process holds (the in-memory broker) shrink while draining. Elsewhere, or
//! where the reset is refused, the growth is printed but not asserted.

use std::collections::VecDeque;
use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use rand::Rng;
use tg_backend_api::kit::Driver;
use tg_backend_api::{Backend, ConsumerOptions, ErrorKind, OutboundMessage, Qos, Topic};

use crate::{driver_settings, support, Factory};

/// Messages in the backlog unless [`Backlog::messages`] says otherwise.
pub const MESSAGES: usize = 200_000;
/// Payload size in bytes: the message's sequence number, padded.
pub const PAYLOAD: usize = 100;
/// Longest time without a new message while draining (a stalled consumer stalls for good).
pub const STALL_LIMIT: Duration = Duration::from_secs(10);
/// Resident-memory growth allowed while draining, unless the backend states its own bound.
pub const RSS_GROWTH_LIMIT_MIB: u64 = 24;
/// Sends awaited at most this many behind the newest, so publishing is pipelined but bounded.
const SEND_WINDOW: usize = 5_000;
/// Messages received and acknowledged per call while draining.
const DRAIN_BATCH: usize = 100;

/// The backlog check for one backend.
pub struct Backlog {
    backend: String,
    factory: Factory,
    messages: usize,
    rss_limit_mib: u64,
    rss_reason: Option<&'static str>,
    drain_limit: Duration,
    cleanup: Cleanup,
}

/// What the check removes from the server when it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// The topic ([`Backend::delete_topic`]), or only the subscription where the backend cannot
    /// remove a topic.
    Topic,
    /// Only the subscription ([`tg_backend_api::Consumer::unsubscribe`]): for a server of the
    /// test run's own, where removing a topic is not needed and can be what fails.
    Subscription,
}

impl Backlog {
    /// The check for backend `name`, whose backend comes from `factory`.
    pub fn new<F, Fut>(name: impl Into<String>, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut:
            std::future::Future<Output = tg_backend_api::Result<Arc<dyn Backend>>> + Send + 'static,
    {
        Self {
            backend: name.into(),
            factory: Arc::new(move || Box::pin(factory())),
            messages: MESSAGES,
            rss_limit_mib: RSS_GROWTH_LIMIT_MIB,
            rss_reason: None,
            drain_limit: Duration::from_secs(300),
            cleanup: Cleanup::Topic,
        }
    }

    /// The check for the backend of `driver`, connected with the environment's settings, as
    /// [`crate::Suite::for_driver`] connects.
    pub fn for_driver(driver: &'static Driver) -> Self {
        Self::for_driver_with(driver, &[])
    }

    /// [`Backlog::for_driver`] with URL options added to the backend's URL.
    pub fn for_driver_with(driver: &'static Driver, url_options: &[(&str, &str)]) -> Self {
        let lookup = driver_settings(driver, url_options);
        Self::new(driver.name, move || {
            let lookup = lookup.clone();
            async move { driver.connect(&*lookup).await }
        })
    }

    /// Messages in the backlog.
    #[must_use]
    pub fn messages(mut self, messages: usize) -> Self {
        self.messages = messages;
        self
    }

    /// The backend's own bound on memory growth while draining, with what makes it up (printed
    /// with the result).
    #[must_use]
    pub fn rss_limit_mib(mut self, mib: u64, reason: &'static str) -> Self {
        self.rss_limit_mib = mib;
        self.rss_reason = Some(reason);
        self
    }

    /// How long the whole drain may take (default 300 s).
    #[must_use]
    pub fn drain_limit(mut self, limit: Duration) -> Self {
        self.drain_limit = limit;
        self
    }

    /// What to remove from the server afterwards (default [`Cleanup::Topic`]).
    #[must_use]
    pub fn cleanup(mut self, cleanup: Cleanup) -> Self {
        self.cleanup = cleanup;
        self
    }

    /// Runs the check as one test `<backend>::backlog`, with libtest-style arguments from the
    /// command line. When the backend cannot be built the test is skipped with the reason, unless
    /// `CI=true`, where it fails.
    pub fn run(self) -> ExitCode {
        let args = Arguments::from_args();
        let name = format!("{}::backlog", self.backend);
        let trial = Trial::test(name, move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| Failed::from(format!("tokio runtime: {e}")))?;
            runtime.block_on(async move {
                let backend = match (self.factory)().await {
                    Ok(backend) => backend,
                    Err(e) => {
                        let why = format!("backend {} could not be built: {e}", self.backend);
                        if support::in_ci() {
                            return Err(Failed::from(format!("{why} (CI=true)")));
                        }
                        support::skip(&why);
                        return Ok(());
                    }
                };
                let outcome = drain(&*backend, self.messages, self.drain_limit, self.cleanup).await;
                let _ = backend.close().await;
                let report = outcome.map_err(Failed::from)?;
                println!("{}: {report}", self.backend);
                if let Some(reason) = self.rss_reason {
                    println!(
                        "{}: memory bound {} MiB: {reason}",
                        self.backend, self.rss_limit_mib
                    );
                }
                report
                    .check_memory(self.rss_limit_mib)
                    .map_err(Failed::from)
            })
        });
        if libtest_mimic::run(&args, vec![trial]).has_failed() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// What one drain measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Messages in the backlog.
    pub messages: usize,
    /// Distinct messages received.
    pub delivered: usize,
    /// Messages received again after their first delivery.
    pub duplicates: usize,
    /// Time to publish the backlog (every send confirmed).
    pub published_in: Duration,
    /// Time to drain it.
    pub drained_in: Duration,
    /// Longest time without a new message while draining.
    pub longest_gap: Duration,
    /// Resident memory when draining began, KiB.
    pub rss_before_kib: u64,
    /// Peak resident memory while draining, KiB; `None` where it cannot be measured apart from
    /// publishing.
    pub peak_kib: Option<u64>,
}

impl Report {
    /// Peak resident memory above what it was when draining began, KiB.
    pub fn growth_kib(&self) -> Option<u64> {
        self.peak_kib
            .map(|peak| peak.saturating_sub(self.rss_before_kib))
    }

    /// Fails when memory grew more than `limit_mib` while draining.
    pub fn check_memory(&self, limit_mib: u64) -> Result<(), String> {
        match self.growth_kib() {
            Some(growth) if growth > limit_mib * 1024 => Err(format!(
                "resident memory grew {growth} KiB while draining, more than {limit_mib} MiB"
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backlog drained: {} of {} in {:.1} s (published in {:.1} s), {} duplicates, longest \
             gap {:.2} s; ",
            self.delivered,
            self.messages,
            self.drained_in.as_secs_f64(),
            self.published_in.as_secs_f64(),
            self.duplicates,
            self.longest_gap.as_secs_f64(),
        )?;
        match self.growth_kib() {
            Some(growth) => write!(
                f,
                "peak RSS grew {:.1} MiB while draining (from {:.1} MiB)",
                growth as f64 / 1024.0,
                self.rss_before_kib as f64 / 1024.0
            ),
            None => write!(f, "peak RSS growth not measurable here"),
        }
    }
}

/// Builds a backlog of `messages` on a fresh q1 topic of `backend` while its consumer is
/// subscribed but not receiving, then drains it in batches of up to 100.
/// Fails with what went wrong (a send refused, a stall, a message never delivered, the drain
/// taking longer than `drain_limit`). Then removes what `cleanup` says.
pub async fn drain(
    backend: &dyn Backend,
    messages: usize,
    drain_limit: Duration,
    cleanup: Cleanup,
) -> Result<Report, String> {
    let namespace = format!("backlog-{:08x}", rand::thread_rng().gen::<u32>());
    let topic = Topic::new(Qos::Q1, "tgtest", &namespace, "big").map_err(|e| e.to_string())?;
    let consumer = backend
        .create_consumer(&topic, ConsumerOptions::new("backlog"))
        .await
        .map_err(|e| format!("create consumer: {e}"))?;
    let producer = backend
        .create_producer(&topic, Default::default())
        .await
        .map_err(|e| format!("create producer: {e}"))?;

    let started = Instant::now();
    let mut receipts = VecDeque::with_capacity(SEND_WINDOW + 1);
    for i in 0..messages {
        let mut payload = format!("{i:010}").into_bytes();
        payload.resize(PAYLOAD, b'.');
        let receipt = producer
            .send(OutboundMessage::new(payload))
            .await
            .map_err(|e| format!("send {i}: {e}"))?;
        receipts.push_back(receipt);
        if receipts.len() > SEND_WINDOW {
            await_receipt(receipts.pop_front()).await?;
        }
    }
    while !receipts.is_empty() {
        await_receipt(receipts.pop_front()).await?;
    }
    let published_in = started.elapsed();

    let measurable = memory::reset_peak();
    let rss_before_kib = memory::status_kib("VmRSS").unwrap_or(0);
    let started = Instant::now();
    let mut seen = vec![false; messages];
    let mut delivered = 0usize;
    let mut duplicates = 0usize;
    let mut last_new = Instant::now();
    let mut longest_gap = Duration::ZERO;
    while delivered < messages {
        if started.elapsed() > drain_limit {
            return Err(format!(
                "{delivered} of {messages} received within {drain_limit:?}"
            ));
        }
        if last_new.elapsed() > STALL_LIMIT {
            let missing: Vec<usize> = seen
                .iter()
                .enumerate()
                .filter(|(_, s)| !**s)
                .map(|(i, _)| i)
                .take(10)
                .collect();
            return Err(format!(
                "stalled: {delivered} of {messages} received, nothing new for {:?}; first \
                 missing {missing:?}",
                last_new.elapsed()
            ));
        }
        let batch = match consumer
            .receive_batch(DRAIN_BATCH, Duration::from_millis(500))
            .await
        {
            Ok(batch) => batch,
            Err(e) if e.kind() == ErrorKind::Timeout => continue,
            Err(e) => return Err(format!("receive: {e}")),
        };
        for message in &batch {
            let i = sequence(message.payload())
                .filter(|i| *i < messages)
                .ok_or_else(|| format!("a message not of this backlog: {:?}", message.payload()))?;
            if seen[i] {
                duplicates += 1;
            } else {
                seen[i] = true;
                delivered += 1;
                longest_gap = longest_gap.max(last_new.elapsed());
                last_new = Instant::now();
            }
        }
        consumer
            .acknowledge_batch(&batch)
            .await
            .map_err(|e| format!("acknowledge: {e}"))?;
    }
    let drained_in = started.elapsed();
    let peak_kib = if measurable {
        memory::status_kib("VmHWM")
    } else {
        None
    };

    // Leave nothing behind on a shared server: the topic where the backend can remove it, else
    // at least the subscription.
    let _ = producer.close().await;
    let removed = cleanup == Cleanup::Topic && backend.delete_topic(&topic).await.is_ok();
    if !removed {
        let _ = consumer.unsubscribe().await;
    }
    let _ = consumer.close().await;
    Ok(Report {
        messages,
        delivered,
        duplicates,
        published_in,
        drained_in,
        longest_gap,
        rss_before_kib,
        peak_kib,
    })
}

async fn await_receipt(receipt: Option<tg_backend_api::SendReceipt>) -> Result<(), String> {
    match receipt {
        Some(receipt) => receipt
            .await
            .map(|_| ())
            .map_err(|e| format!("send not confirmed: {e}")),
        None => Ok(()),
    }
}

/// The sequence number a backlog payload starts with.
fn sequence(payload: &[u8]) -> Option<usize> {
    std::str::from_utf8(payload.get(..10)?).ok()?.parse().ok()
}

/// The process's resident memory, from `/proc/self` (Linux).
mod memory {
    /// A field of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`).
    pub(super) fn status_kib(field: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Resets the process's peak resident memory (`VmHWM`) to what it is now (Linux ≥ 4.0).
    pub(super) fn reset_peak() -> bool {
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_reads_the_padded_number() {
        let mut payload = format!("{:010}", 123_456).into_bytes();
        payload.resize(PAYLOAD, b'.');
        assert_eq!(sequence(&payload), Some(123_456));
        assert_eq!(sequence(b"12345"), None);
        assert_eq!(sequence(b"abcdefghij...."), None);
    }

    #[test]
    fn memory_bound_is_checked_only_when_measured() {
        let mut report = Report {
            messages: 1,
            delivered: 1,
            duplicates: 0,
            published_in: Duration::ZERO,
            drained_in: Duration::ZERO,
            longest_gap: Duration::ZERO,
            rss_before_kib: 10_000,
            peak_kib: Some(10_000 + 25 * 1024),
        };
        assert!(report.check_memory(24).is_err());
        assert!(report.check_memory(25).is_ok());
        report.peak_kib = None;
        assert!(report.check_memory(0).is_ok());
    }

    #[test]
    fn memory_backend_drains_a_small_backlog() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let report = runtime
            .block_on(async {
                let backend = tg_backend_memory::MemoryBackend::new();
                drain(&backend, 2_000, Duration::from_secs(30), Cleanup::Topic).await
            })
            .unwrap();
        assert_eq!(report.delivered, 2_000);
        assert_eq!(report.duplicates, 0);
    }
}
