//! Naming: tg topics to Pulsar topics.
//!
//! | tg | Pulsar |
//! |---|---|
//! | `q0/{tenant}/{namespace}/{queue}` | `non-persistent://{tenant}/{namespace}/{queue}` |
//! | `q1/…`, `q2/…` | `persistent://{tenant}/{namespace}/{queue}` |
//! | subscription `S` | subscription `S` |
//!
//! q1 and q2 of the same name are the same Pulsar topic (q2 only adds the `tg-dedup-id`
//! property and the consumer-side de-duplication). `q1/tg/flow/NAME` is the topic the Python
//! framework calls `flow:tg:NAME`.

use tg_backend_api::{Qos, Topic};

/// The Pulsar topic of a tg topic.
pub(crate) fn pulsar_topic(topic: &Topic) -> String {
    let scheme = match topic.qos() {
        Qos::Q0 => "non-persistent",
        Qos::Q1 | Qos::Q2 => "persistent",
    };
    format!(
        "{scheme}://{}/{}/{}",
        topic.tenant(),
        topic.namespace(),
        topic.queue()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_to_pulsar_names() {
        let t = Topic::parse("q1/tg/flow/text-completion-request:ws1:default").unwrap();
        assert_eq!(
            pulsar_topic(&t),
            "persistent://tg/flow/text-completion-request:ws1:default"
        );
        assert_eq!(
            pulsar_topic(&t.with_qos(Qos::Q2)),
            "persistent://tg/flow/text-completion-request:ws1:default"
        );
        assert_eq!(
            pulsar_topic(&Topic::parse("q0/tg/request/prompt").unwrap()),
            "non-persistent://tg/request/prompt"
        );
    }
}
