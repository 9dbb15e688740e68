//! Options for producers and consumers.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::{Error, Result};

/// Where a new subscription starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum InitialPosition {
    /// Every message the topic still retains.
    Earliest,
    /// Only messages published after the subscription was created (the default).
    #[default]
    Latest,
}

/// How the consumers of one subscription share its messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ConsumerType {
    /// Consumers compete; each message goes to one of them (the default).
    #[default]
    Shared,
    /// One consumer at a time; a second is refused with [`ErrorKind::ConsumerBusy`](crate::ErrorKind).
    Exclusive,
    /// One active consumer; the others stand by and one takes over when it goes away.
    Failover,
}

macro_rules! str_enum {
    ($ty:ident, $what:literal, $($variant:ident = $name:literal),+) => {
        impl $ty {
            /// The lowercase name used in flags and environment variables.
            pub const fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s.to_ascii_lowercase().as_str() {
                    $($name => Ok(Self::$variant),)+
                    _ => Err(Error::config(format!(
                        concat!("unknown ", $what, " {:?}; expected one of: {}"),
                        s,
                        [$($name),+].join(", ")
                    ))),
                }
            }
        }
    };
}

str_enum!(
    InitialPosition,
    "initial position",
    Earliest = "earliest",
    Latest = "latest"
);
str_enum!(
    ConsumerType,
    "consumer type",
    Shared = "shared",
    Exclusive = "exclusive",
    Failover = "failover"
);

/// Options for [`Backend::create_producer`](crate::Backend::create_producer).
///
/// ```
/// use tg_backend_api::ProducerOptions;
/// let opts = ProducerOptions::new().name("loader-1").batching(false);
/// assert_eq!(opts.batching, Some(false));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerOptions {
    /// A name for logs and broker-side statistics. Default: none.
    pub name: Option<String>,
    /// Whether the producer may batch messages (the receipt of `send` then resolves when the batch
    /// is written). `None` (the default) leaves the choice to the backend, which documents it.
    pub batching: Option<bool>,
    /// How long a send may wait for the broker before failing with `Timeout`. Default: backend's.
    pub send_timeout: Option<Duration>,
}

impl ProducerOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the name.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Turns batching on or off.
    #[must_use]
    pub fn batching(mut self, on: bool) -> Self {
        self.batching = Some(on);
        self
    }

    /// Sets the send timeout.
    #[must_use]
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = Some(timeout);
        self
    }
}

/// Options for [`Backend::create_consumer`](crate::Backend::create_consumer).
///
/// ```
/// use tg_backend_api::{ConsumerOptions, ConsumerType, InitialPosition};
/// let opts = ConsumerOptions::new("graph-rag")
///     .initial_position(InitialPosition::Earliest)
///     .consumer_type(ConsumerType::Failover);
/// assert!(opts.validate().is_ok());
/// assert!(ConsumerOptions::new("bad name").validate().is_err());
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerOptions {
    /// The subscription (consumer group) name. Characters `[A-Za-z0-9_.:-]`.
    pub subscription: String,
    /// Where a new subscription starts. Default: [`InitialPosition::Latest`].
    pub initial_position: InitialPosition,
    /// How consumers share the subscription. Default: [`ConsumerType::Shared`].
    pub consumer_type: ConsumerType,
    /// A name for this consumer instance (logs; MQTT derives its client id from it). Default: random.
    pub consumer_name: Option<String>,
}

impl ConsumerOptions {
    /// Options for subscription `subscription`, latest, shared.
    pub fn new(subscription: impl Into<String>) -> Self {
        Self {
            subscription: subscription.into(),
            initial_position: InitialPosition::default(),
            consumer_type: ConsumerType::default(),
            consumer_name: None,
        }
    }

    /// Options with the consumer semantics of a framework queue class: on `flow` and `request`
    /// queues every consumer created with the same `subscription` competes for the messages;
    /// on `response` and `notify` queues each consumer gets a private subscription
    /// (`{subscription}-{random}`), so each receives every message, as the framework's own
    /// consumers of those queues do.
    ///
    /// ```
    /// use tg_backend_api::ConsumerOptions;
    /// use tg_topic::QueueClass;
    ///
    /// assert_eq!(ConsumerOptions::for_queue_class(QueueClass::Request, "llm").subscription, "llm");
    /// let a = ConsumerOptions::for_queue_class(QueueClass::Notify, "config");
    /// let b = ConsumerOptions::for_queue_class(QueueClass::Notify, "config");
    /// assert!(a.subscription.starts_with("config-") && a.subscription != b.subscription);
    /// assert!(a.validate().is_ok());
    /// ```
    pub fn for_queue_class(class: tg_topic::QueueClass, subscription: impl Into<String>) -> Self {
        let subscription = subscription.into();
        if class.is_competing() {
            Self::new(subscription)
        } else {
            Self::new(format!("{subscription}-{}", uuid::Uuid::new_v4().simple()))
        }
    }

    /// Sets the initial position.
    #[must_use]
    pub fn initial_position(mut self, position: InitialPosition) -> Self {
        self.initial_position = position;
        self
    }

    /// Sets the consumer type.
    #[must_use]
    pub fn consumer_type(mut self, consumer_type: ConsumerType) -> Self {
        self.consumer_type = consumer_type;
        self
    }

    /// Sets the consumer name.
    #[must_use]
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer_name = Some(name.into());
        self
    }

    /// Checks the subscription name; every backend calls this before creating a consumer.
    pub fn validate(&self) -> Result<()> {
        tg_topic::validate_subscription(&self.subscription).map_err(|e| {
            Error::config(format!("invalid subscription name: {e}"))
                .with_context("subscription", &self.subscription)
        })?;
        if let Some(name) = &self.consumer_name {
            tg_topic::validate_subscription(name).map_err(|e| {
                Error::config(format!("invalid consumer name: {e}")).with_context("consumer", name)
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_parse_and_print() {
        assert_eq!(
            "EARLIEST".parse::<InitialPosition>().unwrap(),
            InitialPosition::Earliest
        );
        assert_eq!(ConsumerType::Failover.to_string(), "failover");
        let err = "round-robin".parse::<ConsumerType>().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::ConfigInvalid);
        assert!(
            err.message().contains("shared, exclusive, failover"),
            "{err}"
        );
    }

    #[test]
    fn subscription_names_are_checked() {
        assert!(ConsumerOptions::new("text-completion:ws1")
            .validate()
            .is_ok());
        for bad in ["", "a/b", "a+b", "a#", "with space"] {
            let err = ConsumerOptions::new(bad).validate().unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::ConfigInvalid, "{bad:?}");
        }
        assert!(ConsumerOptions::new("ok")
            .consumer_name("x y")
            .validate()
            .is_err());
    }
}
