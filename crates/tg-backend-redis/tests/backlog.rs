//! The backlog check against the Redis server of `REDIS_URL` (default: the local one): 200,000
//! messages in the topic's stream while its group's consumer is not reading, then drained. The
//! consumer reads `batch` entries per XREADGROUP, so its memory stays at that whatever the
//! stream holds. The stream is removed afterwards.
//!
//! Its own test binary (so its own process): the memory it measures is the process's. See
//! [`tg_testkit::backlog`] for what is checked.

fn main() -> std::process::ExitCode {
    tg_testkit::backlog::Backlog::for_driver(&tg_backend_redis::DRIVER).run()
}
