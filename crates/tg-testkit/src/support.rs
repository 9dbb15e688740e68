//! Helpers for backend-specific integration tests that need a real server.

use std::net::TcpListener;

/// Whether the tests run under CI (`CI=true` or `CI=1`), where a missing server is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Says why a test cannot run and returns; under CI it fails the test instead.
///
/// # Panics
///
/// Under CI, always: a missing server there is a failure, never a silent skip.
pub fn skip(why: &str) {
    assert!(!in_ci(), "CI=true and {why}");
    eprintln!("SKIPPED: {why} (set CI=true to make this a failure)");
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server a test starts itself.
///
/// # Panics
///
/// When the operating system gives no port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}
