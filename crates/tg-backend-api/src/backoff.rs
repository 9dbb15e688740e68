//! Exponential back-off with optional full jitter.

use std::time::Duration;

use rand::Rng;

/// Exponential back-off: the delay before retry `n` (1-based) is `initial × factor^(n-1)`, capped
/// at `max`; with `jitter` on, the delay actually used is drawn uniformly from `[0, that]`
/// ("full jitter", so that many clients retrying at once spread out).
///
/// ```
/// use std::time::Duration;
/// use tg_backend_api::Backoff;
///
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).jitter(false);
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(2), Duration::from_millis(200));
/// assert_eq!(b.delay(5), Duration::from_secs(1)); // capped
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
    /// Growth per retry. Default: 2.
    pub factor: f64,
    /// Full jitter. Default: on.
    pub jitter: bool,
}

impl Backoff {
    /// Doubling from `initial` up to `max`, with full jitter.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            factor: 2.0,
            jitter: true,
        }
    }

    /// Sets the growth factor (values below 1 are taken as 1).
    #[must_use]
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor.max(1.0);
        self
    }

    /// Turns full jitter on or off.
    #[must_use]
    pub const fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// The delay before retry `retry` (1-based), without jitter.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.max(1.0).powi(exp);
        let max = self.max.max(self.initial);
        if !secs.is_finite() || secs >= max.as_secs_f64() {
            max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay to wait before retry `retry` (1-based), jittered if configured.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        if self.jitter && !ceiling.is_zero() {
            let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(rand::thread_rng().gen_range(0..=nanos))
        } else {
            ceiling
        }
    }

    /// The default for reconnecting: 50 ms doubling to 1 s, jittered — so a runner is consuming
    /// again well within 2 s of the broker coming back.
    pub const fn reconnect() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(1))
    }
}

impl Default for Backoff {
    /// 100 ms doubling to 10 s, jittered.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100)).jitter(false);
        let d: Vec<_> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(d, [10, 20, 40, 80, 100, 100]);
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_below_ceiling() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        for n in 1..20 {
            assert!(b.delay(n) <= b.ceiling(n));
        }
    }
}
