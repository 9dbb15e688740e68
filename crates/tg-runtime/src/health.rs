//! A periodic health message per service.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tg_backend_api::{Backend, OutboundMessage, Result, Topic};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::envelope::rfc3339;
use crate::{ProducerConfig, RetryingProducer};

/// The health message (JSON), sent with the property `service` = [`HealthStatus::service`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// The service name.
    pub service: String,
    /// This process (a UUID per heartbeat).
    pub instance: String,
    /// `ok`, `degraded`, … as set by [`Heartbeat::set_status`]; `stopped` in the last message.
    pub status: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When sent (RFC 3339, UTC).
    pub time: String,
    /// Seconds since the heartbeat started.
    pub uptime_seconds: u64,
}

impl tg_schema::Message for HealthStatus {
    const NAME: &'static str = "health";
}

/// Publishes a [`HealthStatus`] for one service to a topic every `interval` (spec 003 FR-009,
/// FR-017): once at start, then periodically, and a last `stopped` message on
/// [`stop`](Self::stop).
///
/// Where the backend's [`Capabilities::retained`](tg_backend_api::Capabilities) holds for the
/// topic's qos (MQTT), messages are retained, so a monitor that subscribes later gets the last
/// status at once. Elsewhere the topic is last-value by convention: use a q0 topic, and a monitor
/// has the current status within one interval. Send failures are retried briefly and logged;
/// they never stop the heartbeat.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use std::{sync::Arc, time::Duration};
/// use tg_runtime::Heartbeat;
/// let backend: Arc<dyn tg_backend_api::Backend> = Arc::new(tg_backend_memory::MemoryBackend::new());
/// let hb = Heartbeat::start(backend, tg_topic::Topic::parse("q0/tg/health/status")?, "llm-worker", Duration::from_secs(10));
/// hb.set_status("degraded", Some("GPU busy".into()));
/// hb.stop().await;
/// # Ok(()) }
/// ```
pub struct Heartbeat {
    token: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    status: Arc<Mutex<(String, Option<String>)>>,
}

impl Heartbeat {
    /// Starts the heartbeat task in the current runtime.
    pub fn start(
        backend: Arc<dyn Backend>,
        topic: Topic,
        service: impl Into<String>,
        interval: Duration,
    ) -> Self {
        let retain = backend.capabilities(topic.qos()).retained;
        let producer = RetryingProducer::new(
            backend,
            topic,
            ProducerConfig::default()
                .max_attempts(3)
                .max_elapsed(interval.min(Duration::from_secs(5))),
        );
        let status = Arc::new(Mutex::new(("ok".to_owned(), None)));
        let token = CancellationToken::new();
        let task = tokio::spawn(beat(
            producer,
            service.into(),
            interval.max(Duration::from_millis(10)),
            retain,
            status.clone(),
            token.clone(),
        ));
        Self {
            token,
            task: Mutex::new(Some(task)),
            status,
        }
    }

    /// Sets the status reported from the next beat on.
    pub fn set_status(&self, status: impl Into<String>, detail: Option<String>) {
        *self.status.lock() = (status.into(), detail);
    }

    /// Sends a last `stopped` status and stops.
    pub async fn stop(&self) {
        self.token.cancel();
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

impl fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Heartbeat")
            .field("status", &*self.status.lock())
            .finish_non_exhaustive()
    }
}

async fn beat(
    producer: RetryingProducer,
    service: String,
    interval: Duration,
    retain: bool,
    status: Arc<Mutex<(String, Option<String>)>>,
    token: CancellationToken,
) {
    let instance = uuid::Uuid::new_v4().to_string();
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = token.cancelled() => true,
            _ = ticker.tick() => false,
        };
        let (s, detail) = if stopping {
            ("stopped".to_owned(), None)
        } else {
            status.lock().clone()
        };
        let msg = HealthStatus {
            service: service.clone(),
            instance: instance.clone(),
            status: s,
            detail,
            time: rfc3339(SystemTime::now()),
            uptime_seconds: started.elapsed().as_secs(),
        };
        if let Err(e) = send(&producer, &msg, retain).await {
            tracing::warn!(service, error = %e, "health message not sent");
        }
        if stopping {
            let _ = producer.close().await;
            return;
        }
    }
}

async fn send(producer: &RetryingProducer, msg: &HealthStatus, retain: bool) -> Result<()> {
    let payload = serde_json::to_vec(msg).map_err(|e| {
        tg_backend_api::Error::new(tg_backend_api::ErrorKind::Encode, e.to_string())
    })?;
    let out = OutboundMessage::new(payload)
        .property("service", msg.service.clone())
        .retain(retain);
    producer.send(out).await.map(|_| ())
}
