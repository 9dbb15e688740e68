#![doc = include_str!("docs.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod connection;
mod consumer;
mod core;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod producer;
mod session;
#[cfg(feature = "tls")]
mod tls;
mod topic;

pub use backend::MqttBackend;
pub use config::MqttConfig;
pub use consumer::MqttConsumer;
pub use producer::MqttProducer;

/// User property holding how often a message was delivered before (set by `negative_acknowledge`
/// and by `close` when they hand a message back to its subscription).
pub const REDELIVERY_PROPERTY: &str = session::REDELIVERY_PROPERTY;

/// User property carrying the message key ([`tg_backend_api::OutboundMessage::key`]).
pub const KEY_PROPERTY: &str = session::KEY_PROPERTY;

/// Suffix of the [`MessageId`](tg_backend_api::MessageId) a send receipt resolves to when the
/// broker answered the QoS 1/2 publish with "no matching subscribers" (reason code 0x10): it
/// accepted the message but no subscription took it. Otherwise receipts resolve to a number.
pub const NO_SUBSCRIBERS_SUFFIX: &str = "-nosub";

use tg_backend_api::kit::{self, Driver, Setting, Settings};
use tg_backend_api::Error;

/// The MQTT backend's driver: `PUBSUB_BACKEND=mqtt`, configured by `MQTT_URL`, or by `MQTT_HOST`,
/// `MQTT_PORT`, `MQTT_USERNAME` and `MQTT_PASSWORD`.
pub static DRIVER: Driver = Driver {
    name: "mqtt",
    title: config::TITLE,
    schemes: &[MqttConfig::SCHEME, MqttConfig::TLS_SCHEME],
    settings: &[
        Setting::new(
            "MQTT_URL",
            "mqtt-url",
            "MQTT URL: mqtt://[user:password@]host[:port][?option=…], mqtts:// for TLS; wins over host, port and credentials",
        ),
        Setting::new("MQTT_HOST", "mqtt-host", "MQTT broker host").default_value("localhost"),
        Setting::new("MQTT_PORT", "mqtt-port", "MQTT broker port").default_value("1883"),
        Setting::new("MQTT_USERNAME", "mqtt-username", "MQTT user name"),
        Setting::new("MQTT_PASSWORD", "mqtt-password", "MQTT password").secret(),
    ],
    options: kit::config::option_names::<MqttConfig>,
    secret_options: &[],
    configure: |settings| Ok(kit::configured(from_settings(settings)?)),
};

/// `MQTT_URL` if given, else host, port and credentials.
fn from_settings(settings: &Settings<'_>) -> tg_backend_api::Result<MqttConfig> {
    if let Some(url) = settings.given("MQTT_URL") {
        return MqttConfig::from_url(&url).map_err(|e| settings.named("MQTT_URL", e));
    }
    let host = settings.get("MQTT_HOST").unwrap_or_default();
    let port_text = settings.get("MQTT_PORT").unwrap_or_default();
    let port: u16 = port_text.trim().parse().map_err(|_| {
        settings.named(
            "MQTT_PORT",
            Error::config(format!("{port_text:?} is not a port number (1-65535)")),
        )
    })?;
    let config = MqttConfig::new(host, port);
    match (
        settings.given("MQTT_USERNAME"),
        settings.given("MQTT_PASSWORD"),
    ) {
        (Some(user), Some(password)) => Ok(config.credentials(user, password)),
        (Some(user), None) => Ok(config.username(user)),
        (None, Some(_)) => Err(settings.named(
            "MQTT_PASSWORD",
            Error::config("is set without MQTT_USERNAME / --mqtt-username"),
        )),
        (None, None) => Ok(config),
    }
}
