//! Shutdown on SIGTERM / Ctrl-C.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C, so every runner, subscriber and heartbeat holding it shuts
/// down gracefully. Returns the watching task (abort it to stop watching).
///
/// ```no_run
/// # #[tokio::main] async fn main() {
/// let token = tg_runtime::CancellationToken::new();
/// tg_runtime::cancel_on_signal(token.clone());
/// // runner.run(token).await …
/// # }
/// ```
pub fn cancel_on_signal(token: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown_signal() => token.cancel(),
            _ = token.cancelled() => {}
        }
    })
}
