//! Topics as the Python framework names them on RabbitMQ: `{qos}/{tenant}/{namespace}/{queue}` is
//! the framework's `{namespace}:{tenant}:{queue}`, whose fanout exchange is
//! `{tenant}.{namespace}.{queue}` and whose named queues are `{exchange}.{subscription}`.

use tg_backend_api::{Error, ErrorKind, Qos, Result, Topic};

/// The longest exchange or queue name AMQP 0.9.1 carries (a short string).
pub(crate) const MAX_NAME: usize = 255;

/// The kind of queue a subscription of a topic is, with the framework's declare arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueKind {
    /// `{exchange}.{subscription}`, durable (the framework's `flow` class; q1 and q2).
    Durable,
    /// `{exchange}.{subscription}`, not durable, not auto-delete (the framework's `request`).
    Transient,
    /// `{exchange}.{subscription}`, not durable, auto-delete: goes with its last consumer (q0
    /// topics of namespaces the framework does not define).
    AutoDelete,
    /// A server-named, exclusive, auto-delete queue per consumer (the framework's `response` and
    /// `notify`): every consumer receives every message.
    PerConsumer,
}

impl QueueKind {
    /// Whether the queue is declared durable.
    pub(crate) fn durable(self) -> bool {
        self == Self::Durable
    }
}

/// Where a topic lives on RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    /// The fanout exchange, always declared durable (as the framework does).
    pub(crate) exchange: String,
    /// The subscriptions' queues.
    pub(crate) kind: QueueKind,
    /// Whether messages are published persistent (delivery mode 2).
    pub(crate) persistent: bool,
}

impl Mapping {
    /// The topic's exchange and queue kind; an error for a name longer than AMQP allows or one
    /// RabbitMQ reserves, and for a persistent topic on a class the framework declares transient.
    pub(crate) fn of(topic: &Topic) -> Result<Mapping> {
        let exchange = format!("{}.{}.{}", topic.tenant(), topic.namespace(), topic.queue());
        // never true while topics are at most 255 bytes (the exchange is 3 shorter); kept so a
        // longer topic limit cannot reach lapin, which panics on a name over 255 bytes
        if exchange.len() > MAX_NAME {
            return Err(Error::new(
                ErrorKind::InvalidTopic,
                format!(
                    "the RabbitMQ exchange of {topic} would be {} bytes long; AMQP names are at most {MAX_NAME} bytes",
                    exchange.len()
                ),
            )
            .with_context("topic", topic));
        }
        if exchange.starts_with("amq.") {
            return Err(Error::new(
                ErrorKind::InvalidTopic,
                "RabbitMQ reserves names starting with `amq.`: the tenant `amq` cannot be used",
            )
            .with_context("topic", topic));
        }
        let persistent = topic.qos().is_persistent();
        let kind = match (topic.namespace(), topic.qos()) {
            ("flow", _) => QueueKind::Durable,
            ("request", Qos::Q0) => QueueKind::Transient,
            ("response" | "notify", Qos::Q0) => QueueKind::PerConsumer,
            (class @ ("request" | "response" | "notify"), qos) => {
                return Err(Error::unsupported(format!(
                    "the Python framework declares its `{class}` queues transient on RabbitMQ, so a {qos} \
                     (persistent) topic cannot be honoured there; use q0/{}/{class}/{}",
                    topic.tenant(),
                    topic.queue()
                ))
                .with_context("topic", topic))
            }
            (_, Qos::Q0) => QueueKind::AutoDelete,
            (_, _) => QueueKind::Durable,
        };
        Ok(Mapping {
            exchange,
            kind,
            persistent,
        })
    }

    /// The queue of `subscription` (`None`: the broker names it, one per consumer).
    pub(crate) fn queue(&self, topic: &Topic, subscription: &str) -> Result<Option<String>> {
        if self.kind == QueueKind::PerConsumer {
            return Ok(None);
        }
        let queue = format!("{}.{subscription}", self.exchange);
        if queue.len() > MAX_NAME {
            return Err(Error::config(format!(
                "the RabbitMQ queue of subscription {subscription:?} on {topic} would be {} bytes long; \
                 AMQP names are at most {MAX_NAME} bytes (shorten the subscription or the topic)",
                queue.len()
            ))
            .with_context("topic", topic)
            .with_context("subscription", subscription));
        }
        Ok(Some(queue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(t: &str) -> Result<Mapping> {
        Mapping::of(&Topic::parse(t).unwrap())
    }

    #[test]
    fn framework_names() {
        let m = map("q1/tg/flow/text-completion-request:ws1:default").unwrap();
        assert_eq!(m.exchange, "tg.flow.text-completion-request:ws1:default");
        assert_eq!((m.kind, m.persistent), (QueueKind::Durable, true));
        let t = Topic::parse("q1/tg/flow/x").unwrap();
        assert_eq!(
            m.queue(&t, "llm").unwrap().as_deref(),
            Some("tg.flow.text-completion-request:ws1:default.llm")
        );
        let r = map("q0/tg/request/prompt").unwrap();
        assert_eq!(
            (r.exchange.as_str(), r.kind, r.persistent),
            ("tg.request.prompt", QueueKind::Transient, false)
        );
        assert_eq!(
            map("q0/tg/response/prompt").unwrap().kind,
            QueueKind::PerConsumer
        );
        assert_eq!(
            map("q0/tg/notify/config").unwrap().kind,
            QueueKind::PerConsumer
        );
        assert_eq!(
            map("q0/tg/response/p").unwrap().queue(&t, "s").unwrap(),
            None
        );
        assert_eq!(map("q0/tg/flow/x").unwrap().kind, QueueKind::Durable);
        assert!(!map("q0/tg/flow/x").unwrap().persistent);
        assert_eq!(map("q0/a/b/c").unwrap().kind, QueueKind::AutoDelete);
        assert_eq!(map("q2/a/b/c").unwrap().kind, QueueKind::Durable);
    }

    #[test]
    fn refusals_name_the_limit() {
        let err = map("q1/tg/request/x").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.message().contains("q0/tg/request/x"), "{err}");
        let t = Topic::parse(&format!("q1/tg/flow/{}", "q".repeat(190))).unwrap();
        let err = Mapping::of(&t)
            .unwrap()
            .queue(&t, &"s".repeat(100))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        assert!(err.message().contains("at most 255 bytes"), "{err}");
        assert_eq!(
            map("q1/amq/flow/x").unwrap_err().kind(),
            ErrorKind::InvalidTopic
        );
    }
}
