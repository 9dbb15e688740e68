//! The backlog check on the in-memory broker: 200,000 messages published to a subscribed consumer
//! that is not receiving, then drained. The broker lives in this process, so its memory shrinks
//! while draining: the bound checks the consumer holds nothing beyond what it was given. A
//! subscription holds 100,000 messages by default and then makes producers wait; the backlog
//! needs room for all of them, as a broker needs its queue limit raised for it.
//!
//! Its own test binary (so its own process): the memory it measures is the process's. See
//! [`tg_testkit::backlog`] for what is checked.

fn main() -> std::process::ExitCode {
    tg_testkit::backlog::Backlog::for_driver_with(
        &tg_backend_memory::DRIVER,
        &[("capacity", "200000")],
    )
    .run()
}
