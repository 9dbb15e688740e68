//! Message ids: Pulsar's `(ledger, entry, partition, batch index)` as tg's text form.

use pulsar::proto::MessageIdData;
use tg_backend_api::MessageId;

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
