//! Topic strings, queue ids and subscription names: parsing never panics, and what parses
//! formats back to the same text and parses again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tg_topic::{validate_subscription, QueueId, Topic};

fuzz_target!(|text: &str| {
    if let Ok(topic) = Topic::parse(text) {
        let again = Topic::parse(&topic.to_string()).expect("a formatted topic parses");
        assert_eq!(again, topic);
        if let Ok(id) = QueueId::from_topic(&topic) {
            assert_eq!(
                QueueId::parse(&id.to_string()).expect("a formatted id parses"),
                id
            );
        }
    }
    if let Ok(id) = QueueId::parse(text) {
        assert_eq!(id.to_string(), text, "a queue id formats as it was written");
        assert_eq!(
            QueueId::from_topic(&id.to_topic()).expect("its topic maps back"),
            id
        );
    }
    let _ = validate_subscription(text);
});
