//! The conformance suite against a real MQTT broker: `MQTT_URL` (`cargo xtask test mqtt` starts a
//! Mosquitto of its own and sets it), else `MQTT_HOST`/`MQTT_PORT` (default localhost:1883); and
//! the backend's page in `docs/`.

fn main() -> std::process::ExitCode {
    tg_testkit::Suite::for_driver(&tg_backend_mqtt::DRIVER)
        .doc_page(include_str!("../../../docs/mqtt.md"))
        .run()
}
