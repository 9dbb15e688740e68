//! The conformance suite against the PostgreSQL server of `DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), and the backend's page in `docs/`.

fn main() -> std::process::ExitCode {
    tg_testkit::Suite::for_driver_with(&tg_backend_postgres::DRIVER, &[("pool_size", "4")])
        .doc_page(include_str!("../../../docs/postgres.md"))
        .run()
}
