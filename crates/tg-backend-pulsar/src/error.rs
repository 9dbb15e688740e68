//! Mapping the `pulsar` crate's errors to [`tg_backend_api::Error`].

use pulsar::error::{ConnectionError, ConsumerError, ProducerError, ServiceDiscoveryError};
use pulsar::proto::ServerError;
use tg_backend_api::{Error, ErrorKind};

/// The kind of a broker-reported error code.
fn server_kind(code: ServerError) -> ErrorKind {
    match code {
        ServerError::ConsumerBusy | ServerError::ProducerBusy => ErrorKind::ConsumerBusy,
        ServerError::AuthenticationError | ServerError::AuthorizationError => ErrorKind::Auth,
        ServerError::TopicNotFound | ServerError::SubscriptionNotFound => ErrorKind::NotFound,
        ServerError::ServiceNotReady
        | ServerError::PersistenceError
        | ServerError::MetadataError
        | ServerError::TooManyRequests => ErrorKind::Connection,
        ServerError::ProducerBlockedQuotaExceededError
        | ServerError::ProducerBlockedQuotaExceededException => ErrorKind::QueueFull,
        ServerError::InvalidTopicName => ErrorKind::InvalidTopic,
        ServerError::NotAllowedError | ServerError::UnsupportedVersionError => {
            ErrorKind::Unsupported
        }
        _ => ErrorKind::Unexpected,
    }
}

fn connection_kind(e: &ConnectionError) -> ErrorKind {
    match e {
        ConnectionError::PulsarError(Some(code), _) => server_kind(*code),
        ConnectionError::Authentication(_) => ErrorKind::Auth,
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
        ConnectionError::SlowDown => ErrorKind::QueueFull,
        ConnectionError::Decoding(_) | ConnectionError::Encoding(_) => ErrorKind::Unexpected,
        _ => ErrorKind::Connection,
    }
}

/// The kind of a client error.
pub(crate) fn kind_of(e: &pulsar::Error) -> ErrorKind {
    match e {
        pulsar::Error::Connection(c) => connection_kind(c),
        pulsar::Error::Consumer(ConsumerError::Connection(c)) => connection_kind(c),
        pulsar::Error::Consumer(ConsumerError::Closed) => ErrorKind::Closed,
        pulsar::Error::Consumer(_) => ErrorKind::Unexpected,
        pulsar::Error::Producer(ProducerError::Connection(c)) => connection_kind(c),
        pulsar::Error::Producer(ProducerError::Batch(inner)) => kind_of(inner),
        pulsar::Error::Producer(ProducerError::Closed) => ErrorKind::Closed,
        pulsar::Error::Producer(ProducerError::Fenced) => ErrorKind::ConsumerBusy,
        pulsar::Error::Producer(_) => ErrorKind::Unexpected,
        pulsar::Error::ServiceDiscovery(ServiceDiscoveryError::Query(Some(code), _)) => {
            server_kind(*code)
        }
        pulsar::Error::ServiceDiscovery(ServiceDiscoveryError::Connection(c)) => connection_kind(c),
        pulsar::Error::ServiceDiscovery(ServiceDiscoveryError::NotFound) => ErrorKind::NotFound,
        pulsar::Error::ServiceDiscovery(_) => ErrorKind::Connection,
        pulsar::Error::Authentication(_) => ErrorKind::Auth,
        pulsar::Error::Executor => ErrorKind::Closed,
        _ => ErrorKind::Unexpected,
    }
}

/// Converts a client error, naming what we did and the server (the client's errors never carry
/// the token).
pub(crate) fn convert(e: pulsar::Error, what: &str, server: &str) -> Error {
    let kind = kind_of(&e);
    Error::new(kind, format!("{what}: {e}")).with_context("server", server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_codes_map_to_kinds() {
        let busy = pulsar::Error::Connection(ConnectionError::PulsarError(
            Some(ServerError::ConsumerBusy),
            Some("Exclusive consumer is already connected".into()),
        ));
        assert_eq!(kind_of(&busy), ErrorKind::ConsumerBusy);
        let auth = pulsar::Error::Connection(ConnectionError::PulsarError(
            Some(ServerError::AuthenticationError),
            None,
        ));
        let err = convert(auth, "cannot connect", "pulsar://h:6650");
        assert_eq!(err.kind(), ErrorKind::Auth);
        assert_eq!(err.context_value("server"), Some("pulsar://h:6650"));
        assert_eq!(
            kind_of(&pulsar::Error::Connection(ConnectionError::Disconnected)),
            ErrorKind::Connection
        );
        assert_eq!(
            kind_of(&pulsar::Error::Producer(ProducerError::Closed)),
            ErrorKind::Closed
        );
    }
}
