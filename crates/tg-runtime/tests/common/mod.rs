//! Test helpers: a fault-injecting backend wrapping the memory backend.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tg_backend_api::{
    Backend, Capabilities, Consumer, ConsumerOptions, Error, Message, OutboundMessage, Producer,
    ProducerOptions, Qos, Result, SendReceipt, Topic,
};
use tg_backend_memory::MemoryBackend;

/// Wraps a memory backend; fails operations with `Connection` while told to.
#[derive(Debug, Clone)]
pub struct Flaky {
    pub inner: MemoryBackend,
    pub faults: Arc<Faults>,
}

#[derive(Debug, Default)]
pub struct Faults {
    /// While true, every receive/send/create fails with Connection ("broker down").
    pub down: AtomicBool,
    /// Number of upcoming receive calls that fail with Connection.
    pub fail_receives: AtomicU32,
    /// Number of upcoming sends that fail with Connection.
    pub fail_sends: AtomicU32,
    /// Hide the redelivery count (capabilities and messages).
    pub no_redelivery_count: AtomicBool,
    pub consumers_created: AtomicU32,
    pub producers_created: AtomicU32,
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

impl Flaky {
    pub fn new() -> Self {
        Self {
            inner: MemoryBackend::new(),
            faults: Arc::new(Faults::default()),
        }
    }

    fn down(&self) -> Result<()> {
        if self.faults.down.load(Ordering::Acquire) {
            Err(Error::connection("injected: broker down"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Backend for Flaky {
    fn name(&self) -> &'static str {
        "flaky-memory"
    }

    fn capabilities(&self, qos: Qos) -> Capabilities {
        let mut c = self.inner.capabilities(qos);
        if self.faults.no_redelivery_count.load(Ordering::Acquire) {
            c.redelivery_count = false;
        }
        c
    }

    async fn create_producer(
        &self,
        topic: &Topic,
        options: ProducerOptions,
    ) -> Result<Box<dyn Producer>> {
        self.down()?;
        self.faults.producers_created.fetch_add(1, Ordering::AcqRel);
        let inner = self.inner.create_producer(topic, options).await?;
        Ok(Box::new(FlakyProducer {
            inner,
            faults: self.faults.clone(),
        }))
    }

    async fn create_consumer(
        &self,
        topic: &Topic,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        self.down()?;
        self.faults.consumers_created.fetch_add(1, Ordering::AcqRel);
        let inner = self.inner.create_consumer(topic, options).await?;
        Ok(Box::new(FlakyConsumer {
            inner,
            faults: self.faults.clone(),
        }))
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[derive(Debug)]
struct FlakyProducer {
    inner: Box<dyn Producer>,
    faults: Arc<Faults>,
}

#[async_trait]
impl Producer for FlakyProducer {
    fn topic(&self) -> &Topic {
        self.inner.topic()
    }
    async fn send(&self, message: OutboundMessage) -> Result<SendReceipt> {
        if self.faults.down.load(Ordering::Acquire) || take(&self.faults.fail_sends) {
            return Err(Error::connection("injected: send failed"));
        }
        self.inner.send(message).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[derive(Debug)]
struct FlakyConsumer {
    inner: Box<dyn Consumer>,
    faults: Arc<Faults>,
}

#[async_trait]
impl Consumer for FlakyConsumer {
    fn topic(&self) -> &Topic {
        self.inner.topic()
    }
    fn subscription(&self) -> &str {
        self.inner.subscription()
    }
    async fn receive(&self, timeout: Duration) -> Result<Message> {
        if self.faults.down.load(Ordering::Acquire) || take(&self.faults.fail_receives) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return Err(Error::connection("injected: receive failed"));
        }
        let m = self.inner.receive(timeout).await?;
        if self.faults.no_redelivery_count.load(Ordering::Acquire) {
            Ok(m.with_redelivery_count(0))
        } else {
            Ok(m)
        }
    }
    async fn acknowledge(&self, message: &Message) -> Result<()> {
        self.inner.acknowledge(message).await
    }
    async fn negative_acknowledge(&self, message: &Message) -> Result<()> {
        self.inner.negative_acknowledge(message).await
    }
    async fn unsubscribe(&self) -> Result<()> {
        self.inner.unsubscribe().await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// A unique topic per test.
pub fn fresh_topic(queue: &str) -> Topic {
    let ns = format!("t{}", uuid::Uuid::new_v4().simple());
    Topic::new(Qos::Q1, "tg", &ns[..20], queue).expect("valid topic")
}

/// Drains what a fresh consumer of `sub` gets within `wait`.
pub async fn drain(
    backend: &dyn Backend,
    topic: &Topic,
    sub: &str,
    wait: Duration,
) -> Vec<Message> {
    let c = backend
        .create_consumer(
            topic,
            ConsumerOptions::new(sub).initial_position(tg_backend_api::InitialPosition::Earliest),
        )
        .await
        .expect("consumer");
    let mut out = Vec::new();
    while let Ok(m) = c.receive(wait).await {
        c.acknowledge(&m).await.expect("ack");
        out.push(m);
    }
    c.close().await.expect("close");
    out
}
