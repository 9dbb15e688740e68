//! Mapping the client crate's errors to [`tg_backend_api::Error`].

use redis::RedisError;
use tg_backend_api::{Error, ErrorKind};

/// Whether retrying on a fresh connection may help.
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::IoError | redis::ErrorKind::BusyLoadingError
        )
}

/// The kind of a client error.
pub(crate) fn kind_of(e: &RedisError) -> ErrorKind {
    match e.code() {
        Some("WRONGPASS" | "NOAUTH" | "NOPERM") => return ErrorKind::Auth,
        Some("NOGROUP") => return ErrorKind::NotFound,
        _ => {}
    }
    if e.kind() == redis::ErrorKind::AuthenticationFailed {
        ErrorKind::Auth
    } else if is_connection_error(e) {
        ErrorKind::Connection
    } else {
        ErrorKind::Unexpected
    }
}

/// Converts a client error, naming what we did and the server (never the password: the
/// client's errors do not carry it, and `server` is the configuration's `server()`, which has no
/// credentials).
pub(crate) fn convert(e: RedisError, what: &str, server: &str) -> Error {
    let kind = kind_of(&e);
    Error::new(kind, format!("{what}: {e}")).with_context("server", server)
}
