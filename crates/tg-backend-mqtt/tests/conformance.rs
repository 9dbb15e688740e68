//! The conformance suite against a real MQTT broker: `MQTT_URL` (default `mqtt://127.0.0.1:1883`).

use std::process::ExitCode;
use std::sync::Arc;

use tg_backend_api::Backend;
use tg_backend_mqtt::{MqttBackend, MqttConfig};

fn main() -> ExitCode {
    let url = std::env::var("MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".to_owned());
    tg_testkit::Suite::new(MqttBackend::NAME, move || {
        let url = url.clone();
        async move {
            let config = MqttConfig::from_url(&url)?;
            Ok(Arc::new(MqttBackend::connect(config).await?) as Arc<dyn Backend>)
        }
    })
    .run()
}
