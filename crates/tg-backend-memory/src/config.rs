//! Configuration of the in-memory backend.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tg_backend_api::kit::config::{self, require};
use tg_backend_api::Result;

/// What a producer does when a subscription holds [`MemoryConfig::subscription_capacity`] messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Wait until the subscription's consumers make room (the default).
    #[default]
    Block,
    /// Fail at once with [`ErrorKind::QueueFull`](tg_backend_api::ErrorKind::QueueFull).
    Fail,
}

/// Configuration of [`MemoryBackend`](crate::MemoryBackend).
///
/// From a URL (`MEMORY_URL` / `--memory-url`), every option optional:
/// `memory://?capacity=1000&overflow=fail&retention=100&max_payload=65536&dedup_window=10m&dedup_capacity=1000`.
///
/// ```
/// use std::time::Duration;
/// use tg_backend_memory::{MemoryConfig, Overflow};
/// let config = MemoryConfig::from_url("memory://?capacity=1000&overflow=fail&dedup_window=30s").unwrap();
/// assert_eq!(config.subscription_capacity, 1000);
/// assert_eq!(config.overflow, Overflow::Fail);
/// assert_eq!(config.dedup_window, Duration::from_secs(30));
/// assert_eq!(config.retention, MemoryConfig::default().retention);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Messages one subscription may hold, pending plus unacknowledged (URL option `capacity`).
    /// Default: 100,000. The bound is exceeded by at most one message per producer sending at
    /// that moment.
    #[serde(rename = "capacity")]
    pub subscription_capacity: usize,
    /// What a producer does at the bound: `block` or `fail`. Default: [`Overflow::Block`].
    pub overflow: Overflow,
    /// Messages a q1/q2 topic keeps for subscriptions created at `Earliest`. Default: 10,000.
    pub retention: usize,
    /// Largest payload in bytes. Default: 5 MiB (Pulsar's default message size).
    pub max_payload: usize,
    /// How long a q2 topic remembers a de-duplication id. Default: 10 minutes.
    #[serde(with = "config::duration")]
    pub dedup_window: Duration,
    /// Most de-duplication ids a q2 topic remembers; older ones are forgotten first, even within
    /// the window. Default: 100,000.
    pub dedup_capacity: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            subscription_capacity: 100_000,
            overflow: Overflow::Block,
            retention: 10_000,
            max_payload: 5 * 1024 * 1024,
            dedup_window: Duration::from_secs(600),
            dedup_capacity: 100_000,
        }
    }
}

impl MemoryConfig {
    /// Parses `memory://?option=value&…`.
    pub fn from_url(url: &str) -> Result<Self> {
        config::parse_url::<Self>(crate::DRIVER.title, crate::DRIVER.schemes, url)?
            .options
            .checked()
    }

    fn checked(self) -> Result<Self> {
        let what = crate::DRIVER.title;
        require(
            self.subscription_capacity >= 1,
            what,
            "capacity",
            "at least 1",
        )?;
        require(self.max_payload >= 1, what, "max_payload", "at least 1")?;
        Ok(self)
    }

    /// Sets the subscription capacity (at least 1).
    #[must_use]
    pub fn subscription_capacity(mut self, capacity: usize) -> Self {
        self.subscription_capacity = capacity.max(1);
        self
    }

    /// Sets the overflow policy.
    #[must_use]
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// Sets the retention.
    #[must_use]
    pub fn retention(mut self, retention: usize) -> Self {
        self.retention = retention;
        self
    }

    /// Sets the largest payload (at least 1).
    #[must_use]
    pub fn max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload.max(1);
        self
    }

    /// Sets how long de-duplication ids are remembered.
    #[must_use]
    pub fn dedup_window(mut self, window: Duration) -> Self {
        self.dedup_window = window;
        self
    }

    /// Sets how many de-duplication ids a topic remembers at most.
    #[must_use]
    pub fn dedup_capacity(mut self, capacity: usize) -> Self {
        self.dedup_capacity = capacity;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tg_backend_api::ErrorKind;

    #[test]
    fn url_options() {
        let c = MemoryConfig::from_url(
            "memory://?capacity=5&retention=7&max_payload=9&dedup_window=11s&dedup_capacity=13&overflow=fail",
        )
        .unwrap();
        assert_eq!(
            (
                c.subscription_capacity,
                c.retention,
                c.max_payload,
                c.dedup_window,
                c.dedup_capacity,
                c.overflow
            ),
            (5, 7, 9, Duration::from_secs(11), 13, Overflow::Fail)
        );
        assert_eq!(
            MemoryConfig::from_url("memory://").unwrap(),
            MemoryConfig::default()
        );
    }

    #[test]
    fn bad_urls_name_the_problem() {
        for (url, needle) in [
            ("redis://x", "memory://"),
            ("memory://?capacity=lots", "capacity=\"lots\""),
            ("memory://?capacity=0", "capacity must be at least 1"),
            (
                "memory://?colour=blue",
                "\"colour\"; known: capacity, overflow, retention",
            ),
            ("memory://?overflow=drop", "overflow=\"drop\""),
            ("memory://?dedup_window=100", "a duration needs a unit"),
            ("not a url", "malformed"),
        ] {
            let err = MemoryConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }
}
