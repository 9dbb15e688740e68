//! Configuration of the in-memory backend.

use std::fmt;
use std::str::FromStr;

use tg_backend_api::{Error, Result};

/// What a producer does when a subscription holds [`MemoryConfig::subscription_capacity`] messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Wait until the subscription's consumers make room (the default).
    #[default]
    Block,
    /// Fail at once with [`ErrorKind::QueueFull`](tg_backend_api::ErrorKind::QueueFull).
    Fail,
}

impl FromStr for Overflow {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "block" => Ok(Self::Block),
            "fail" => Ok(Self::Fail),
            _ => Err(Error::config(format!(
                "unknown overflow policy {s:?}; expected block or fail"
            ))),
        }
    }
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Block => "block",
            Self::Fail => "fail",
        })
    }
}

/// Configuration of [`MemoryBackend`](crate::MemoryBackend).
///
/// From a URL: `memory://?capacity=1000&overflow=fail&retention=100&max_payload=65536&dedup_window=1000`
/// (every parameter optional).
///
/// ```
/// use tg_backend_memory::{MemoryConfig, Overflow};
/// let config = MemoryConfig::from_url("memory://?capacity=1000&overflow=fail").unwrap();
/// assert_eq!(config.subscription_capacity, 1000);
/// assert_eq!(config.overflow, Overflow::Fail);
/// assert_eq!(config.retention, MemoryConfig::default().retention);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Messages one subscription may hold, pending plus unacknowledged. Default: 100,000.
    /// The bound is exceeded by at most one message per producer sending at that moment.
    pub subscription_capacity: usize,
    /// What a producer does at the bound. Default: [`Overflow::Block`].
    pub overflow: Overflow,
    /// Messages a q1/q2 topic keeps for subscriptions created at `Earliest`. Default: 10,000.
    pub retention: usize,
    /// Largest payload in bytes. Default: 5 MiB (Pulsar's default message size).
    pub max_payload: usize,
    /// How many recent de-duplication ids a q2 topic remembers. Default: 100,000.
    pub dedup_window: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            subscription_capacity: 100_000,
            overflow: Overflow::Block,
            retention: 10_000,
            max_payload: 5 * 1024 * 1024,
            dedup_window: 100_000,
        }
    }
}

impl MemoryConfig {
    /// The URL scheme, `memory`.
    pub const SCHEME: &'static str = "memory";

    /// Parses `memory://?key=value&…`.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::config(format!("malformed memory URL {url:?}: {e}")))?;
        if parsed.scheme() != Self::SCHEME {
            return Err(Error::config(format!(
                "memory URL must start with memory://, got scheme {:?}",
                parsed.scheme()
            )));
        }
        let mut config = Self::default();
        for (key, value) in parsed.query_pairs() {
            let number = || {
                value.parse::<usize>().map_err(|e| {
                    Error::config(format!(
                        "memory URL parameter {key}={value:?} is not a number: {e}"
                    ))
                })
            };
            match &*key {
                "capacity" => config.subscription_capacity = number()?.max(1),
                "retention" => config.retention = number()?,
                "max_payload" => config.max_payload = number()?,
                "dedup_window" => config.dedup_window = number()?,
                "overflow" => config.overflow = value.parse()?,
                other => {
                    return Err(Error::config(format!(
                        "unknown memory URL parameter {other:?}; known: capacity, overflow, \
                         retention, max_payload, dedup_window"
                    )))
                }
            }
        }
        Ok(config)
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

    /// Sets the largest payload.
    #[must_use]
    pub fn max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload;
        self
    }

    /// Sets the de-duplication window.
    #[must_use]
    pub fn dedup_window(mut self, window: usize) -> Self {
        self.dedup_window = window;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tg_backend_api::ErrorKind;

    #[test]
    fn url_parameters() {
        let c = MemoryConfig::from_url(
            "memory://?capacity=5&retention=7&max_payload=9&dedup_window=11&overflow=block",
        )
        .unwrap();
        assert_eq!(
            (
                c.subscription_capacity,
                c.retention,
                c.max_payload,
                c.dedup_window,
                c.overflow
            ),
            (5, 7, 9, 11, Overflow::Block)
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
            ("memory://?capacity=lots", "capacity"),
            ("memory://?colour=blue", "colour"),
            ("memory://?overflow=drop", "overflow"),
            ("not a url", "malformed"),
        ] {
            let err = MemoryConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }
}
