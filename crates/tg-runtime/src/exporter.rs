//! An HTTP endpoint serving the metrics registry (feature `http-exporter`).

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::encode_text;

/// The content type of the OpenMetrics text format `prometheus-client` writes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` (the registry in the OpenMetrics text format, which Prometheus scrapes)
/// on `listener` until `shutdown` is cancelled; other paths get 404.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// use std::sync::Arc;
/// use prometheus_client::registry::Registry;
/// use tg_runtime::RuntimeMetrics;
///
/// let mut registry = Registry::default();
/// let metrics = RuntimeMetrics::register(&mut registry);
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:9464").await?;
/// let token = tg_runtime::CancellationToken::new();
/// tokio::spawn(tg_runtime::serve_metrics(listener, Arc::new(registry), token));
/// # Ok(()) }
/// ```
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let registry = registry.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&registry, &req)) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn respond(registry: &Registry, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" || req.method() != Method::GET {
        let mut resp = Response::new(Full::new(Bytes::from_static(
            b"not found; try GET /metrics\n",
        )));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    }
    let mut resp = Response::new(Full::new(Bytes::from(encode_text(registry))));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
    );
    resp
}
