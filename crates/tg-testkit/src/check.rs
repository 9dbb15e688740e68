//! What a test gets and how it fails.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tg_backend_api::{
    Backend, Capabilities, Consumer, ConsumerOptions, Error, Message, Producer, Qos, Result, Topic,
};

/// A failed check, with what was expected.
#[derive(Debug)]
pub struct Failure(String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure(format!("backend error: {e}"))
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure(s)
    }
}

/// The result of a test.
pub type TestResult = std::result::Result<(), Failure>;

/// Fails the test with a formatted message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::check::Failure::from(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;

/// What a test gets: a fresh backend, its capabilities for the test's qos, and a fresh random
/// tenant/namespace for its topics.
pub struct Ctx {
    /// The backend under test.
    pub backend: Arc<dyn Backend>,
    /// Its capabilities for [`Ctx::qos`].
    pub caps: Capabilities,
    /// The quality of service the test runs at.
    pub qos: Qos,
    tenant: String,
    namespace: String,
}

impl Ctx {
    pub(crate) fn new(backend: Arc<dyn Backend>, caps: Capabilities, qos: Qos, test: &str) -> Self {
        let mut rng = rand::thread_rng();
        let tenant = format!("conf-{:08x}", rng.gen::<u32>());
        let short: String = test.chars().take(40).collect();
        let namespace = format!("{}-{:08x}", short.replace('_', "-"), rng.gen::<u32>());
        Self {
            backend,
            caps,
            qos,
            tenant,
            namespace,
        }
    }

    /// A topic of this test at its qos.
    pub fn topic(&self, queue: &str) -> Topic {
        self.topic_at(self.qos, queue)
    }

    /// A topic of this test at another qos.
    pub fn topic_at(&self, qos: Qos, queue: &str) -> Topic {
        Topic::new(qos, &self.tenant, &self.namespace, queue).expect("test topic names are valid")
    }

    /// A producer with default options.
    pub async fn producer(&self, topic: &Topic) -> Result<Box<dyn Producer>> {
        self.backend
            .create_producer(topic, Default::default())
            .await
    }

    /// A shared, latest consumer of `subscription`.
    pub async fn consumer(&self, topic: &Topic, subscription: &str) -> Result<Box<dyn Consumer>> {
        self.backend
            .create_consumer(topic, ConsumerOptions::new(subscription))
            .await
    }
}

/// Receives until `n` messages came or `timeout` passed with none, acknowledging each.
pub(crate) async fn drain(
    consumer: &dyn Consumer,
    n: usize,
    timeout: Duration,
) -> std::result::Result<Vec<Message>, Failure> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match consumer.receive(timeout).await {
            Ok(m) => {
                consumer.acknowledge(&m).await?;
                out.push(m);
            }
            Err(e) if e.kind() == tg_backend_api::ErrorKind::Timeout => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Fails unless `consumer` receives nothing within `wait`.
pub(crate) async fn expect_nothing(
    consumer: &dyn Consumer,
    wait: Duration,
    what: &str,
) -> TestResult {
    match consumer.receive(wait).await {
        Ok(m) => Err(Failure(format!(
            "{what}: expected no message, got {:?} (payload {:?})",
            m.id(),
            String::from_utf8_lossy(m.payload())
        ))),
        Err(e) if e.kind() == tg_backend_api::ErrorKind::Timeout => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The payload as text.
pub(crate) fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.payload()).into_owned()
}
