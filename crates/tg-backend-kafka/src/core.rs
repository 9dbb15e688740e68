//! What a backend's producers and consumers share: the configuration, the lifecycle, the admin
//! client (topic creation, the health probe), the producer clients, the topics known to exist,
//! and the subscriptions that have their one consumer (see [`Core::claim`]).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientContext;
use tg_backend_api::kit::Lifecycle;
use tg_backend_api::{Error, ErrorKind, Qos, Result};

use crate::config::KafkaConfig;
use crate::delivery::{self, Client, Kind};
use crate::error::{from_code, from_kafka, kind_of};

/// The admin client's context: remembers the last error librdkafka reported, which names the
/// cause (refused credentials, say) when a request merely times out.
#[derive(Default)]
pub(crate) struct AdminContext {
    last_error: Mutex<Option<KafkaError>>,
}

impl ClientContext for AdminContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "Kafka admin client");
        *self.last_error.lock() = Some(error);
    }
}

/// One backend's shared state.
pub(crate) struct Core {
    pub(crate) config: KafkaConfig,
    pub(crate) life: Lifecycle,
    admin: AdminClient<AdminContext>,
    /// Producer clients by how they acknowledge, created on first use.
    clients: Mutex<HashMap<Kind, Arc<Client>>>,
    /// Kafka topics known to exist.
    topics: Mutex<HashSet<String>>,
    /// (Kafka topic, subscription) pairs that have their one consumer in this backend.
    claims: Arc<Mutex<HashSet<(String, String)>>>,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("brokers", &self.config.brokers)
            .field("security_protocol", &self.config.security_protocol)
            .field("closed", &self.life.is_closed())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// Creates the admin client and checks, within `connect_timeout`, that the brokers answer.
    pub(crate) async fn connect(config: KafkaConfig) -> Result<Arc<Core>> {
        let admin: AdminClient<AdminContext> = config
            .client_config()
            .create_with_context(AdminContext::default())
            .map_err(|e| from_kafka("creating the Kafka client", e))?;
        let core = Arc::new(Core {
            config,
            life: Lifecycle::new("Kafka backend"),
            admin,
            clients: Mutex::default(),
            topics: Mutex::default(),
            claims: Arc::default(),
        });
        core.probe().await?;
        Ok(core)
    }

    /// Asks a broker for the cluster's metadata, within `connect_timeout`.
    pub(crate) async fn probe(self: &Arc<Self>) -> Result<()> {
        let core = self.clone();
        let timeout = self.config.options.connect_timeout;
        let result = tokio::task::spawn_blocking(move || {
            core.admin
                .inner()
                .fetch_metadata(None, timeout)
                .map(drop)
                .map_err(|e| core.connect_error(e))
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Unexpected, format!("metadata probe: {e}")))?;
        result
    }

    /// The error of a failed metadata request: what the brokers said, or why they could not be
    /// reached, naming them.
    fn connect_error(&self, e: KafkaError) -> Error {
        let last = self.admin.inner().context().last_error.lock().take();
        let cause = match last.as_ref().and_then(KafkaError::rdkafka_error_code) {
            Some(code) if kind_of(code) == ErrorKind::Auth => from_code("authenticating", code),
            _ => from_kafka("reading cluster metadata", e),
        };
        let kind = match cause.kind() {
            ErrorKind::Auth => ErrorKind::Auth,
            _ => ErrorKind::Connection,
        };
        Error::new(
            kind,
            format!(
                "cannot reach Kafka at {}: {}",
                self.config.bootstrap_servers(),
                cause.message()
            ),
        )
        .with_context("brokers", self.config.bootstrap_servers())
    }

    /// Makes sure Kafka topic `name` exists, creating it with the configured partitions and the
    /// retention of `qos` when it does not.
    pub(crate) async fn ensure_topic(self: &Arc<Self>, name: &str, qos: Qos) -> Result<()> {
        if self.topics.lock().contains(name) {
            return Ok(());
        }
        let options = &self.config.options;
        let retention = if qos.is_persistent() {
            options.retention
        } else {
            options.q0_retention
        };
        let retention_ms = retention.as_millis().to_string();
        let replication = match options.replication_factor {
            0 => -1,
            n => i32::from(n),
        };
        let new = NewTopic::new(
            name,
            i32::try_from(options.partitions).unwrap_or(i32::MAX),
            TopicReplication::Fixed(replication),
        )
        .set("retention.ms", &retention_ms);
        let admin_options = AdminOptions::new().operation_timeout(Some(options.connect_timeout));
        let created = self
            .admin
            .create_topics([&new], &admin_options)
            .await
            .map_err(|e| from_kafka("creating the Kafka topic", e))?;
        for result in created {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    // a cluster that refuses creating topics may still have this one
                    if !self.topic_exists(name).await? {
                        return Err(from_code("creating the Kafka topic", code)
                            .with_context("kafka_topic", topic));
                    }
                }
            }
        }
        self.topics.lock().insert(name.to_owned());
        Ok(())
    }

    /// Deletes Kafka topic `name` (`DeleteTopics`); one that does not exist is no error. The
    /// broker drops the topic's records and its groups' committed offsets with it.
    pub(crate) async fn delete_topic(self: &Arc<Self>, name: &str) -> Result<()> {
        let admin_options =
            AdminOptions::new().operation_timeout(Some(self.config.options.connect_timeout));
        let deleted = self
            .admin
            .delete_topics(&[name], &admin_options)
            .await
            .map_err(|e| from_kafka("deleting the Kafka topic", e))?;
        self.topics.lock().remove(name);
        // An idempotent producer numbers its batches per partition; the sequence it reached on
        // the deleted topic's partitions cannot go on on the new ones a later producer creates
        // (the broker answers OutOfOrderSequenceNumber), so producers created from now on get
        // clients of their own, with new producer ids. Live producers keep theirs.
        self.clients.lock().clear();
        for result in deleted {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => {
                    return Err(from_code("deleting the Kafka topic", code)
                        .with_context("kafka_topic", topic))
                }
            }
        }
        Ok(())
    }

    /// Whether the cluster's metadata lists topic `name`.
    async fn topic_exists(self: &Arc<Self>, name: &str) -> Result<bool> {
        let core = self.clone();
        let name = name.to_owned();
        let timeout = self.config.options.connect_timeout;
        tokio::task::spawn_blocking(move || {
            let metadata = core
                .admin
                .inner()
                .fetch_metadata(Some(&name), timeout)
                .map_err(|e| from_kafka("reading topic metadata", e))?;
            Ok(metadata
                .topics()
                .iter()
                .any(|t| t.name() == name && t.error().is_none()))
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Unexpected, format!("topic metadata: {e}")))?
    }

    /// The producer client of `kind`, created on first use.
    pub(crate) fn client(&self, kind: Kind) -> Result<Arc<Client>> {
        let mut clients = self.clients.lock();
        if let Some(client) = clients.get(&kind) {
            return Ok(client.clone());
        }
        let client = Arc::new(delivery::client(self.config.client_config(), kind)?);
        clients.insert(kind, client.clone());
        Ok(client)
    }

    /// Takes subscription `subscription` of Kafka topic `topic` for one consumer; `None` if
    /// another consumer of this backend has it.
    pub(crate) fn claim(&self, topic: &str, subscription: &str) -> Option<Claim> {
        let key = (topic.to_owned(), subscription.to_owned());
        self.claims.lock().insert(key.clone()).then(|| Claim {
            claims: self.claims.clone(),
            key,
        })
    }

    /// Releases the producer clients (their threads end once their queues are flushed or timed
    /// out).
    pub(crate) async fn shutdown(&self) {
        let clients: Vec<Arc<Client>> = self.clients.lock().drain().map(|(_, c)| c).collect();
        if clients.is_empty() {
            return;
        }
        // dropping a client joins its polling thread
        let _ = tokio::task::spawn_blocking(move || drop(clients)).await;
    }
}

/// A subscription's one consumer in this backend (see [`Core::claim`]); released on drop.
#[derive(Debug)]
pub(crate) struct Claim {
    claims: Arc<Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.lock().remove(&self.key);
    }
}
