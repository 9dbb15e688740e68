//! The conformance suite against the Pulsar broker of `PULSAR_URL` (`cargo xtask test pulsar`
//! starts pulsar-lite behind the checksum relay and sets it), and the backend's page in `docs/`.
//!
//! Every test uses its own random tenant and namespace, so runs never see each other's topics.
//! The tests listed with `known_defect` fail on pulsar-lite 0.2.0 for reasons of that broker,
//! given with the evidence; on Apache Pulsar they are expected to pass.

fn main() -> std::process::ExitCode {
    tg_testkit::Suite::for_driver(&tg_backend_pulsar::DRIVER)
    .doc_page(include_str!("../../../docs/pulsar.md"))
    .known_defect(
        "exclusive_refuses_second_consumer",
        "pulsar-lite 0.2.0 answers the second Exclusive subscribe by dropping the client's whole \
         connection instead of an error with ConsumerBusy: the subscribe fails with `Connection \
         error: Disconnected` and every producer and consumer on that connection reconnects \
         (tests/pulsar_specific.rs second_exclusive_q0_consumer_is_busy shows the same on q0)",
    )
    .run()
}
