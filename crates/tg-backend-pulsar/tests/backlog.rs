//! The backlog check against the Pulsar broker of `PULSAR_URL` (`cargo xtask test pulsar` starts
//! pulsar-lite behind the checksum relay and sets it): 200,000 messages in the subscription's
//! backlog while its consumer is not receiving, then drained. The consumer's receiver queue
//! (flow permits) bounds what the broker pushes, so its memory stays at that. The subscription is
//! removed afterwards.
//!
//! Its own test binary (so its own process): the memory it measures is the process's. See
//! [`tg_testkit::backlog`] for what is checked.

fn main() -> std::process::ExitCode {
    tg_testkit::backlog::Backlog::for_driver(&tg_backend_pulsar::DRIVER).run()
}
