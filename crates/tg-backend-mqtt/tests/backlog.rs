//! A consumer working off a large q1 backlog that built while it was not receiving: every
//! message arrives, without stalls, and the consumer's memory stays at its buffer.
//!
//! Its own test binary (so its own process): the memory it measures is the process's, and the
//! tests of `mqtt_specific.rs` running alongside would blur it. It starts its own Mosquitto with
//! `max_queued_messages 1000000` (what the docs recommend for q1/q2 work queues): with
//! Mosquitto's default of 1,000 the broker would drop most of the backlog.
//!
//! The broker must keep to the consumer's Receive Maximum, which Mosquitto before 2.0.13 (Debian
//! bookworm's 2.0.11) does not (see [`OwnServer::current_mosquitto`]): there it
//! sends the backlog as fast as the socket takes it, and the check is skipped with that reason.
//! `cargo xtask test mqtt` runs it on Mosquitto 2.0.21, the other MQTT tests on the machine's.

use std::time::Duration;

use tg_backend_api::Backend;
use tg_backend_mqtt::{MqttBackend, MqttConfig};
use tg_testkit::backlog::{self, Cleanup};
use tg_testkit::servers::OwnServer;

/// Most the process's peak resident memory may grow while draining: the consumer's buffer is
/// 20 × `receive_maximum` (100) = 2,000 messages, plus rumqttc's read buffers and the bookkeeping
/// per packet id (65,535 entries at most).
const RSS_GROWTH_LIMIT_MIB: u64 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_built_while_not_receiving_drains_completely_in_bounded_memory() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let Some(mut broker) = OwnServer::current_mosquitto("") else {
        return;
    };
    broker.start();
    let backend = MqttBackend::connect(MqttConfig::from_url(broker.url()).unwrap())
        .await
        .unwrap();
    // The broker is the test's own: only the subscription (the persistent session) is removed.
    let report = backlog::drain(
        &backend,
        backlog::MESSAGES,
        Duration::from_secs(120),
        Cleanup::Subscription,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nthe broker's output:\n{}", broker.output()));
    eprintln!("mqtt: {report}");
    assert_eq!(report.delivered, backlog::MESSAGES);
    report.check_memory(RSS_GROWTH_LIMIT_MIB).unwrap();
    backend.close().await.unwrap();
}
