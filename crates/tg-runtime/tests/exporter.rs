//! The HTTP metrics endpoint (feature `http-exporter`).
#![cfg(feature = "http-exporter")]

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tg_runtime::{serve_metrics, CancellationToken, RuntimeMetrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn serves_metrics() {
    let mut registry = Registry::default();
    let metrics = RuntimeMetrics::register(&mut registry);
    metrics.consumer("q1/tg/flow/x", "s").received.inc();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let server = tokio::spawn(serve_metrics(listener, Arc::new(registry), token.clone()));
    let ok = get(addr, "/metrics").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("application/openmetrics-text"), "{ok}");
    assert!(
        ok.contains("tg_pubsub_received_total{topic=\"q1/tg/flow/x\",subscription=\"s\"} 1"),
        "{ok}"
    );
    assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
    token.cancel();
    server.await.unwrap().unwrap();
}
