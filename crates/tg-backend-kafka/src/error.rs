//! librdkafka's errors as tg-pubsub errors.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tg_backend_api::{Error, ErrorKind};

/// The kind a librdkafka error code stands for.
pub(crate) fn kind_of(code: RDKafkaErrorCode) -> ErrorKind {
    use RDKafkaErrorCode as C;
    match code {
        C::BrokerTransportFailure
        | C::Resolve
        | C::AllBrokersDown
        | C::BrokerNotAvailable
        | C::BrokerDestroy
        | C::DestroyBroker
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::CoordinatorLoadInProgress
        | C::WaitingForCoordinator
        | C::NotLeaderForPartition
        | C::LeaderNotAvailable
        | C::NetworkException => ErrorKind::Connection,
        C::MessageTimedOut | C::OperationTimedOut | C::RequestTimedOut | C::TimedOutQueue => {
            ErrorKind::Timeout
        }
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed => ErrorKind::Auth,
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => {
            ErrorKind::PayloadTooLarge
        }
        C::QueueFull => ErrorKind::QueueFull,
        C::UnknownTopic
        | C::UnknownPartition
        | C::UnknownTopicOrPartition
        | C::UnknownGroup
        | C::GroupIdNotFound => ErrorKind::NotFound,
        C::InvalidTopic => ErrorKind::InvalidTopic,
        C::InvalidConfig | C::InvalidReplicationFactor | C::InvalidPartitions => {
            ErrorKind::ConfigInvalid
        }
        _ => ErrorKind::Unexpected,
    }
}

/// A librdkafka error as a tg-pubsub error, with `what` (the operation) before its text.
pub(crate) fn from_kafka(what: &str, err: KafkaError) -> Error {
    let kind = match &err {
        KafkaError::ClientConfig(..) => ErrorKind::ConfigInvalid,
        KafkaError::Canceled => ErrorKind::Closed,
        other => other
            .rdkafka_error_code()
            .map_or(ErrorKind::Unexpected, kind_of),
    };
    // librdkafka's text of a refused setting names its value, which may be the password
    let text = match &err {
        KafkaError::ClientConfig(_, desc, key, _) => format!("setting {key}: {desc}"),
        other => other.to_string(),
    };
    Error::new(kind, format!("{what}: {text}")).with_source(err_source(text))
}

/// The source of an error, as text (librdkafka's errors carry no secrets except the one
/// `from_kafka` leaves out).
fn err_source(text: String) -> Box<dyn std::error::Error + Send + Sync> {
    text.into()
}

/// An error librdkafka reported by code.
pub(crate) fn from_code(what: &str, code: RDKafkaErrorCode) -> Error {
    Error::new(kind_of(code), format!("{what}: {code}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let e = from_kafka(
            "send",
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
        );
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge);
        assert!(e.message().starts_with("send: "), "{e}");
        assert_eq!(
            from_code("connect", RDKafkaErrorCode::AllBrokersDown).kind(),
            ErrorKind::Connection
        );
        assert!(from_code("connect", RDKafkaErrorCode::AllBrokersDown).is_temporary());
        assert_eq!(
            from_code("join", RDKafkaErrorCode::SaslAuthenticationFailed).kind(),
            ErrorKind::Auth
        );
    }

    #[test]
    fn a_refused_setting_does_not_show_its_value() {
        let e = from_kafka(
            "create",
            KafkaError::ClientConfig(
                rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
                "bad value".into(),
                "sasl.password".into(),
                "hunter2".into(),
            ),
        );
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
    }
}
