//! Naming: tg topics to Pulsar topics, Pulsar message ids to text.
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

use pulsar::proto::MessageIdData;
use tg_backend_api::{MessageId, Qos, Topic};

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

/// `ledger:entry:partition:batch_index` (-1 for an absent partition or batch index), the text
/// form of a Pulsar message id.
pub(crate) fn message_id(id: &MessageIdData) -> MessageId {
    MessageId::from_text(format!(
        "{}:{}:{}:{}",
        id.ledger_id,
        id.entry_id,
        id.partition.unwrap_or(-1),
        id.batch_index.unwrap_or(-1)
    ))
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

    #[test]
    fn message_ids_print_like_pulsar() {
        let id = MessageIdData {
            ledger_id: 7,
            entry_id: 42,
            batch_index: Some(3),
            ..Default::default()
        };
        assert_eq!(message_id(&id).to_string(), "7:42:-1:3");
    }
}
