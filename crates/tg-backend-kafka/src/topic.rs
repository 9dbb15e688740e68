//! Topics and consumer groups as the Python framework names them on Kafka: `{qos}/{tenant}/{namespace}/{queue}`
//! is the framework's `{namespace}:{tenant}:{queue}`, whose Kafka topic is
//! `{tenant}.{namespace}.{queue}` with every `:` written as `.`; a subscription is the consumer
//! group of the same name, except on the framework's `response` and `notify` classes, where each
//! consumer has a group of its own.

use tg_backend_api::{Error, ErrorKind, Qos, Result, Topic};

/// The longest topic name Kafka accepts.
pub(crate) const MAX_NAME: usize = 249;

/// The Kafka topic of `topic`; an error for a name longer than Kafka allows.
pub(crate) fn kafka_topic(topic: &Topic) -> Result<String> {
    let name =
        format!("{}.{}.{}", topic.tenant(), topic.namespace(), topic.queue()).replace(':', ".");
    if name.len() > MAX_NAME {
        return Err(Error::new(
            ErrorKind::InvalidTopic,
            format!(
                "the Kafka topic of {topic} would be {} bytes long; Kafka topic names are at most {MAX_NAME} bytes",
                name.len()
            ),
        )
        .with_context("topic", topic));
    }
    Ok(name)
}

/// Whether consumers of `topic` each get a consumer group of their own, so that every consumer
/// receives every message: the framework's `response` and `notify` classes (q0), whose consumers
/// pick the replies meant for them by correlation id.
pub(crate) fn private_groups(topic: &Topic) -> bool {
    topic.qos() == Qos::Q0 && matches!(topic.namespace(), "response" | "notify")
}

/// The consumer group of `subscription` on `topic`: the subscription itself, or for a private
/// group the subscription followed by a random suffix (as the framework names them).
pub(crate) fn group_id(topic: &Topic, subscription: &str) -> String {
    if private_groups(topic) {
        format!("{subscription}-{}", uuid::Uuid::new_v4())
    } else {
        subscription.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    #[test]
    fn framework_names() {
        assert_eq!(
            kafka_topic(&t("q1/tg/flow/text-completion-request:ws1:default")).unwrap(),
            "tg.flow.text-completion-request.ws1.default"
        );
        assert_eq!(
            kafka_topic(&t("q0/tg/request/prompt")).unwrap(),
            "tg.request.prompt"
        );
        assert_eq!(kafka_topic(&t("q2/a/b/c")).unwrap(), "a.b.c");
    }

    #[test]
    fn groups() {
        assert_eq!(group_id(&t("q1/tg/flow/x"), "llm"), "llm");
        assert_eq!(group_id(&t("q0/tg/request/x"), "llm"), "llm");
        let private = group_id(&t("q0/tg/response/x"), "client");
        assert!(
            private.starts_with("client-") && private.len() == "client-".len() + 36,
            "{private}"
        );
        assert_ne!(private, group_id(&t("q0/tg/response/x"), "client"));
        assert!(private_groups(&t("q0/tg/notify/config")));
        assert!(
            !private_groups(&t("q1/tg/response/x")),
            "a durable reply topic keeps named groups"
        );
    }

    #[test]
    fn long_names_are_refused() {
        // the longest topic tg accepts is 255 bytes, `qN/` included: 252 bytes here
        let long = t(&format!(
            "q1/{}/{}/{}",
            "t".repeat(64),
            "n".repeat(64),
            "q".repeat(122)
        ));
        let err = kafka_topic(&long).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidTopic);
        assert!(err.message().contains("at most 249 bytes"), "{err}");
    }
}
