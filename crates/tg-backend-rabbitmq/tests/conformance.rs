//! The conformance suite against the RabbitMQ of `RABBITMQ_URL`, else of the framework's
//! settings (default `amqp://guest:guest@localhost:5672/%2f`), and the backend's page in `docs/`.
//!
//! Without `RABBITMQ_URL`, and where `rabbitmqctl` can administer the broker (the local one, as
//! root or the rabbitmq user), the run gets a vhost of its own that is deleted at the end, so runs
//! leave no durable queues behind on the shared broker.

use std::process::{Command, ExitCode, Stdio};

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() -> ExitCode {
    let own_vhost = std::env::var_os("RABBITMQ_URL").is_none()
        && {
            let vhost = format!("tg-conformance-{}", std::process::id());
            let user = std::env::var("RABBITMQ_USERNAME").unwrap_or_else(|_| "guest".into());
            let made = rabbitmqctl(&["add_vhost", &vhost])
                && rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]);
            if made {
                // read by the driver (the framework's RABBITMQ_VHOST), as a deployment would set it
                std::env::set_var("RABBITMQ_VHOST", &vhost);
            } else {
                eprintln!("note: rabbitmqctl cannot add a vhost here; the suite runs in the configured vhost and leaves its queues");
            }
            made
        };
    let code = tg_testkit::Suite::for_driver(&tg_backend_rabbitmq::DRIVER)
        .doc_page(include_str!("../../../docs/rabbitmq.md"))
        .run();
    if own_vhost {
        if let Ok(vhost) = std::env::var("RABBITMQ_VHOST") {
            rabbitmqctl(&["delete_vhost", &vhost]);
        }
    }
    code
}
