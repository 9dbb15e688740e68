//! How topics map to Redis keys and channels (nothing else: the layout of a message is in
//! `entry.rs` for streams and `frame.rs` for q0).
//!
//! A topic `{qos}/{tenant}/{namespace}/{queue}` has exactly four `/`-separated segments and no
//! segment may contain `/` (nor `{`, `}`), so wrapping it in braces after the prefix is unambiguous
//! (and makes every key of one topic share a Redis Cluster hash slot):
//!
//! | what | name |
//! |---|---|
//! | q0 channel | `{prefix}/{q0/tenant/namespace/queue}` |
//! | q1/q2 stream | `{prefix}/{q1/tenant/namespace/queue}` |
//! | retry stream of a subscription | `{prefix}/{q1/…/queue}/retry/{subscription}` |
//! | lease of an exclusive/failover subscription | `{prefix}/{q1/…/queue}/lease/{subscription}` |
//! | q2 de-duplication id | `{prefix}/{q2/…/queue}/dedup/{id}` |
//!
//! A subscription is a consumer group of that name; each consumer is a group member named
//! `<consumer_name or "c">-<12 random hex digits>` ([`Names`]).

use tg_backend_api::Topic;

/// The Redis names of one topic.
#[derive(Debug, Clone)]
pub(crate) struct TopicKeys {
    /// The stream (q1/q2) or channel (q0).
    pub(crate) main: String,
}

impl TopicKeys {
    pub(crate) fn new(prefix: &str, topic: &Topic) -> Self {
        Self {
            main: format!("{prefix}/{{{topic}}}"),
        }
    }

    /// The retry stream of a subscription: nacked and released messages go there.
    pub(crate) fn retry(&self, subscription: &str) -> String {
        format!("{}/retry/{subscription}", self.main)
    }

    /// The lease key of an exclusive or failover subscription.
    pub(crate) fn lease(&self, subscription: &str) -> String {
        format!("{}/lease/{subscription}", self.main)
    }

    /// The key remembering one q2 de-duplication id.
    pub(crate) fn dedup(&self, id: &str) -> String {
        format!("{}/dedup/{id}", self.main)
    }
}

/// The names one stream consumer works with.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// The topic stream.
    pub(crate) stream: String,
    /// The subscription's retry stream.
    pub(crate) retry: String,
    /// The subscription's lease key.
    pub(crate) lease: String,
    /// The consumer group: the subscription's name.
    pub(crate) group: String,
    /// The group member: `<consumer_name or "c">-<12 random hex digits>`, unique per consumer.
    pub(crate) member: String,
}

impl Names {
    pub(crate) fn new(
        prefix: &str,
        topic: &Topic,
        subscription: &str,
        consumer_name: Option<&str>,
    ) -> Self {
        let keys = TopicKeys::new(prefix, topic);
        let member = format!(
            "{}-{}",
            consumer_name.unwrap_or("c"),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        Self {
            retry: keys.retry(subscription),
            lease: keys.lease(subscription),
            stream: keys.main,
            group: subscription.to_owned(),
            member,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unambiguous() {
        let t: Topic = "q1/tg/flow/text-completion:ws1:default".parse().unwrap();
        let k = TopicKeys::new("tgps", &t);
        assert_eq!(k.main, "tgps/{q1/tg/flow/text-completion:ws1:default}");
        assert_eq!(
            k.retry("graph:rag"),
            "tgps/{q1/tg/flow/text-completion:ws1:default}/retry/graph:rag"
        );
        assert_eq!(
            k.lease("s"),
            "tgps/{q1/tg/flow/text-completion:ws1:default}/lease/s"
        );
        assert_eq!(
            k.dedup("x/y"),
            "tgps/{q1/tg/flow/text-completion:ws1:default}/dedup/x/y"
        );
        // a queue with ':' cannot collide with another tenant/namespace split
        let a = TopicKeys::new("p", &"q1/a/b/c:d".parse().unwrap());
        let b = TopicKeys::new("p", &"q1/a/b/c".parse().unwrap());
        assert_ne!(a.main, b.main);
        let q0 = TopicKeys::new("tgps", &t.with_qos(tg_backend_api::Qos::Q0));
        assert_eq!(q0.main, "tgps/{q0/tg/flow/text-completion:ws1:default}");
    }

    #[test]
    fn consumer_names() {
        let t: Topic = "q1/tg/flow/jobs".parse().unwrap();
        let n = Names::new("tgps", &t, "workers", Some("w1"));
        assert_eq!(
            (
                n.stream.as_str(),
                n.retry.as_str(),
                n.lease.as_str(),
                n.group.as_str()
            ),
            (
                "tgps/{q1/tg/flow/jobs}",
                "tgps/{q1/tg/flow/jobs}/retry/workers",
                "tgps/{q1/tg/flow/jobs}/lease/workers",
                "workers"
            )
        );
        assert!(
            n.member.starts_with("w1-") && n.member.len() == 15,
            "{}",
            n.member
        );
        let other = Names::new("tgps", &t, "workers", None);
        assert!(other.member.starts_with("c-") && other.member != n.member);
    }
}
