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
///
/// Beside Python services of the framework, [`RuntimeMetrics::register_framework`] exports the
/// framework's names and labels instead, so one dashboard reads both (see there).
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
    framework: Option<FrameworkFamilies>,
}

/// The framework's latency buckets (`BUCKETS_STANDARD` of its metrics module), in seconds.
const FRAMEWORK_BUCKETS: [f64; 9] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

fn framework_histogram() -> Histogram {
    Histogram::new(FRAMEWORK_BUCKETS)
}

/// The families the Python framework's services export, for [`RuntimeMetrics::register_framework`].
#[derive(Debug)]
struct FrameworkFamilies {
    processor: String,
    state: Family<Labels, Gauge>,
    request: Family<Labels, Histogram, fn() -> Histogram>,
    processing: Family<Labels, Counter>,
    rate_limit: Family<Labels, Counter>,
    produced: Family<Labels, Counter>,
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

    /// Creates the families under the Python framework's names and labels (its
    /// `trustgraph/base/metrics.py`) and registers them in `registry`, so that Rust services
    /// appear on the dashboards of the framework's services. `processor` is the `processor`
    /// label (the service's id); a consumer's `consumer` label is its subscription and a
    /// producer's `producer` label its topic.
    ///
    /// | framework metric | labels | what counts |
    /// |---|---|---|
    /// | `tg_consumer_state` | processor, consumer, `tg_consumer_state="running"` | 1 while the consumer's connection works, else 0 |
    /// | `tg_consumer_request_duration_seconds` | processor, consumer | handler run time (the framework's buckets, 50 ms … 30 s) |
    /// | `tg_consumer_processing_total` | processor, consumer, status (`ok`, `error`) | handled messages; a panic counts as `error` |
    /// | `tg_consumer_rate_limit_total` | processor, consumer | handler said it is rate limited |
    /// | `tg_producer_messages_total` | processor, producer | messages the broker accepted |
    ///
    /// The runtime's other events (redeliveries, dead letters, duplicates, publisher queues,
    /// reconnects) have no framework name and are not exported in this mode; the framework's
    /// `stopped` state series is not written either (dashboards read `running`).
    ///
    /// ```
    /// use prometheus_client::registry::Registry;
    /// use tg_runtime::metrics::{encode_text, RuntimeMetrics};
    ///
    /// let mut registry = Registry::default();
    /// let metrics = RuntimeMetrics::register_framework(&mut registry, "text-completion");
    /// metrics.consumer("q1/tg/flow/x", "input").ok.inc();
    /// metrics.producer("q1/tg/flow/y").ok.inc();
    /// let text = encode_text(&registry);
    /// assert!(text.contains(r#"tg_consumer_processing_total{processor="text-completion",consumer="input",status="ok"} 1"#));
    /// assert!(text.contains(r#"tg_producer_messages_total{processor="text-completion",producer="q1/tg/flow/y"} 1"#));
    /// assert!(!text.contains("tg_pubsub_"));
    /// ```
    pub fn register_framework(registry: &mut Registry, processor: &str) -> Arc<Self> {
        let families = FrameworkFamilies {
            processor: processor.to_owned(),
            state: Family::default(),
            request: Family::new_with_constructor(framework_histogram),
            processing: Family::default(),
            rate_limit: Family::default(),
            produced: Family::default(),
        };
        registry.register(
            "tg_consumer_state",
            "Consumer state",
            families.state.clone(),
        );
        registry.register(
            "tg_consumer_request_duration_seconds",
            "Request latency (seconds)",
            families.request.clone(),
        );
        registry.register(
            "tg_consumer_processing",
            "Processing count",
            families.processing.clone(),
        );
        registry.register(
            "tg_consumer_rate_limit",
            "Rate limit event count",
            families.rate_limit.clone(),
        );
        registry.register(
            "tg_producer_messages",
            "Output items produced",
            families.produced.clone(),
        );
        let mut m = Self::unregistered();
        m.framework = Some(families);
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
            framework: None,
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
        if let Some(f) = &self.framework {
            let labels = |extra: &[(&'static str, &str)]| -> Labels {
                let mut l: Labels = vec![
                    ("processor", f.processor.clone()),
                    ("consumer", subscription.to_owned()),
                ];
                l.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
                l
            };
            let error = f
                .processing
                .get_or_create(&labels(&[("status", "error")]))
                .clone();
            let mut connection = self.connection("consumer", topic);
            connection.connected = f
                .state
                .get_or_create(&labels(&[("tg_consumer_state", "running")]))
                .clone();
            return ConsumerMetrics {
                received: self.received.get_or_create(&base).clone(),
                ok: f
                    .processing
                    .get_or_create(&labels(&[("status", "ok")]))
                    .clone(),
                panic: error.clone(),
                error,
                rate_limited: f.rate_limit.get_or_create(&labels(&[])).clone(),
                dead_lettered_outcome: outcome("dead_lettered"),
                duplicate: outcome("duplicate"),
                latency: f.request.get_or_create(&labels(&[])).clone(),
                redeliveries: self.redeliveries.get_or_create(&base).clone(),
                dead_lettered: self.dead_lettered.get_or_create(&base).clone(),
                connection,
            };
        }
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
        let ok = match &self.framework {
            Some(f) => f
                .produced
                .get_or_create(&vec![
                    ("processor", f.processor.clone()),
                    ("producer", topic.to_owned()),
                ])
                .clone(),
            None => outcome("ok"),
        };
        ProducerMetrics {
            ok,
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
