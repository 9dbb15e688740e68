//! An MQTT 5 PUBLISH as the MQTT backend's consumer gets it from the broker: the first input byte
//! sets the fixed header's flags (QoS, DUP, RETAIN) and whether it comes on the subscription's
//! topic or on its redelivery topic; the rest is the packet after the topic and packet id (the
//! property length, the properties, the payload), as rumqttc reads it. Whatever the bytes:
//! - reading and delivering never panics;
//! - the message is what docs/mqtt.md says (checked against a model written here): the user
//!   properties with the last value of a repeated name, `tg-key` as the key, the redelivery
//!   count from `tg-redelivery` on the redelivery topic (1 when that is no count) and from the
//!   DUP flag on the topic; the other MQTT 5 properties (content type, correlation data,
//!   response topic, message expiry, payload format, subscription ids) do not change it;
//! - a retained message on the consumer's connection is acknowledged and dropped (a new consumer
//!   fetches the retained message on a connection of its own);
//! - the message published again as the producer publishes it is delivered as the same message;
//!   handed back (nack/close) it comes back the same, its redelivery count the one given.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use tg_backend_api::{Message, Properties, Qos};
use tg_backend_mqtt::fuzzing::rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use tg_backend_mqtt::fuzzing::rumqttc::v5::mqttbytes::QoS;
use tg_backend_mqtt::fuzzing::{mpsc, publish_properties, redelivery_copy, Session};
use tg_backend_mqtt::{KEY_PROPERTY, REDELIVERY_PROPERTY};

const TOPIC: &str = "t/n/q";
const REDELIVER: &str = "tg-redeliver/s/t/n/q";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let qos = (flags >> 1) & 3;
    let topic = if flags & 0x10 != 0 { REDELIVER } else { TOPIC };
    let mut variable = Vec::with_capacity(rest.len() + 16);
    variable.put_u16(topic.len() as u16);
    variable.put_slice(topic.as_bytes());
    if qos != 0 {
        variable.put_u16(1); // the packet id
    }
    variable.put_slice(rest);
    let mut packet = BytesMut::with_capacity(variable.len() + 5);
    packet.put_u8(0x30 | (flags & 0x0f));
    let mut len = variable.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        if len == 0 {
            packet.put_u8(byte);
            break;
        }
        packet.put_u8(byte | 0x80);
    }
    packet.put_slice(&variable);
    let Ok(Packet::Publish(publish)) = Packet::read(&mut packet, None) else {
        return;
    };
    check(publish);
});

/// Delivers `publish` to a new session of a q1 consumer; the message it gives the application.
fn deliver(publish: Publish) -> Message {
    try_deliver(publish).expect("a message on the consumer's topic is delivered")
}

/// Delivers `publish` to a new session of a q1 consumer: the message it gives the application,
/// if any.
fn try_deliver(publish: Publish) -> Option<Message> {
    let (tx, mut rx) = mpsc::channel(4);
    let session = Session::new(1, Qos::Q1, TOPIC.into(), REDELIVER.into(), 0, tx);
    session.deliver(publish);
    rx.try_recv().ok()
}

/// The same PUBLISH written and read again, as it goes through the broker.
fn on_the_wire(publish: &Publish) -> Publish {
    let mut buf = BytesMut::new();
    publish.write(&mut buf).expect("a publish writes");
    match Packet::read(&mut buf, None) {
        Ok(Packet::Publish(p)) => p,
        other => panic!("{publish:?} read back as {other:?}"),
    }
}

fn parts(m: &Message) -> (&[u8], &Properties, Option<&str>, u32) {
    (
        m.payload().as_ref(),
        m.properties(),
        m.key(),
        m.redelivery_count(),
    )
}

fn check(publish: Publish) {
    // the model, from docs/mqtt.md
    if publish.retain {
        assert!(
            try_deliver(publish).is_none(),
            "a retained message on the consumer's connection is dropped"
        );
        return;
    }
    let user = publish
        .properties
        .as_ref()
        .map(|p| p.user_properties.clone())
        .unwrap_or_default();
    let mut properties = Properties::new();
    for (k, v) in &user {
        properties.insert(k.clone(), v.clone());
    }
    let count = properties.remove(REDELIVERY_PROPERTY);
    let key = properties.remove(KEY_PROPERTY);
    let via_redeliver = publish.topic.as_ref() == REDELIVER.as_bytes();
    let count = if via_redeliver {
        count.map_or(0, |c| c.parse().unwrap_or(1))
    } else {
        u32::from(publish.dup)
    };

    let message = deliver(publish.clone());
    assert_eq!(
        parts(&message),
        (publish.payload.as_ref(), &properties, key.as_deref(), count)
    );

    // only the user properties make the message
    let mut plain = publish.clone();
    plain.properties = (!user.is_empty()).then(|| PublishProperties {
        user_properties: user,
        ..Default::default()
    });
    assert_eq!(parts(&deliver(plain)), parts(&message));

    // published again by the producer (not a resend: no DUP, a redelivery count of 0)
    let mut again = Publish::new(
        TOPIC,
        publish.qos,
        message.payload().clone(),
        publish_properties(
            message.properties().clone(),
            message.key().map(str::to_owned),
        ),
    );
    again.pkid = u16::from(publish.qos != QoS::AtMostOnce);
    // the message as delivered, with the redelivery count `count`
    let counted = |count| {
        let (payload, properties, key, _) = parts(&message);
        (payload, properties, key, count)
    };
    let resent = deliver(on_the_wire(&again));
    assert_eq!(parts(&resent), counted(0));

    // handed back with its count raised: the same message, the count as given
    let raised = count.saturating_add(1);
    let mut copy = redelivery_copy(&publish, REDELIVER, raised);
    copy.pkid = u16::from(copy.qos != QoS::AtMostOnce);
    let back = deliver(on_the_wire(&copy));
    assert_eq!(parts(&back), counted(raised));
}
