//! The conformance suite against the PostgreSQL server of `DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`).

fn main() -> std::process::ExitCode {
    tg_testkit::Suite::for_driver_with(&tg_backend_postgres::DRIVER, &[("pool_size", "4")]).run()
}
