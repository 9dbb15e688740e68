//! The state every clone of an MQTT backend, its producers and its consumers share: the
//! configuration, the lifecycle and the producer connection.

use std::sync::Arc;

use tg_backend_api::kit::Lifecycle;
use tg_backend_api::Result;

use crate::config::MqttConfig;
use crate::connection::{Connection, ConnectionSpec, PACKET_HEADROOM};
use crate::topic::producer_client_id;

/// One connected MQTT backend.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) config: MqttConfig,
    pub(crate) life: Lifecycle,
    /// The one connection every producer of the backend publishes through; consumers hand
    /// messages back (nack, close) through it too.
    pub(crate) producer: Arc<Connection>,
}

impl Core {
    /// Checks `config` and opens the producer connection.
    pub(crate) async fn connect(config: MqttConfig) -> Result<Self> {
        config.check()?;
        let spec = ConnectionSpec {
            client_id: producer_client_id(&config.client_id_prefix),
            session_expiry: None,
            session: None,
        };
        let producer = Connection::open(&config, spec).await?;
        tracing::debug!(broker = %config.redacted_url(), client_id = producer.client_id(), "MQTT backend connected");
        Ok(Self {
            config,
            life: Lifecycle::new("MQTT backend"),
            producer,
        })
    }

    /// The payload limit: the configured one, lowered to fit the broker's Maximum Packet Size.
    pub(crate) fn max_payload(&self) -> usize {
        let broker = self.producer.broker_max_packet();
        let headroom = PACKET_HEADROOM.min(broker / 4);
        self.config.max_payload.min(broker - headroom)
    }
}
