//! Name mapping: tg topics to MQTT topics, subscriptions to shared-subscription filters, and
//! the client ids of connections.

use rumqttc::v5::mqttbytes::QoS;
use tg_backend_api::{Qos, Topic};

/// First level of the per-subscription redelivery topics (nack and close hand messages back
/// through them). User topics always have exactly three levels, these five, so they never meet.
pub(crate) const REDELIVER_LEVEL: &str = "tg-redeliver";

/// The MQTT topic of a tg topic: `{tenant}/{namespace}/{queue}` (spec 000). The qos is not part
/// of the name: `q0/a/b/c` and `q1/a/b/c` are the same MQTT topic, the qos travels per message.
/// tg-topic already refuses `+`, `#`, `$`, `/` inside segments, whitespace and control
/// characters, so the result is a valid MQTT topic name that no filter can widen.
pub(crate) fn mqtt_topic(topic: &Topic) -> String {
    format!("{}/{}/{}", topic.tenant(), topic.namespace(), topic.queue())
}

/// The MQTT QoS of a tg qos.
pub(crate) fn mqtt_qos(qos: Qos) -> QoS {
    match qos {
        Qos::Q0 => QoS::AtMostOnce,
        Qos::Q1 => QoS::AtLeastOnce,
        Qos::Q2 => QoS::ExactlyOnce,
    }
}

/// The topic messages of `subscription` are handed back through (nack, close):
/// `tg-redeliver/{subscription}/{tenant}/{namespace}/{queue}`.
pub(crate) fn redeliver_topic(topic: &Topic, subscription: &str) -> String {
    format!("{REDELIVER_LEVEL}/{subscription}/{}", mqtt_topic(topic))
}

/// The shared-subscription filter consumers of `subscription` compete on.
pub(crate) fn share_filter(subscription: &str, mqtt_topic: &str) -> String {
    format!("$share/{subscription}/{mqtt_topic}")
}

/// The client id of a consumer: `{prefix}-{subscription}-{name}`; `name` is the consumer name
/// (stable across restarts: the session resumes) or a random one.
pub(crate) fn consumer_client_id(prefix: &str, subscription: &str, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{prefix}-{subscription}-{name}"),
        None => format!("{prefix}-{subscription}-{}", random_suffix()),
    }
}

/// The client id of the producer connection of one backend instance.
pub(crate) fn producer_client_id(prefix: &str) -> String {
    format!("{prefix}-p-{}", random_suffix())
}

fn random_suffix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..12].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_without_qos() {
        let t = Topic::parse("q1/tg/flow/text-completion").unwrap();
        assert_eq!(mqtt_topic(&t), "tg/flow/text-completion");
        assert_eq!(mqtt_topic(&t.with_qos(Qos::Q0)), mqtt_topic(&t));
        assert_eq!(mqtt_qos(Qos::Q2), QoS::ExactlyOnce);
        assert_eq!(
            redeliver_topic(&t, "rag:1"),
            "tg-redeliver/rag:1/tg/flow/text-completion"
        );
        assert_eq!(share_filter("rag", "tg/flow/x"), "$share/rag/tg/flow/x");
    }

    #[test]
    fn wildcards_cannot_reach_a_topic() {
        for bad in [
            "q1/tg/flow/a+b",
            "q1/tg/flow/#",
            "q1/$SYS/flow/x",
            "q1/tg/fl ow/x",
            "q1/tg/flow/a/b",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_ids() {
        assert_eq!(consumer_client_id("tg", "rag", Some("w1")), "tg-rag-w1");
        let a = consumer_client_id("tg", "rag", None);
        let b = consumer_client_id("tg", "rag", None);
        assert!(a.starts_with("tg-rag-") && a != b, "{a} {b}");
        assert!(producer_client_id("tg").starts_with("tg-p-"));
    }
}
