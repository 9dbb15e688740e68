//! What the fuzz targets of the repository's `fuzz/` crate reach: how an incoming MQTT 5
//! PUBLISH becomes a message (its user properties, the key and redelivery count among them), and
//! how a message becomes the properties of a PUBLISH again (sending, and handing one back). It
//! exists for the fuzz targets only: it is not API, hidden from the docs, and may change in any
//! release.

pub use rumqttc;
pub use tokio::sync::mpsc;

pub use crate::consumer::redelivery_copy;
pub use crate::producer::publish_properties;
pub use crate::session::Session;
