//! What the Kafka tests share: the broker `cargo xtask test kafka` started, a broker of a test's
//! own (for restarts), unique names.

#![allow(dead_code)]

use std::path::PathBuf;

use tg_backend_kafka::{KafkaBackend, KafkaConfig};
use tg_testkit::servers::OwnServer;
use tg_testkit::support::skip;

/// The broker URL of the test run (`KAFKA_URL`, set by `cargo xtask test kafka`), or `None`
/// after saying why (a failure under `CI=true`).
pub(crate) fn url() -> Option<String> {
    match std::env::var("KAFKA_URL").ok().filter(|v| !v.is_empty()) {
        Some(url) => Some(url),
        None => {
            skip("KAFKA_URL is not set (run `cargo xtask test kafka`)");
            None
        }
    }
}

/// A backend on `url` with these URL options added.
pub(crate) async fn backend(url: &str, options: &str) -> KafkaBackend {
    let url = if options.is_empty() {
        url.to_owned()
    } else {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{options}")
    };
    KafkaBackend::connect(KafkaConfig::from_url(&url).unwrap())
        .await
        .unwrap()
}

/// A name no other test run uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    )
}

/// A tansu broker of the test's own (`TANSU_BIN`, set by `cargo xtask test kafka`) on a free
/// port, started; `None` after saying why it cannot (a failure under `CI=true`).
pub(crate) fn own_tansu() -> Option<OwnServer> {
    let Some(binary) = std::env::var_os("TANSU_BIN").map(PathBuf::from) else {
        skip("TANSU_BIN is not set (run `cargo xtask test kafka`)");
        return None;
    };
    let mut server = OwnServer::tansu(&binary)?;
    server.start();
    Some(server)
}
