//! The Kafka consumer: hands out what its group member fetched and passes acknowledgements back
//! to it (see `member.rs`).

use std::fmt;
use std::time::Duration;

use parking_lot::Mutex;

use tg_backend_api::kit::RawConsumer;
use tg_backend_api::{receive_timeout, AckHandle, Error, ErrorKind, Message, Result, Topic};
use tokio::time::Instant;

use crate::core::Claim;
use crate::member::{Fetched, Member, Place};
use crate::offsets::message_id;

/// The Kafka consumer (as the kit sees it; applications get it as a `Box<dyn Consumer>`).
pub struct KafkaConsumer {
    id: u64,
    member: Member,
    topic: Topic,
    group: String,
    /// The subscription's one consumer in this backend, where a topic has one partition;
    /// released when the consumer closes.
    claim: Mutex<Option<Claim>>,
}

impl KafkaConsumer {
    pub(crate) fn new(
        id: u64,
        member: Member,
        topic: Topic,
        group: String,
        claim: Option<Claim>,
    ) -> Self {
        Self {
            id,
            member,
            topic,
            group,
            claim: Mutex::new(claim),
        }
    }

    fn message(&self, f: Fetched) -> Message {
        let Place {
            partition, offset, ..
        } = f.place;
        let ack = AckHandle::new(self.id, offset as u64).with_extra(f.place);
        let mut m = Message::new(f.payload, f.properties, message_id(partition, offset), ack)
            .with_redelivery_count(f.redeliveries)
            .with_key(f.key);
        if let Some(time) = f.time {
            m = m.with_publish_time(time);
        }
        m
    }

    fn place(message: &Message) -> Result<Place> {
        message
            .ack_handle()
            .extra::<Place>()
            .copied()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    "the message was not received from Kafka",
                )
            })
    }
}

impl RawConsumer for KafkaConsumer {
    async fn receive(&self, timeout: Duration) -> Result<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.member.changed().notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(f) = self.member.take()? {
                return Ok(self.message(f));
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                if let Some(f) = self.member.take()? {
                    return Ok(self.message(f));
                }
                let mut e = receive_timeout(timeout);
                if let Some(last) = self.member.last_error() {
                    e = e.with_context("last_error", last);
                }
                return Err(e);
            }
        }
    }

    async fn receive_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        let mut batch = Vec::new();
        match self.receive(timeout).await {
            Ok(first) => batch.push(first),
            Err(e) if e.kind() == ErrorKind::Timeout => return Ok(batch),
            Err(e) => return Err(e),
        }
        while batch.len() < max {
            match self.member.take()? {
                Some(f) => batch.push(self.message(f)),
                None => break,
            }
        }
        Ok(batch)
    }

    async fn acknowledge(&self, message: &Message) -> Result<()> {
        self.member.acknowledge([Self::place(message)?]);
        Ok(())
    }

    async fn acknowledge_batch(&self, messages: &[Message]) -> Result<()> {
        let places = messages
            .iter()
            .map(Self::place)
            .collect::<Result<Vec<_>>>()?;
        self.member.acknowledge(places);
        Ok(())
    }

    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        let place = Self::place(message)?;
        self.member.redeliver(Fetched {
            place,
            payload: message.payload().clone(),
            properties: message.properties().clone(),
            key: message.key().map(str::to_owned),
            time: message.publish_time(),
            redeliveries: message.redelivery_count(),
        });
        Ok(())
    }

    async fn unsubscribe(&self) -> Result<()> {
        self.member.close(true).await;
        self.claim.lock().take();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.member.close(false).await;
        self.claim.lock().take();
        Ok(())
    }

    fn close_sync(&self) -> bool {
        // the member's thread commits and leaves the group by itself
        self.member.close_soon();
        self.claim.lock().take();
        true
    }
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("member", &self.member)
            .finish()
    }
}
