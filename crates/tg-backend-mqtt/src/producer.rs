//! The MQTT producer: publishes through the backend's shared producer connection.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use tg_backend_api::kit::RawProducer;
use tg_backend_api::{
    Error, ErrorKind, MessageId, OutboundMessage, Properties, Result, SendReceipt, Topic,
};

use crate::core::Core;
use crate::error::unconfirmed;
use crate::session::KEY_PROPERTY;
use crate::topic::{mqtt_qos, mqtt_topic};
use crate::NO_SUBSCRIBERS_SUFFIX;

/// How long `close` waits for the broker to confirm what was sent.
const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// The MQTT producer (as the kit sees it; applications get it as a `Box<dyn Producer>`).
pub struct MqttProducer {
    topic: Topic,
    mqtt_topic: String,
    qos: QoS,
    core: Arc<Core>,
    send_timeout: Option<Duration>,
}

impl MqttProducer {
    pub(crate) fn new(topic: &Topic, core: Arc<Core>, send_timeout: Option<Duration>) -> Self {
        Self {
            mqtt_topic: mqtt_topic(topic),
            qos: mqtt_qos(topic.qos()),
            topic: topic.clone(),
            core,
            send_timeout,
        }
    }
}

/// The MQTT 5 properties a message is published with: its properties as user properties, and
/// its key as one more, `tg-key` (none at all when there is neither).
pub fn publish_properties(
    properties: Properties,
    key: Option<String>,
) -> Option<PublishProperties> {
    let mut user: Vec<(String, String)> = properties.into_iter().collect();
    if let Some(key) = key {
        user.push((KEY_PROPERTY.to_owned(), key));
    }
    (!user.is_empty()).then(|| PublishProperties {
        user_properties: user,
        ..Default::default()
    })
}

impl RawProducer for MqttProducer {
    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        let retain = message.is_retained();
        // q2 messages carry their `tg-dedup-id` among the properties: the kit set it.
        let (payload, properties, key) = message.into_parts();
        let props = publish_properties(properties, key);
        let mut publish = Publish::new(self.mqtt_topic.as_str(), self.qos, payload, props);
        publish.retain = retain;
        // The kit checked the payload against `max_payload`; what counts for the broker is the
        // whole packet, properties included, against the limit it announced last.
        let conn = &self.core.producer;
        let size = publish.size();
        let broker_max = conn.broker_max_packet();
        if size > broker_max {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "the MQTT packet of {size} bytes (payload, topic and properties) exceeds the \
                     broker's maximum packet size of {broker_max} bytes"
                ),
            )
            .with_context("topic", &self.topic));
        }
        let rx = conn.publish(publish).await?;
        let topic = self.topic.clone();
        let send_timeout = self.send_timeout;
        Ok(SendReceipt::from_future(async move {
            let confirmed = match send_timeout {
                Some(t) => tokio::time::timeout(t, rx).await.map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("the broker did not confirm within {t:?}"),
                    )
                    .with_context("topic", &topic)
                })?,
                None => rx.await,
            };
            match confirmed {
                Ok(Ok(c)) if c.matched => Ok(c.id),
                Ok(Ok(c)) => Ok(MessageId::from_text(format!(
                    "{}{NO_SUBSCRIBERS_SUFFIX}",
                    c.id
                ))),
                Ok(Err(e)) => Err(e.with_context("topic", &topic)),
                Err(_) => Err(unconfirmed().with_context("topic", &topic)),
            }
        }))
    }

    async fn flush(&self) -> Result<()> {
        self.core.producer.flush().await
    }

    async fn close(&self) -> Result<()> {
        // When the backend closes, its shutdown flushes the connection once for every producer.
        if self.core.life.is_closed() {
            return Ok(());
        }
        match tokio::time::timeout(CLOSE_FLUSH_LIMIT, self.core.producer.flush()).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "closed without the broker confirming every message within {CLOSE_FLUSH_LIMIT:?}; \
                     the unconfirmed ones are still being sent"
                ),
            )
            .with_context("topic", &self.topic)),
        }
    }

    /// Nothing to release: the connection is the backend's, and what was sent is confirmed
    /// (or not) through the receipts either way.
    fn close_sync(&self) -> bool {
        true
    }
}

impl fmt::Debug for MqttProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttProducer")
            .field("topic", &self.topic)
            .field("mqtt_topic", &self.mqtt_topic)
            .finish()
    }
}
