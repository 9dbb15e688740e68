//! Prometheus metrics of the runtime (through `prometheus-client`).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    // 100 µs … ~52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// The runtime's metric families, registered in a [`Registry`] you own (and export however you
/// like, e.g. with [`encode_text`]). Names carry the prefix `tg_pubsub_`:
///
/// | metric | type | labels |
/// |---|---|---|
/// | `tg_pubsub_received_total` | counter | topic, subscription |
/// | `tg_pubsub_handled_total` | counter | topic, subscription, outcome (`ok`, `error`, `panic`, `rate_limited`, `dead_lettered`, `duplicate`) |
/// | `tg_pubsub_handler_seconds` | histogram | topic, subscription |
/// | `tg_pubsub_redeliveries_total` | counter | topic, subscription |
/// | `tg_pubsub_dead_lettered_total` | counter | topic, subscription |
/// | `tg_pubsub_published_total` | counter | topic, outcome (`ok`, `retried`, `failed`, `dropped`) |
/// | `tg_pubsub_publisher_queue_depth` | gauge | topic |
/// | `tg_pubsub_connected` | gauge (1/0) | component, topic |
/// | `tg_pubsub_reconnects_total` | counter | component, topic |
///
/// ```
/// use prometheus_client::registry::Registry;
/// use tg_runtime::metrics::{encode_text, RuntimeMetrics};
///
/// let mut registry = Registry::default();
/// let metrics = RuntimeMetrics::register(&mut registry);
/// metrics.consumer("q1/tg/flow/x", "s").received.inc();
/// assert!(encode_text(&registry).contains("tg_pubsub_received_total{topic=\"q1/tg/flow/x\",subscription=\"s\"} 1"));
/// ```
#[derive(Debug)]
pub struct RuntimeMetrics {
    received: Family<Labels, Counter>,
    handled: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    redeliveries: Family<Labels, Counter>,
    dead_lettered: Family<Labels, Counter>,
    published: Family<Labels, Counter>,
    queue_depth: Family<Labels, Gauge>,
    connected: Family<Labels, Gauge>,
    reconnects: Family<Labels, Counter>,
}

impl RuntimeMetrics {
    /// Creates the families and registers them in `registry` under the prefix `tg_pubsub`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self::unregistered();
        let r = registry.sub_registry_with_prefix("tg_pubsub");
        r.register("received", "Messages received", m.received.clone());
        r.register("handled", "Messages handled, by outcome", m.handled.clone());
        r.register(
            "handler_seconds",
            "Handler run time in seconds",
            m.latency.clone(),
        );
        r.register(
            "redeliveries",
            "Messages received again after a failure",
            m.redeliveries.clone(),
        );
        r.register(
            "dead_lettered",
            "Messages sent to a dead-letter topic",
            m.dead_lettered.clone(),
        );
        r.register(
            "published",
            "Messages published, by outcome",
            m.published.clone(),
        );
        r.register(
            "publisher_queue_depth",
            "Messages waiting in a publisher queue",
            m.queue_depth.clone(),
        );
        r.register(
            "connected",
            "1 while the component's backend connection works, else 0",
            m.connected.clone(),
        );
        r.register(
            "reconnects",
            "Times a producer or consumer was recreated",
            m.reconnects.clone(),
        );
        Arc::new(m)
    }

    /// Families registered nowhere: what components use when given no metrics.
    pub fn unregistered() -> Self {
        Self {
            received: Family::default(),
            handled: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            redeliveries: Family::default(),
            dead_lettered: Family::default(),
            published: Family::default(),
            queue_depth: Family::default(),
            connected: Family::default(),
            reconnects: Family::default(),
        }
    }

    /// The handles of one consumer (cheap to use per message).
    pub fn consumer(&self, topic: &str, subscription: &str) -> ConsumerMetrics {
        let base: Labels = vec![
            ("topic", topic.to_owned()),
            ("subscription", subscription.to_owned()),
        ];
        let outcome = |o: &str| {
            let mut l = base.clone();
            l.push(("outcome", o.to_owned()));
            self.handled.get_or_create(&l).clone()
        };
        ConsumerMetrics {
            received: self.received.get_or_create(&base).clone(),
            ok: outcome("ok"),
            error: outcome("error"),
            panic: outcome("panic"),
            rate_limited: outcome("rate_limited"),
            dead_lettered_outcome: outcome("dead_lettered"),
            duplicate: outcome("duplicate"),
            latency: self.latency.get_or_create(&base).clone(),
            redeliveries: self.redeliveries.get_or_create(&base).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&base).clone(),
            connection: self.connection("consumer", topic),
        }
    }

    /// The handles of one producer or publisher.
    pub fn producer(&self, topic: &str) -> ProducerMetrics {
        let base: Labels = vec![("topic", topic.to_owned())];
        let outcome = |o: &str| {
            let mut l = base.clone();
            l.push(("outcome", o.to_owned()));
            self.published.get_or_create(&l).clone()
        };
        ProducerMetrics {
            ok: outcome("ok"),
            retried: outcome("retried"),
            failed: outcome("failed"),
            dropped: outcome("dropped"),
            queue_depth: self.queue_depth.get_or_create(&base).clone(),
            connection: self.connection("producer", topic),
        }
    }

    fn connection(&self, component: &str, topic: &str) -> ConnectionMetrics {
        let l: Labels = vec![
            ("component", component.to_owned()),
            ("topic", topic.to_owned()),
        ];
        ConnectionMetrics {
            connected: self.connected.get_or_create(&l).clone(),
            reconnects: self.reconnects.get_or_create(&l).clone(),
        }
    }
}

/// Encodes a registry in the Prometheus text format (what an HTTP `/metrics` endpoint serves).
pub fn encode_text(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Per-consumer metric handles. Public fields so applications can read them in tests.
#[derive(Debug, Clone)]
pub struct ConsumerMetrics {
    /// Messages received.
    pub received: Counter,
    /// Handled successfully.
    pub ok: Counter,
    /// Handler returned an error.
    pub error: Counter,
    /// Handler panicked.
    pub panic: Counter,
    /// Handler said it is rate limited.
    pub rate_limited: Counter,
    /// Outcome `dead_lettered`.
    pub dead_lettered_outcome: Counter,
    /// Dropped as a duplicate.
    pub duplicate: Counter,
    /// Handler run time.
    pub latency: Histogram,
    /// Received with a redelivery count above zero.
    pub redeliveries: Counter,
    /// Sent to the dead-letter topic.
    pub dead_lettered: Counter,
    /// Connection state.
    pub connection: ConnectionMetrics,
}

/// Per-producer metric handles.
#[derive(Debug, Clone)]
pub struct ProducerMetrics {
    /// Accepted by the broker.
    pub ok: Counter,
    /// Sends retried.
    pub retried: Counter,
    /// Failed after the retries (returned to the caller).
    pub failed: Counter,
    /// Dropped after the retries (only with the explicit drop option).
    pub dropped: Counter,
    /// Publisher queue depth.
    pub queue_depth: Gauge,
    /// Connection state.
    pub connection: ConnectionMetrics,
}

/// Connection state handles.
#[derive(Debug, Clone)]
pub struct ConnectionMetrics {
    /// 1 while connected.
    pub connected: Gauge,
    /// Times the producer/consumer was recreated.
    pub reconnects: Counter,
}
