//! rumqttc's errors and the broker's refusals as [`tg_backend_api::Error`]s. Nothing here ever
//! includes credentials: the broker is named by `host:port` only.

use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
use rumqttc::v5::ConnectionError;
use tg_backend_api::{Error, ErrorKind};

/// A failed connection attempt, for the caller: refused credentials are `Auth`, the rest
/// `Connection`, naming the broker `address`.
pub(crate) fn connection_failed(e: &ConnectionError, address: &str) -> Error {
    let err = match e {
        ConnectionError::ConnectionRefused(
            code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
        ) => Error::new(
            ErrorKind::Auth,
            format!("the MQTT broker refused the credentials ({code:?})"),
        ),
        ConnectionError::ConnectionRefused(code) => {
            Error::connection(format!("the MQTT broker refused the connection ({code:?})"))
        }
        ConnectionError::Io(io) => Error::connection(format!("cannot reach the MQTT broker: {io}")),
        ConnectionError::Timeout(_) => Error::connection("connecting to the MQTT broker timed out"),
        #[cfg(feature = "tls")]
        ConnectionError::Tls(tls) => Error::connection(format!("TLS handshake failed: {tls}")),
        other => Error::connection(format!("MQTT connection failed: {other}")),
    };
    err.with_context("broker", address)
}

/// The broker answered a publish with a failure reason code.
pub(crate) fn refused(reason: impl std::fmt::Debug) -> Error {
    Error::new(
        ErrorKind::Unexpected,
        format!("the MQTT broker did not accept the message: {reason:?}"),
    )
}

/// The connection is closed (or its request queue is gone with its event loop).
pub(crate) fn connection_closed() -> Error {
    Error::closed("MQTT connection")
}

/// A publish's outcome will never be known: its connection closed first.
pub(crate) fn unconfirmed() -> Error {
    Error::new(
        ErrorKind::Closed,
        "the MQTT connection closed before the broker confirmed the message; it may or may not \
         have been delivered",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_credentials_are_auth_errors_without_secrets() {
        let err = connection_failed(
            &ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
            "broker:1883",
        );
        assert_eq!(err.kind(), ErrorKind::Auth);
        assert_eq!(err.context_value("broker"), Some("broker:1883"));
        let err = connection_failed(
            &ConnectionError::ConnectionRefused(ConnectReturnCode::ServerUnavailable),
            "b:1",
        );
        assert_eq!(err.kind(), ErrorKind::Connection);
    }
}
