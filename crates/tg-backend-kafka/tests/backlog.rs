//! The backlog check on Kafka (the broker `KAFKA_URL` or `KAFKA_BOOTSTRAP_SERVERS` names; `cargo
//! xtask test kafka` starts tansu for it): 200,000 records in the topic while the group's
//! consumer is not receiving, then drained. The consumer's buffer and librdkafka's fetch queue
//! (both `receiver_queue` messages) bound what it holds. The default, 100,000, is half the
//! backlog: the buffer would hold most of it, and how much of it was fetched before draining
//! starts (while publishing) decides the growth measured, so the check runs with a buffer of
//! 10,000, a twentieth of the backlog. Its bound is stated: librdkafka keeps each fetch's buffer
//! (up to `max.partition.fetch.bytes`) while any record of it is queued, fetches one answer past
//! `queued.min.messages`, and allocates per record, so 10,000 records in each queue grew the
//! process by 22 MiB; holding the backlog would take 200,000 of them. The broker is the test
//! run's own, so only the group is removed afterwards: deleting topics on tansu crashes
//! librdkafka (docs/kafka.md, known defects).
//!
//! Its own test binary (so its own process): the memory it measures is the process's. See
//! [`tg_testkit::backlog`] for what is checked.

fn main() -> std::process::ExitCode {
    tg_testkit::backlog::Backlog::for_driver_with(
        &tg_backend_kafka::DRIVER,
        &[("receiver_queue", "10000")],
    )
    .rss_limit_mib(
        36,
        "10,000 records in the member's buffer and up to 10,000 plus one fetch in librdkafka's \
         queue, each fetch's buffer kept while a record of it is queued (22 MiB measured)",
    )
    .cleanup(tg_testkit::backlog::Cleanup::Subscription)
    .run()
}
