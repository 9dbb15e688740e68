//! The conformance suite against the Redis server of `REDIS_URL` (default: the local one), and the
//! backend's page in `docs/`.
//!
//! Every run uses its own key prefix and deletes its keys at the end, so runs leave nothing behind.

use std::process::ExitCode;

use tg_backend_redis::{RedisConfig, DRIVER};

fn main() -> ExitCode {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| RedisConfig::DEFAULT_URL.to_owned());
    let prefix = format!("tgps-conf-{}", std::process::id());
    let code = tg_testkit::Suite::for_driver_with(&DRIVER, &[("prefix", &prefix)])
        .doc_page(include_str!("../../../docs/redis.md"))
        .run();
    if let Ok(config) = RedisConfig::from_url(&url) {
        cleanup(&config, &prefix);
    }
    code
}

/// Deletes the keys this run created.
fn cleanup(config: &RedisConfig, prefix: &str) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Tcp(config.host.clone(), config.port),
            redis: redis::RedisConnectionInfo {
                db: config.db,
                username: config.username.clone(),
                password: config.password.as_ref().map(|p| p.expose().to_owned()),
                ..Default::default()
            },
        };
        let Ok(client) = redis::Client::open(info) else {
            return;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return;
        };
        let pattern = format!("{prefix}/*");
        let mut cursor: u64 = 0;
        loop {
            let Ok((next, keys)) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async::<(u64, Vec<String>)>(&mut conn)
                .await
            else {
                return;
            };
            if !keys.is_empty() {
                let _ = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut conn)
                    .await;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    });
}
