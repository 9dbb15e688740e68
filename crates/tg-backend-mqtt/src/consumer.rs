//! The MQTT consumer: one connection, one shared subscription (plus the subscription's
//! redelivery topic), manual acknowledgements.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use tg_backend_api::kit::RawConsumer;
use tg_backend_api::{receive_timeout, ConsumerOptions, Error, Message, Qos, Result, Topic};
use tokio::sync::mpsc;

use crate::connection::{fetch_retained, Connection, ConnectionSpec};
use crate::core::Core;
use crate::error::connection_closed;
use crate::session::{Held, Session, REDELIVERY_PROPERTY};
use crate::topic::{consumer_client_id, mqtt_qos, mqtt_topic, redeliver_topic, share_filter};

/// How long `close` waits for more messages of its session after unsubscribing.
const CLOSE_QUIET: Duration = Duration::from_millis(200);
/// The longest `close` spends handing messages back.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// A q1/q2 consumer's buffer, in multiples of `receive_maximum`. A broker that keeps to Receive
/// Maximum never fills more than one of them. Mosquitto 2.0.11 does not keep to it: it sends a
/// consumer with a backlog everything it holds for it, which with its default
/// `max_queued_messages` (1,000) is up to about 1,100 messages; 20 × the default 100 takes that
/// without refusing (refusing means resuming the session, see `Session::deliver`).
const Q12_BUFFER_FACTOR: usize = 20;
/// A q0 consumer's buffer, in multiples of `receive_maximum`; what does not fit is dropped.
const Q0_BUFFER_FACTOR: usize = 2;

/// The MQTT consumer (as the kit sees it; applications get it as a `Box<dyn Consumer>`).
pub struct MqttConsumer {
    session: Arc<Session>,
    conn: Arc<Connection>,
    core: Arc<Core>,
    topic: Topic,
    subscription: String,
    /// A named consumer's session outlives it (closing only disconnects).
    named: bool,
    rx: tokio::sync::Mutex<mpsc::Receiver<Message>>,
}

impl MqttConsumer {
    /// Connects a consumer of `topic` with id `id` and subscribes it.
    pub(crate) async fn open(
        core: Arc<Core>,
        topic: &Topic,
        options: &ConsumerOptions,
        id: u64,
    ) -> Result<Self> {
        let config = &core.config;
        let mqtt = mqtt_topic(topic);
        let redeliver = redeliver_topic(topic, &options.subscription);
        let persistent = topic.qos() != Qos::Q0;
        // q1/q2: room for what a broker that exceeds Receive Maximum sends; q0 drops what does
        // not fit.
        let factor = if persistent {
            Q12_BUFFER_FACTOR
        } else {
            Q0_BUFFER_FACTOR
        };
        let (tx, rx) = mpsc::channel::<Message>(usize::from(config.receive_maximum) * factor);
        let session = Arc::new(Session::new(
            id,
            topic.qos(),
            mqtt.clone(),
            redeliver.clone(),
            config.dedup_capacity,
            tx,
        ));
        let spec = ConnectionSpec {
            client_id: consumer_client_id(
                &config.client_id_prefix,
                &options.subscription,
                options.consumer_name.as_deref(),
            ),
            session_expiry: persistent
                .then(|| config.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32),
            session: Some(session.clone()),
        };
        let conn = Connection::open(config, spec).await?;
        let qos = mqtt_qos(topic.qos());
        let mut filters = vec![Filter::new(share_filter(&options.subscription, &mqtt), qos)];
        if persistent {
            filters.push(Filter::new(
                share_filter(&options.subscription, &redeliver),
                qos,
            ));
        }
        session.set_filters(filters.clone());
        if let Err(e) = conn.subscribe(filters).await {
            conn.close().await;
            return Err(e
                .with_context("topic", topic)
                .with_context("subscription", &options.subscription));
        }
        // Not fatal: a broker whose ACL allows only the shared subscription still serves the
        // consumer, without the retained message.
        let peek_id = format!("{}-r", conn.client_id());
        match fetch_retained(config, peek_id, &mqtt).await {
            Ok(retained) => retained
                .into_iter()
                .for_each(|p| session.deliver_retained(p)),
            Err(e) => tracing::warn!(topic = %topic, error = %e,
                "could not fetch the topic's retained message for a new consumer"),
        }
        Ok(Self {
            session,
            conn,
            core,
            topic: topic.clone(),
            subscription: options.subscription.clone(),
            named: options.consumer_name.is_some(),
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    /// Hands the PUBACK / PUBREC to the connection; never waits for it (the connection task
    /// may itself be waiting for room in the buffer this consumer's receivers empty).
    fn send_ack(&self, publish: &Publish) -> Result<()> {
        if self.conn.is_closed() {
            return Err(connection_closed().with_context("subscription", &self.subscription));
        }
        self.session.queue_ack(self.conn.client(), publish);
        Ok(())
    }

    /// Republishes a held message to the subscription's redelivery topic, through the backend's
    /// producer connection (open until the backend's shutdown, after every consumer closed);
    /// true if a consumer of the subscription was there to take it.
    async fn hand_back(&self, held: &Held) -> Result<bool> {
        let copy = redelivery_copy(
            &held.publish,
            self.session.redeliver_topic(),
            held.redeliveries + 1,
        );
        let confirmed = self
            .core
            .producer
            .publish(copy)
            .await?
            .await
            .map_err(|_| connection_closed())??;
        Ok(confirmed.matched)
    }

    /// Leaves the shared subscription and, with `hand_back`, hands every held message back to
    /// the subscription.
    async fn leave(&self, hand_back: bool) {
        let filters: Vec<String> = self.session.filters().into_iter().map(|f| f.path).collect();
        self.session.set_filters(Vec::new());
        if tokio::time::timeout(CLOSE_LIMIT, self.conn.unsubscribe(filters))
            .await
            .is_err()
        {
            tracing::warn!(client_id = %self.conn.client_id(), "no UNSUBACK while closing");
        }
        let deadline = tokio::time::Instant::now() + CLOSE_LIMIT;
        let mut stranded = 0usize;
        let mut rx = tokio::time::timeout(Duration::from_secs(1), self.rx.lock())
            .await
            .ok();
        loop {
            if let Some(rx) = rx.as_mut() {
                while rx.try_recv().is_ok() {}
            }
            let held = self.session.take_all();
            if held.is_empty() {
                let more = match rx.as_mut() {
                    Some(rx) => tokio::time::timeout(CLOSE_QUIET, rx.recv()).await,
                    None => {
                        tokio::time::sleep(CLOSE_QUIET).await;
                        Ok(None)
                    }
                };
                match more {
                    Ok(Some(_)) if tokio::time::Instant::now() < deadline => continue,
                    _ => break,
                }
            }
            for h in held {
                let matched = if hand_back && h.publish.qos != QoS::AtMostOnce {
                    match self.hand_back(&h).await {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not hand a held message back");
                            false
                        }
                    }
                } else {
                    true
                };
                if matched || !hand_back {
                    if h.live {
                        let _ = self.send_ack(&h.publish);
                    }
                } else {
                    stranded += 1;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        if stranded > 0 {
            tracing::warn!(
                client_id = %self.conn.client_id(),
                subscription = %self.subscription,
                stranded,
                "no other consumer of the subscription took the unacknowledged messages; \
                 they stay unacknowledged in this client's MQTT session until it expires"
            );
        }
    }

    /// Leaves the subscription as closing or unsubscribing does and disconnects. The kit calls
    /// this once.
    async fn shut(&self, unsubscribe: bool) -> Result<()> {
        if self.conn.is_connected() {
            if unsubscribe {
                self.leave(false).await;
            } else if !self.named && self.topic.qos() != Qos::Q0 {
                self.leave(true).await;
            }
        }
        self.conn.close().await;
        Ok(())
    }
}

impl RawConsumer for MqttConsumer {
    async fn receive(&self, timeout: Duration) -> Result<Message> {
        let got = if timeout.is_zero() {
            match self.rx.try_lock() {
                Ok(mut rx) => rx.try_recv().ok(),
                Err(_) => None,
            }
        } else {
            tokio::time::timeout(timeout, async {
                let mut rx = self.rx.lock().await;
                rx.recv().await
            })
            .await
            .ok()
            .flatten()
        };
        if self.session.resume_due() && !self.conn.resume_session() {
            self.session.resume_failed();
        }
        match got {
            Some(m) => Ok(m),
            None if self.conn.is_closed() => {
                Err(Error::closed("consumer").with_context("subscription", &self.subscription))
            }
            None => Err(receive_timeout(timeout)),
        }
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        if let Some(h) = self.session.take(message.ack_handle().seq()) {
            if h.live {
                self.send_ack(&h.publish)?;
            }
        }
        Ok(())
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        let seq = message.ack_handle().seq();
        let Some(h) = self.session.take(seq) else {
            return Ok(());
        };
        match self.hand_back(&h).await {
            Ok(_) => {
                if h.live {
                    self.send_ack(&h.publish)?;
                }
                Ok(())
            }
            Err(e) => {
                self.session.put_back(seq, h);
                Err(e)
            }
        }
    }

    async fn unsubscribe(&self) -> Result<()> {
        self.shut(true).await
    }

    async fn close(&self) -> Result<()> {
        self.shut(false).await
    }
}

impl fmt::Debug for MqttConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConsumer")
            .field("id", &self.session.consumer_id())
            .field("topic", &self.topic)
            .field("subscription", &self.subscription)
            .field("client_id", &self.conn.client_id())
            .finish()
    }
}

/// A copy of `original` for the redelivery topic, its count raised.
pub fn redelivery_copy(original: &Publish, topic: &str, count: u32) -> Publish {
    let mut user: Vec<(String, String)> = original
        .properties
        .as_ref()
        .map(|p| {
            p.user_properties
                .iter()
                .filter(|(k, _)| k != REDELIVERY_PROPERTY)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    user.push((REDELIVERY_PROPERTY.to_owned(), count.to_string()));
    let properties = PublishProperties {
        user_properties: user,
        ..Default::default()
    };
    Publish::new(
        topic,
        original.qos,
        original.payload.clone(),
        Some(properties),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_copy_raises_the_count() {
        let props = PublishProperties {
            user_properties: vec![
                ("id".into(), "1".into()),
                (REDELIVERY_PROPERTY.into(), "1".into()),
            ],
            ..Default::default()
        };
        let p = Publish::new("a/b/c", QoS::AtLeastOnce, "x", Some(props));
        let copy = redelivery_copy(&p, "tg-redeliver/s/a/b/c", 2);
        let user = copy.properties.unwrap().user_properties;
        assert_eq!(
            user,
            vec![
                ("id".into(), "1".into()),
                (REDELIVERY_PROPERTY.into(), "2".into())
            ]
        );
        assert_eq!(copy.topic.as_ref(), b"tg-redeliver/s/a/b/c");
    }
}
