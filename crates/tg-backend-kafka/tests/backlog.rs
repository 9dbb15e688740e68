//! The backlog check on Kafka (the broker `KAFKA_URL` or `KAFKA_BOOTSTRAP_SERVERS` names; `cargo
//! xtask test kafka` starts tansu for it): 200,000 records in the topic while the group's
//! consumer is not receiving, then drained. librdkafka's fetch queue bounds what the consumer
//! holds. The broker is the test run's own, so only the group is removed afterwards: deleting
//! topics on tansu crashes librdkafka (docs/kafka.md, known defects).
//!
//! Its own test binary (so its own process): the memory it measures is the process's. See
//! [`tg_testkit::backlog`] for what is checked.

fn main() -> std::process::ExitCode {
    tg_testkit::backlog::Backlog::for_driver(&tg_backend_kafka::DRIVER)
        .cleanup(tg_testkit::backlog::Cleanup::Subscription)
        .run()
}
