//! The backlog check against the Pulsar broker of `PULSAR_URL` (`cargo xtask test pulsar` starts
//! pulsar-lite behind the checksum relay and sets it): 200,000 messages in the subscription's
//! backlog while its consumer is not receiving, then drained. The consumer's receiver queue
//! (flow permits) bounds what the broker pushes, so its memory stays at that. The subscription is
//! removed afterwards.
//!
//! Its bound is stated: the growth follows the receiver queue, not the backlog. With the default
//! queue of 1,000 the process grew 16.9–24.9 MiB while draining (twelve runs, 24.9 in a CI run),
//! with 100 it grew 4.1–7.8 MiB (draining took 14–27 s instead of 5–8); a third to a half of it
//! is glibc's per-thread malloc arenas (11.7–13.3 MiB with `MALLOC_ARENA_MAX=1` and the default
//! queue). Holding the backlog would take far more: 200,000 messages of 100 bytes are 19 MiB of
//! payload alone.
//!
//! Its own test binary (so its own process): the memory it measures is the process's. See
//! [`tg_testkit::backlog`] for what is checked.

fn main() -> std::process::ExitCode {
    tg_testkit::backlog::Backlog::for_driver(&tg_backend_pulsar::DRIVER)
        .rss_limit_mib(
            40,
            "growth follows the receiver queue (1,000 messages: 16.9-24.9 MiB measured, 100: \
             4.1-7.8), a third to a half of it per-thread malloc arenas",
        )
        .run()
}
