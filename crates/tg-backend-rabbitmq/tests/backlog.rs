//! The backlog check against the RabbitMQ server of `RABBITMQ_URL` (default: the local one,
//! guest/guest): 200,000 messages in the subscription's queue while its consumer is not
//! receiving, then drained. The channel's prefetch bounds what the broker pushes before
//! acknowledgements, so the consumer's memory stays at that. The queue is deleted afterwards
//! (unsubscribe: RabbitMQ has no topic object to remove).
//!
//! Its own test binary (so its own process): the memory it measures is the process's. See
//! [`tg_testkit::backlog`] for what is checked.

fn main() -> std::process::ExitCode {
    tg_testkit::backlog::Backlog::for_driver(&tg_backend_rabbitmq::DRIVER).run()
}
