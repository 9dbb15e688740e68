//! The backlog check against the PostgreSQL server of `POSTGRES_URL` (default: the local one,
//! database `test`): 200,000 rows waiting for a subscription whose consumer is not claiming,
//! then drained. The consumer claims `batch_size` rows at a time, so its memory stays at that
//! whatever the table holds. The topic's rows and subscriptions are removed afterwards.
//!
//! Its own test binary (so its own process): the memory it measures is the process's. See
//! [`tg_testkit::backlog`] for what is checked.

fn main() -> std::process::ExitCode {
    tg_testkit::backlog::Backlog::for_driver(&tg_backend_postgres::DRIVER).run()
}
