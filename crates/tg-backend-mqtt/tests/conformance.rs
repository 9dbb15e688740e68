//! The conformance suite against a real MQTT broker: `MQTT_URL` (`cargo xtask test mqtt` starts a
//! Mosquitto of its own and sets it), else `MQTT_HOST`/`MQTT_PORT` (default localhost:1883).

fn main() -> std::process::ExitCode {
    tg_testkit::Suite::for_driver(&tg_backend_mqtt::DRIVER).run()
}
