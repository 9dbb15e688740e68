//! The MQTT producer: publishes through the backend's shared producer connection.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use tg_backend_api::{
    Error, ErrorKind, MessageId, OutboundMessage, Producer, Qos, Result, SendReceipt, Topic,
};

use crate::backend::Inner;
use crate::connection::Connection;
use crate::consumer::KEY_PROPERTY;
use crate::topic::{mqtt_qos, mqtt_topic};
use crate::NO_SUBSCRIBERS_SUFFIX;

/// How long `close` waits for the broker to confirm what was sent.
const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(10);

pub(crate) struct MqttProducer {
    topic: Topic,
    mqtt_topic: String,
    qos: QoS,
    conn: Arc<Connection>,
    backend: Arc<Inner>,
    send_timeout: Option<Duration>,
    closed: AtomicBool,
}

impl MqttProducer {
    pub(crate) fn new(
        topic: Topic,
        conn: Arc<Connection>,
        backend: Arc<Inner>,
        send_timeout: Option<Duration>,
    ) -> Self {
        Self {
            mqtt_topic: mqtt_topic(&topic),
            qos: mqtt_qos(topic.qos()),
            topic,
            conn,
            backend,
            send_timeout,
            closed: AtomicBool::new(false),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) || self.backend.is_closed() {
            return Err(Error::closed("producer").with_context("topic", &self.topic));
        }
        Ok(())
    }
}

#[async_trait]
impl Producer for MqttProducer {
    fn topic(&self) -> &Topic {
        &self.topic
    }

    async fn send(&self, mut message: OutboundMessage) -> Result<SendReceipt> {
        self.check_open()?;
        let max = self.backend.max_payload();
        if message.payload().len() > max {
            return Err(Error::payload_too_large(message.payload().len(), max)
                .with_context("topic", &self.topic));
        }
        if self.topic.qos() == Qos::Q2 {
            message.ensure_dedup_id();
        }
        let retain = message.is_retained();
        let (payload, properties, key) = message.into_parts();
        let mut user: Vec<(String, String)> = properties.into_iter().collect();
        if let Some(key) = key {
            user.push((KEY_PROPERTY.to_owned(), key));
        }
        let props = (!user.is_empty()).then(|| PublishProperties {
            user_properties: user,
            ..Default::default()
        });
        let mut publish = Publish::new(self.mqtt_topic.as_str(), self.qos, payload, props);
        publish.retain = retain;
        let size = publish.size();
        let broker_max = self.conn.broker_max_packet();
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
        let rx = self.conn.publish(publish).await?;
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
                Err(_) => Err(Error::new(
                    ErrorKind::Closed,
                    "the connection closed before the broker confirmed the message; it may or may \
                     not have been delivered",
                )
                .with_context("topic", &topic)),
            }
        }))
    }

    async fn flush(&self) -> Result<()> {
        self.check_open()?;
        self.conn.flush().await
    }

    async fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let flushed = if self.backend.is_closed() {
            Ok(())
        } else {
            match tokio::time::timeout(CLOSE_FLUSH_LIMIT, self.conn.flush()).await {
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
        };
        self.closed.store(true, Ordering::Release);
        flushed
    }
}

impl fmt::Debug for MqttProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttProducer")
            .field("topic", &self.topic)
            .field("mqtt_topic", &self.mqtt_topic)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}
