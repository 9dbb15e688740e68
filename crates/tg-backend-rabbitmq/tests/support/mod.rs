//! Support of the integration tests.

#![allow(dead_code, unreachable_pub)]

pub mod node;

use lapin::{Connection, ConnectionProperties};

/// Deletes exchanges a test declared on a shared broker (queues go with `unsubscribe`), so runs
/// leave nothing behind.
pub async fn delete_exchanges(url: &str, exchanges: &[String]) {
    let url = url.split('?').next().unwrap_or(url);
    let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await else {
        return;
    };
    if let Ok(channel) = conn.create_channel().await {
        for exchange in exchanges {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
    }
    let _ = conn.close(200, "test done".into()).await;
}
