//! Mapping `tokio-postgres` and pool errors to tg-pubsub's [`Error`].

use tg_backend_api::{Error, ErrorKind};

/// Maps a `tokio-postgres` error; `server` is `host:port` (never credentials).
pub(crate) fn pg(e: tokio_postgres::Error, what: &'static str, server: &str) -> Error {
    let kind = match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            if code.starts_with("28") {
                ErrorKind::Auth
            } else if code == "3D000" {
                // invalid_catalog_name: the database does not exist
                ErrorKind::ConfigInvalid
            } else if code.starts_with("08") || code.starts_with("57") || code.starts_with("53") {
                ErrorKind::Connection
            } else {
                ErrorKind::Unexpected
            }
        }
        // Everything without a server error code is about the connection (I/O, closed, TLS,
        // connect timeout, protocol).
        None => ErrorKind::Connection,
    };
    let message = match e.as_db_error() {
        Some(db) => format!(
            "PostgreSQL {what} failed: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        ),
        // tokio-postgres prints only its kind ("error connecting to server", "invalid
        // configuration"): the causes say what went wrong
        None => {
            let mut text = format!("PostgreSQL {what} failed: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    };
    Error::new(kind, message).with_context("server", server)
}

/// Maps a pool error.
pub(crate) fn pool(e: deadpool_postgres::PoolError, server: &str) -> Error {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e, "connect", server),
        deadpool_postgres::PoolError::Timeout(t) => Error::new(
            ErrorKind::Connection,
            format!("PostgreSQL connection pool timed out ({t:?})"),
        )
        .with_context("server", server),
        deadpool_postgres::PoolError::Closed => Error::closed("PostgreSQL backend"),
        other => Error::new(
            ErrorKind::Connection,
            format!("PostgreSQL connection pool: {other}"),
        )
        .with_context("server", server),
    }
}

/// Whether retrying on a fresh connection may help.
pub(crate) fn retryable(e: &Error) -> bool {
    e.kind() == ErrorKind::Connection
}

/// The same error again, for every waiter on one failed statement: [`Error`] is not `Clone`, so
/// this rebuilds one with the same kind, message and context.
pub(crate) fn clone_error(e: &Error) -> Error {
    let mut out = Error::new(e.kind(), e.message().to_owned()).set_temporary(e.is_temporary());
    for (k, v) in e.context() {
        out = out.with_context(k, v);
    }
    out
}
