//! A RabbitMQ node of the test's own: the machine's `rabbitmq-server` on free 127.0.0.1 ports
//! with its node name, database, logs, configuration and Erlang cookie in a fresh directory, which
//! the test can stop (SIGTERM: a clean shutdown) and start again with the same data, without
//! touching the shared broker on 5672 that the other suites use.
//!
//! `RABBITMQ_SERVER` names the start script; the default is Debian's
//! `/usr/lib/rabbitmq/bin/rabbitmq-server` (the one `/usr/sbin/rabbitmq-server` runs as the
//! rabbitmq user). Missing, [`OwnNode::new`] skips (a failure under `CI=true`).

#![allow(dead_code, unreachable_pub)]

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tg_testkit::support::{free_port, skip};

/// How long a start may take (an Erlang node boots in 5 to 20 s on two busy cores).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a clean stop may take before the node is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A RabbitMQ node of the test's own; stopped and its directory removed on drop.
#[derive(Debug)]
pub struct OwnNode {
    program: PathBuf,
    dir: PathBuf,
    name: String,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

impl OwnNode {
    /// A node on free ports, not started yet; `None` (after [`skip`]) without `rabbitmq-server`.
    pub fn new() -> Option<Self> {
        let program = std::env::var_os("RABBITMQ_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server"));
        if !program.is_file() {
            skip(&format!(
                "{} is missing (Debian's rabbitmq-server package; or set RABBITMQ_SERVER)",
                program.display()
            ));
            return None;
        }
        let port = free_port();
        let mut dist_port = free_port();
        while dist_port == port {
            dist_port = free_port();
        }
        let name = format!("tgtest{}x{port}", std::process::id());
        let dir = std::env::temp_dir().join(format!("tg-own-rabbitmq-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the node's directory");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("write rabbitmq.conf");
        // no rabbitmq-env.conf: the machine's would name the shared node
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");
        Some(Self {
            program,
            dir,
            name,
            port,
            dist_port,
            child: None,
        })
    }

    /// `amqp://guest:guest@127.0.0.1:{port}/%2f` plus `options` (`?…`).
    pub fn url(&self, options: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f{options}", self.port)
    }

    /// The AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the node and waits until its AMQP port accepts connections.
    ///
    /// # Panics
    ///
    /// When it cannot be spawned or does not listen in time.
    pub fn start(&mut self) {
        if self.child.is_some() {
            return;
        }
        let d = &self.dir;
        let log = std::fs::File::create(d.join("node.log")).expect("create node.log");
        let child = Command::new(&self.program)
            // a group of its own: the Erlang VM is a child of the script, and a node that does not
            // stop is killed with its group
            .process_group(0)
            .current_dir(d)
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", format!("{}@localhost", self.name))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program.display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!(
                    "own RabbitMQ node exited at start-up ({status}); see {}",
                    d.join("node.log").display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "own RabbitMQ node did not listen on {} within {START_TIMEOUT:?}; see {}",
                self.port,
                d.join("node.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the node cleanly (SIGTERM to its start script, which stops the node) and waits;
    /// killed after 30 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(format!("-{}", child.id()))
                    .status();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // the script returns when the node is down; make sure the port is free again
        let deadline = Instant::now() + STOP_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for OwnNode {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Closes, through `rabbitmqctl close_connection` on the local broker, the connections this
/// process opened (tg-pubsub names them `tg-pubsub … (pid N)`); how many it closed.
pub fn close_connections_of_this_process() -> usize {
    let Ok(out) = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
    else {
        return 0;
    };
    let mine = format!("(pid {})", std::process::id());
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&mine))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    pids.iter()
        .filter(|pid| {
            Command::new("rabbitmqctl")
                .args(["close_connection", pid, "closed by a tg-pubsub test"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .count()
}
