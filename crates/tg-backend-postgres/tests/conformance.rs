//! The conformance suite against the PostgreSQL server of `DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`).

use std::process::ExitCode;
use std::sync::Arc;

use tg_backend_api::Backend;
use tg_backend_postgres::{PostgresBackend, PostgresConfig};

fn main() -> ExitCode {
    let url = std::env::var(PostgresConfig::ENV_VAR)
        .unwrap_or_else(|_| PostgresConfig::DEFAULT_URL.to_owned());
    tg_testkit::Suite::new(PostgresBackend::NAME, move || {
        let url = url.clone();
        async move {
            let config = PostgresConfig::from_url(&url)?.pool_size(4);
            Ok(Arc::new(PostgresBackend::connect(config).await?) as Arc<dyn Backend>)
        }
    })
    .run()
}
