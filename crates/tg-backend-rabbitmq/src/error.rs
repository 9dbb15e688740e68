//! lapin's errors as tg-pubsub errors: the broker's reply codes become error kinds callers act on.

use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
use tg_backend_api::{Error, ErrorKind};

/// The AMQP error the broker sent, if `e` is one.
pub(crate) fn amqp(e: &lapin::Error) -> Option<&AMQPError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp),
        _ => None,
    }
}

/// Whether the operation failed because the connection or channel went away, rather than because
/// the broker refused it: worth retrying on a new channel.
pub(crate) fn is_transport(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::InvalidChannel(_)
        | lapin::ErrorKind::InvalidChannelState(..)
        | lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::MissingHeartbeatError => true,
        lapin::ErrorKind::ProtocolError(a) => matches!(
            a.kind(),
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)
        ),
        _ => false,
    }
}

/// A lapin error as a tg-pubsub error; `doing` says what failed ("publishing to exchange x").
/// Nothing secret is in lapin's messages (the URL is never part of them).
pub(crate) fn convert(e: lapin::Error, doing: &str) -> Error {
    let kind = match e.kind() {
        lapin::ErrorKind::ProtocolError(a) => match a.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                if a.get_message().as_str().contains("in exclusive use") {
                    ErrorKind::ConsumerBusy
                } else {
                    ErrorKind::Auth
                }
            }
            AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED) => ErrorKind::ConsumerBusy,
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => ErrorKind::NotFound,
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                if a.get_message()
                    .as_str()
                    .contains("larger than configured max size")
                {
                    ErrorKind::PayloadTooLarge
                } else {
                    ErrorKind::ConfigInvalid
                }
            }
            AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => ErrorKind::PayloadTooLarge,
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)
            | AMQPErrorKind::Hard(AMQPHardError::RESOURCEERROR) => ErrorKind::Connection,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ErrorKind::Auth,
            _ => ErrorKind::Unexpected,
        },
        lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::InvalidChannel(_)
        | lapin::ErrorKind::InvalidChannelState(..)
        | lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::MissingHeartbeatError
        | lapin::ErrorKind::ChannelsLimitReached => ErrorKind::Connection,
        lapin::ErrorKind::AuthProviderError(_) => ErrorKind::Auth,
        _ => ErrorKind::Unexpected,
    };
    Error::new(kind, format!("RabbitMQ: {doing}: {e}")).with_source(e)
}

/// The error of a connection attempt: refused credentials and vhosts are `Auth` (RabbitMQ closes
/// the socket after a failed login, which lapin may report as an I/O error during the handshake).
pub(crate) fn connect_error(e: lapin::Error, server: &str) -> Error {
    let text = e.to_string();
    let auth = text.contains("ACCESS_REFUSED")
        || text.contains("ACCESSREFUSED")
        || text.contains("NOT_ALLOWED")
        || text.contains("NOTALLOWED")
        || text.contains("authentication")
        || matches!(e.kind(), lapin::ErrorKind::AuthProviderError(_))
        || amqp(&e).is_some_and(|a| {
            matches!(
                a.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            )
        });
    if auth {
        Error::new(
            ErrorKind::Auth,
            format!("RabbitMQ at {server} refused the login or the vhost: {text}"),
        )
        .with_source(e)
    } else {
        Error::connection(format!("cannot connect to RabbitMQ at {server}: {text}")).with_source(e)
    }
}
