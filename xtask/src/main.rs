//! Development tasks of tg-pubsub. Run `cargo xtask help`.
//!
//! The commands a developer runs are the commands CI runs (`.ci/run` calls `cargo xtask ci`).

mod pulsar;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// A broker backend and the local server its tests use.
struct Server {
    backend: &'static str,
    crate_name: &'static str,
    port: u16,
    /// Shell command that starts the local server when it is down.
    start: &'static str,
}

const SERVERS: &[Server] = &[
    Server {
        backend: "redis",
        crate_name: "tg-backend-redis",
        port: 6379,
        start: "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log",
    },
    Server {
        backend: "postgres",
        crate_name: "tg-backend-postgres",
        port: 5432,
        start: "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    },
    Server {
        backend: "mqtt",
        crate_name: "tg-backend-mqtt",
        port: 1883,
        start: "mosquitto -d -c /etc/mosquitto/mosquitto.conf",
    },
];

const USAGE: &str = "\
usage: cargo xtask <command>

  test <backend>|all   run the backend's tests (conformance suite included) against its local
                       server, starting the server if it is down; `all` runs the whole workspace
                       (`cargo test --workspace`). Ends with `N passed, N failed, N skipped`.
  bench <backend>      memory: the CLI bench in release mode; others: the crate's compare bench
                       (tg-pubsub against the raw client crate, same run)
  services             report the local servers and start the ones that are down
  ci                   what CI runs: fmt --check, clippy -D warnings, doc, test all
  help                 this text

backends: memory (always), and those whose crate is in the workspace:";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["test", backend] => test(backend),
        ["bench", backend] => bench(backend),
        ["services"] => {
            services(&available_servers());
            pulsar::services();
            Ok(())
        }
        ["ci"] => ci(),
        [] | ["help"] | ["--help"] | ["-h"] => {
            print_usage();
            Ok(())
        }
        _ => {
            print_usage();
            Err(format!("unknown command {:?}", args.join(" ")))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_usage() {
    println!("{USAGE} {}", backends().join(", "));
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn crate_exists(name: &str) -> bool {
    root()
        .join("crates")
        .join(name)
        .join("Cargo.toml")
        .is_file()
}

/// The servers of backends whose crate is in the workspace.
fn available_servers() -> Vec<&'static Server> {
    SERVERS
        .iter()
        .filter(|s| crate_exists(s.crate_name))
        .collect()
}

fn backends() -> Vec<&'static str> {
    std::iter::once("memory")
        .chain(available_servers().iter().map(|s| s.backend))
        .collect()
}

fn reachable(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Makes sure the server is up, starting it if needed. Says what it could not reach.
fn ensure_server(server: &Server) -> bool {
    if reachable(server.port) {
        return true;
    }
    println!(
        "xtask: {} server on 127.0.0.1:{} is down; starting it: {}",
        server.backend, server.port, server.start
    );
    let started = Command::new("sh").arg("-c").arg(server.start).status();
    if let Err(e) = &started {
        println!("xtask: could not run the start command: {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if reachable(server.port) {
            println!("xtask: {} server is up", server.backend);
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "xtask: could NOT reach the {} server on 127.0.0.1:{}; its tests will be skipped (or fail under CI=true)",
        server.backend, server.port
    );
    false
}

fn services(servers: &[&Server]) {
    for server in servers {
        let up = ensure_server(server);
        println!(
            "{:<10} 127.0.0.1:{:<6} {}",
            server.backend,
            server.port,
            if up { "up" } else { "DOWN" }
        );
    }
}

/// Mosquitto's default `max_queued_messages 1000` silently drops QoS 1/2 messages for a consumer
/// that falls behind while confirming them to the producer, which a 10,000-message test under load
/// trips over. The MQTT tests therefore run against a Mosquitto started here with this project
/// configuration, unless `MQTT_URL` is set.
const MOSQUITTO_CONF: &str =
    "allow_anonymous true\nmax_queued_messages 1000000\npersistence false\nlog_dest none\n";

/// A Mosquitto owned by xtask, stopped on drop.
struct OwnMosquitto {
    child: Child,
    port: u16,
}

impl OwnMosquitto {
    /// Starts one on a free port, or says why it could not.
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let dir = root().join("target").join("xtask-mosquitto");
        let conf = dir.join("mosquitto.conf");
        let written = std::fs::create_dir_all(&dir).and_then(|_| {
            std::fs::write(
                &conf,
                format!("listener {port} 127.0.0.1\n{MOSQUITTO_CONF}"),
            )
        });
        if let Err(e) = written {
            println!("xtask: cannot write {}: {e}", conf.display());
            return None;
        }
        let child = match Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                println!("xtask: cannot start mosquitto ({e}); MQTT tests use 127.0.0.1:1883 and its configuration");
                return None;
            }
        };
        let own = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if reachable(port) {
                println!(
                    "xtask: MQTT tests use a Mosquitto on 127.0.0.1:{port} ({})",
                    conf.display()
                );
                return Some(own);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("xtask: the Mosquitto started on port {port} did not listen; MQTT tests use 127.0.0.1:1883");
        None
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment the tests of `backend` (or `all`) need, with what keeps it alive.
fn test_env(backend: &str) -> (Vec<(&'static str, String)>, Option<OwnMosquitto>) {
    if !(backend == "mqtt" || backend == "all") || std::env::var_os("MQTT_URL").is_some() {
        return (Vec::new(), None);
    }
    match OwnMosquitto::start() {
        Some(own) => (vec![("MQTT_URL", own.url())], Some(own)),
        None => (Vec::new(), None),
    }
}

#[derive(Default, Debug)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds a libtest line `test result: ok. 25 passed; 0 failed; 3 ignored; …`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs cargo with `args`, echoing its output and adding up the libtest result lines.
fn cargo_test(args: &[&str], env: &[(&str, String)], totals: &mut Totals) -> Result<bool, String> {
    println!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(env!("CARGO"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            totals.add_line(&line);
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("cargo did not finish: {e}"))?;
    Ok(status.success())
}

fn test(backend: &str) -> Result<(), String> {
    let mut totals = Totals::default();
    let (mut env, _mosquitto) = test_env(backend);
    let _pulsar = pulsar::test_env(backend, &mut env);
    let ok = if backend == "all" {
        services(&available_servers());
        cargo_test(&["test", "--workspace"], &env, &mut totals)?
    } else if backend == "memory" {
        cargo_test(&["test", "-p", "tg-backend-memory"], &env, &mut totals)?
    } else if backend == "pulsar" {
        pulsar::test(&env, &mut totals)?
    } else {
        let server = available_servers()
            .into_iter()
            .find(|s| s.backend == backend)
            .ok_or_else(|| {
                format!(
                    "unknown backend {backend:?}; known: {}",
                    backends().join(", ")
                )
            })?;
        ensure_server(server);
        cargo_test(&["test", "-p", server.crate_name], &env, &mut totals)?
    };
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if ok && totals.failed == 0 {
        Ok(())
    } else {
        Err(format!("tests of {backend} failed"))
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    println!("xtask: {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

fn bench(backend: &str) -> Result<(), String> {
    let cargo = env!("CARGO");
    if backend == "memory" {
        return run(
            cargo,
            &["run", "--release", "-p", "tg-pubsub-cli", "--", "bench"],
        );
    }
    if backend == "pulsar" {
        return pulsar::bench();
    }
    let server = available_servers()
        .into_iter()
        .find(|s| s.backend == backend)
        .ok_or_else(|| {
            format!(
                "unknown backend {backend:?}; known: {}",
                backends().join(", ")
            )
        })?;
    if !ensure_server(server) {
        return Err(format!("the {backend} server is not reachable"));
    }
    run(
        cargo,
        &["bench", "-p", server.crate_name, "--bench", "compare"],
    )
}

fn ci() -> Result<(), String> {
    let cargo = env!("CARGO");
    run(cargo, &["fmt", "--all", "--", "--check"])?;
    run(
        cargo,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    let doc = Command::new(cargo)
        .args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings")
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run cargo doc: {e}"))?;
    if !doc.success() {
        return Err("cargo doc --workspace --no-deps failed".to_owned());
    }
    test("all")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_up_libtest_lines() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 25 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 7.64s");
        t.add_line(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("conformance(memory): 25 passed, 0 failed, 3 skipped");
        assert_eq!((t.passed, t.failed, t.ignored), (26, 2, 3));
    }

    #[test]
    fn memory_is_always_a_backend() {
        assert_eq!(backends()[0], "memory");
        assert!(SERVERS
            .iter()
            .all(|s| s.crate_name.starts_with("tg-backend-")));
    }
}
