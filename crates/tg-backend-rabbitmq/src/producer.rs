//! The RabbitMQ producer: publishes to the topic's fanout exchange on a channel of its own, with
//! publisher confirms on q1/q2 (a receipt resolves on the broker's confirm; sends are pipelined).
//!
//! `send_batch` checks every message first (routing key, property names; the kit checked the
//! payloads), then hands all its publishes to the connection before awaiting any, so they leave
//! together instead of one write each; the broker confirms them together too (`basic.ack` with
//! `multiple`), and each receipt resolves on its message's confirm.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, PublisherConfirm};
use parking_lot::Mutex;
use tg_backend_api::kit::RawProducer;
use tg_backend_api::{
    Error, ErrorKind, MessageId, OutboundMessage, Properties, Result, SendReceipt, Topic,
};
use tokio::time::Instant;

use crate::connection::bounded;
use crate::core::Core;
use crate::declare;
use crate::error::{convert, is_transport};
use crate::topic::{Mapping, MAX_NAME};

/// What every framework producer sets as content type.
const CONTENT_TYPE: &str = "application/json";

/// The RabbitMQ producer (as the kit sees it; applications get it as a `Box<dyn Producer>`).
pub struct RabbitProducer {
    core: Arc<Core>,
    topic: Topic,
    exchange: ShortString,
    /// Publisher confirms (q1, q2).
    confirms: bool,
    /// Delivery mode 2 (q1, q2).
    persistent: bool,
    send_timeout: Duration,
    /// Random per producer: message ids are `{prefix}-{seq}`.
    prefix: String,
    seq: AtomicU64,
    /// The channel in use; replaced when it closes.
    current: Mutex<Option<Channel>>,
    /// One task at a time opens the next channel.
    opening: tokio::sync::Mutex<()>,
}

impl RabbitProducer {
    pub(crate) async fn open(
        core: Arc<Core>,
        topic: &Topic,
        send_timeout: Option<Duration>,
    ) -> Result<Self> {
        let mapping = Mapping::of(topic)?;
        let send_timeout = send_timeout.unwrap_or(core.config.options.send_timeout);
        let producer = Self {
            topic: topic.clone(),
            exchange: mapping.exchange.into(),
            confirms: topic.qos().is_persistent(),
            persistent: mapping.persistent,
            send_timeout,
            prefix: format!("{:016x}", rand::random::<u64>()),
            seq: AtomicU64::new(0),
            current: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            core,
        };
        // the exchange exists when this returns, and a broker that is down fails here
        producer.channel().await?;
        Ok(producer)
    }

    /// The channel to publish on, opening one (confirm mode, exchange declared) if there is
    /// none or it closed; waits through a reconnection up to the send timeout.
    async fn channel(&self) -> Result<Channel> {
        if let Some(channel) = self.live() {
            return Ok(channel);
        }
        let _one = self.opening.lock().await;
        if let Some(channel) = self.live() {
            return Ok(channel);
        }
        let deadline = Instant::now() + self.send_timeout;
        loop {
            let (channel, _) = self.core.producers.channel(deadline).await?;
            match self.prepare(&channel).await {
                Ok(()) => {
                    *self.current.lock() = Some(channel.clone());
                    return Ok(channel);
                }
                Err(e) if e.kind() == ErrorKind::Connection && Instant::now() < deadline => {
                    tracing::debug!(topic = %self.topic, error = %e, "producer channel lost while opening; retrying");
                }
                Err(e) => return Err(e.with_context("topic", &self.topic)),
            }
        }
    }

    fn live(&self) -> Option<Channel> {
        self.current
            .lock()
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    async fn prepare(&self, channel: &Channel) -> Result<()> {
        let limit = self.core.producers.op_timeout();
        if self.confirms {
            let select = channel.confirm_select(ConfirmSelectOptions::default());
            bounded(limit, "enabling publisher confirms", select).await?;
        }
        declare::exchange(channel, self.exchange.as_str(), limit).await
    }

    fn properties(&self, id: &str, headers: &Option<FieldTable>) -> BasicProperties {
        let props = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(if self.persistent { 2 } else { 1 })
            .with_message_id(id.into());
        match headers {
            Some(h) => props.with_headers(h.clone()),
            None => props,
        }
    }
}

/// A message ready to publish: everything that could refuse it was checked.
struct Outgoing {
    payload: Bytes,
    routing_key: ShortString,
    headers: Option<FieldTable>,
    id: String,
}

impl RabbitProducer {
    /// Checks the key and the properties and gives the message its id.
    fn outgoing(&self, message: OutboundMessage) -> Result<Outgoing> {
        let (payload, properties, key) = message.into_parts();
        let routing_key = match key {
            Some(key) => ShortString::try_new(key).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "a message key travels as the AMQP routing key, at most {MAX_NAME} bytes"
                    ),
                )
                .with_context("topic", &self.topic)
            })?,
            None => ShortString::from(""),
        };
        let headers = headers(properties).map_err(|e| e.with_context("topic", &self.topic))?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        Ok(Outgoing {
            payload,
            routing_key,
            headers,
            id: format!("{}-{seq}", self.prefix),
        })
    }

    /// Publishes on `channel` (the frames are queued on the first poll).
    async fn publish(&self, channel: &Channel, out: &Outgoing) -> lapin::Result<PublisherConfirm> {
        channel
            .basic_publish(
                self.exchange.clone(),
                out.routing_key.clone(),
                BasicPublishOptions::default(),
                &out.payload,
                self.properties(&out.id, &out.headers),
            )
            .await
    }

    /// The receipt of a published message: ready without confirms, else its confirm.
    fn receipt(&self, id: String, confirm: PublisherConfirm) -> SendReceipt {
        let id = MessageId::from_text(id);
        if !self.confirms {
            return SendReceipt::ready(id);
        }
        let topic = self.topic.clone();
        SendReceipt::from_future(async move {
            match confirm.await {
                Ok(c) if c.is_nack() => Err(Error::new(
                    ErrorKind::Unexpected,
                    "RabbitMQ refused the message (publisher nack)",
                )
                .set_temporary(true)
                .with_context("topic", topic)),
                Ok(_) => Ok(id),
                Err(e) => {
                    Err(convert(e, "waiting for the broker's confirm").with_context("topic", topic))
                }
            }
        })
    }

    /// A failed publish: whether to publish again on a new channel (the frame did not leave and
    /// there is time), or the error to return. Either way the channel is dropped.
    fn failed(&self, e: lapin::Error, deadline: Instant) -> Option<Error> {
        self.current.lock().take();
        if is_transport(&e) && Instant::now() < deadline {
            tracing::debug!(topic = %self.topic, error = %e, "producer channel closed; publishing on a new one");
            return None;
        }
        Some(
            convert(e, &format!("publishing to exchange {}", self.exchange))
                .with_context("topic", &self.topic),
        )
    }
}

/// Message properties as AMQP headers (long strings, as the framework's aio-pika writes them).
fn headers(properties: Properties) -> Result<Option<FieldTable>> {
    if properties.is_empty() {
        return Ok(None);
    }
    let mut table = FieldTable::default();
    for (key, value) in properties {
        let key = ShortString::try_new(key).map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("a property name is longer than AMQP's {MAX_NAME} bytes"),
            )
        })?;
        table.insert(key, AMQPValue::LongString(value.into()));
    }
    Ok(Some(table))
}

impl RawProducer for RabbitProducer {
    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        let out = self.outgoing(message)?;
        let deadline = Instant::now() + self.send_timeout;
        loop {
            let channel = self.channel().await?;
            match self.publish(&channel, &out).await {
                Ok(confirm) => return Ok(self.receipt(out.id, confirm)),
                Err(e) => {
                    if let Some(e) = self.failed(e, deadline) {
                        return Err(e);
                    }
                }
            }
        }
    }

    async fn send_batch(&self, messages: Vec<OutboundMessage>) -> Result<Vec<SendReceipt>> {
        let outs = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                self.outgoing(m)
                    .map_err(|e| e.with_context("batch_index", i))
            })
            .collect::<Result<Vec<_>>>()?;
        let deadline = Instant::now() + self.send_timeout;
        let mut receipts = Vec::with_capacity(outs.len());
        let mut outs = outs.into_iter().peekable();
        while outs.peek().is_some() {
            let channel = self.channel().await?;
            let rest: Vec<Outgoing> = outs.by_ref().collect();
            // Every publish queues its frames on its first poll, in this order; only then is
            // any awaited, so the connection writes them together.
            let mut publishes = Vec::with_capacity(rest.len());
            for out in &rest {
                let mut publish = Box::pin(self.publish(&channel, out));
                let early = futures::poll!(publish.as_mut());
                publishes.push((publish, early));
            }
            let mut failed = None;
            for (i, (publish, early)) in publishes.into_iter().enumerate() {
                let published = match early {
                    Poll::Ready(published) => published,
                    Poll::Pending => publish.await,
                };
                match published {
                    Ok(confirm) => receipts.push(self.receipt(rest[i].id.clone(), confirm)),
                    Err(e) => {
                        failed = Some((i, e));
                        break;
                    }
                }
            }
            let Some((i, e)) = failed else { break };
            if let Some(e) = self.failed(e, deadline) {
                return Err(e);
            }
            // publish the rest again, from the first that failed, on a new channel
            outs = rest
                .into_iter()
                .skip(i)
                .collect::<Vec<_>>()
                .into_iter()
                .peekable();
        }
        Ok(receipts)
    }

    async fn flush(&self) -> Result<()> {
        let channel = self.current.lock().clone();
        match channel {
            Some(channel) if self.confirms => bounded(
                self.send_timeout,
                "waiting for confirms",
                channel.wait_for_confirms(),
            )
            .await
            .map(drop)
            .map_err(|e| e.with_context("topic", &self.topic)),
            _ => Ok(()),
        }
    }

    async fn close(&self) -> Result<()> {
        // a confirm that cannot come any more has already failed its receipt
        let _ = self.flush().await;
        let channel = self.current.lock().take();
        if let Some(channel) = channel {
            if channel.status().connected() {
                let limit = self.core.producers.op_timeout();
                let _ = bounded(
                    limit,
                    "closing a channel",
                    channel.close(200, "producer closed".into()),
                )
                .await;
            }
        }
        Ok(())
    }

    fn close_sync(&self) -> bool {
        // dropping the last handle of a channel closes it
        self.current.lock().take();
        true
    }
}

impl fmt::Debug for RabbitProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitProducer")
            .field("topic", &self.topic)
            .field("exchange", &self.exchange)
            .field("confirms", &self.confirms)
            .finish_non_exhaustive()
    }
}
