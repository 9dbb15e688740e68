//! Development tasks of tg-pubsub. Run `cargo xtask help`.
//!
//! The commands a developer runs are the commands CI runs (`.ci/run` calls `cargo xtask ci`).

mod broker;
mod fuzz;
mod kafka;
mod mosquitto;
mod publish;
mod pulsar;
mod schema;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// A backend crate of the workspace, as its manifest describes it under
/// `[package.metadata.tg-pubsub]`: the backend's name, the local server its tests use (started by
/// `services` when it is down), and a test broker xtask runs for the test run itself.
#[derive(Debug, Clone)]
struct BackendCrate {
    backend: String,
    crate_name: String,
    server: Option<Server>,
    test_broker: Option<String>,
}

/// A local server: its port on 127.0.0.1 and the shell command that starts it when it is down.
#[derive(Debug, Clone)]
struct Server {
    port: u16,
    start: String,
}

/// The backend crates of the workspace (`cargo metadata`), memory first.
fn backend_crates() -> Result<Vec<BackendCrate>, String> {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err("cargo metadata failed".to_owned());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cargo metadata printed no JSON: {e}"))?;
    let mut crates = backends_from_metadata(&metadata)?;
    crates.sort_by_key(|c| (c.backend != "memory", c.backend.clone()));
    Ok(crates)
}

/// Reads the backend crates out of `cargo metadata`'s JSON.
fn backends_from_metadata(metadata: &serde_json::Value) -> Result<Vec<BackendCrate>, String> {
    let packages = metadata["packages"]
        .as_array()
        .ok_or("cargo metadata has no packages")?;
    let mut crates = Vec::new();
    for package in packages {
        let meta = &package["metadata"]["tg-pubsub"];
        let Some(backend) = meta["backend"].as_str() else {
            continue;
        };
        let crate_name = package["name"].as_str().unwrap_or_default().to_owned();
        let server = match &meta["server"] {
            serde_json::Value::Null => None,
            server => Some(Server {
                port: server["port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| format!("{crate_name}: server.port is not a port"))?,
                start: server["start"]
                    .as_str()
                    .ok_or_else(|| format!("{crate_name}: server.start is missing"))?
                    .to_owned(),
            }),
        };
        crates.push(BackendCrate {
            backend: backend.to_owned(),
            crate_name,
            server,
            test_broker: meta["test-broker"].as_str().map(str::to_owned),
        });
    }
    Ok(crates)
}

fn find_backend(backend: &str) -> Result<BackendCrate, String> {
    let crates = backend_crates()?;
    crates
        .iter()
        .find(|c| c.backend == backend)
        .cloned()
        .ok_or_else(|| {
            format!(
                "unknown backend {backend:?}; known: {}",
                crates
                    .iter()
                    .map(|c| c.backend.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

const USAGE: &str = "\
usage: cargo xtask <command>

  test <backend>|all   run the backend's tests (conformance suite included) against its local
                       server, starting the server if it is down; `all` runs the whole workspace
                       (`cargo test --workspace`). Ends with `N passed, N failed, N skipped`.
  bench <backend>      memory: the CLI bench in release mode; others: the crate's compare bench
                       (tg-pubsub against the raw client crate, same run), with the CLI bench on
                       the same broker, qos (q1) and message size before and after it (3 runs,
                       median); BENCH_MESSAGES (100,000) for both
  schema sync|check    write the framework's message types into tg-schema from the pinned
                       trustgraph-base (sync), or fail if the committed ones differ (check)
  fuzz [seconds] [target…]
                       run every fuzz target of fuzz/ (or only the ones named) for `seconds` each
                       (default 30; cargo-fuzz on the nightly toolchain, installed once into
                       ~/.cache/tg-pubsub/tools)
  services             report the local servers and start the ones that are down
  examples             build and run the facade's examples (switch_backend on each local broker too)
  publish-check        package and verify every publishable crate in publishing order (no upload)
  ci                   what CI runs: fmt --check, clippy -D warnings, doc, schema check, test all
  help                 this text

backends: the workspace's crates with `[package.metadata.tg-pubsub] backend = …`:";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["test", backend] => test(backend),
        ["bench", backend] => bench(backend),
        ["schema", mode] => schema::run(mode),
        ["fuzz", rest @ ..] => fuzz::run_args(rest),
        ["services"] => backend_crates().map(|crates| services(&crates)),
        [command @ ("examples" | "publish-check")] => publish::run(command),
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
    let names = backend_crates()
        .map(|crates| {
            crates
                .into_iter()
                .map(|c| c.backend)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|e| format!("({e})"));
    println!("{USAGE} {names}");
}

/// The workspace xtask was run for. `cargo xtask` (`cargo run`) says which at run time; the path
/// compiled in is only the fallback for a binary started by hand. Two checkouts sharing one
/// target directory share this binary too (cargo names workspace members by their path inside
/// the workspace), and a compiled-in path would make a run in one checkout build and test the
/// other's code.
fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The cache of what xtask installs once and fresh clones reuse (the Kafka test broker,
/// cargo-fuzz): `TG_PUBSUB_CACHE`, else `$XDG_CACHE_HOME/tg-pubsub`, else `~/.cache/tg-pubsub`,
/// else `target/` of the checkout.
fn cache_dir() -> PathBuf {
    std::env::var_os("TG_PUBSUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("tg-pubsub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache").join("tg-pubsub"))
        })
        .unwrap_or_else(|| root().join("target"))
}

fn reachable(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Makes sure the backend's server is up, starting it if needed. Says what it could not reach.
fn ensure_server(backend: &str, server: &Server) -> bool {
    if reachable(server.port) {
        return true;
    }
    println!(
        "xtask: {backend} server on 127.0.0.1:{} is down; starting it: {}",
        server.port, server.start
    );
    let started = Command::new("sh").arg("-c").arg(&server.start).status();
    if let Err(e) = &started {
        println!("xtask: could not run the start command: {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if reachable(server.port) {
            println!("xtask: {backend} server is up");
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "xtask: could NOT reach the {backend} server on 127.0.0.1:{}; its tests will be skipped (or fail under CI=true)",
        server.port
    );
    false
}

/// Starts the servers of `crates` that are down and prepares their test brokers; reports each.
fn services(crates: &[BackendCrate]) {
    for c in crates {
        if let Some(server) = &c.server {
            let up = ensure_server(&c.backend, server);
            println!(
                "{:<10} 127.0.0.1:{:<6} {}",
                c.backend,
                server.port,
                if up { "up" } else { "DOWN" }
            );
        }
        if c.test_broker.as_deref() == Some(pulsar::TEST_BROKER) {
            pulsar::services();
        }
        if c.test_broker.as_deref() == Some(kafka::TEST_BROKER) {
            kafka::services();
        }
        if c.test_broker.as_deref() == Some(MOSQUITTO_TEST_BROKER) {
            match mosquitto::ensure_mosquitto() {
                Ok(program) => {
                    println!("{:<10} current Mosquitto {}", c.backend, program.display())
                }
                Err(e) => println!("{:<10} current Mosquitto MISSING: {e}", c.backend),
            }
        }
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
    fn start(program: &Path) -> Option<Self> {
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
        let child = match Command::new(program)
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
                    "xtask: MQTT tests use a Mosquitto on 127.0.0.1:{port} ({}, {})",
                    program.display(),
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

/// The test broker `OwnMosquitto` stands for in a crate's metadata.
const MOSQUITTO_TEST_BROKER: &str = "mosquitto";

/// A test broker xtask runs for one test or bench run. Nothing reads it: it is held so that its
/// `Drop` stops the broker when the run ends.
#[expect(dead_code, reason = "held for its Drop")]
enum TestBroker {
    Mosquitto(OwnMosquitto),
    Pulsar(pulsar::TestBroker),
    Kafka(kafka::TestBroker),
}

/// Starts the test brokers of `crates` (unless the environment already names a broker), adding
/// the variables the tests read to `env`. The returned values keep them running.
fn test_brokers(crates: &[BackendCrate], env: &mut Vec<(&'static str, String)>) -> Vec<TestBroker> {
    let mut running = Vec::new();
    for c in crates {
        match c.test_broker.as_deref() {
            Some(MOSQUITTO_TEST_BROKER) => {
                // The shared test broker is a current Mosquitto, and tests that need one start
                // theirs from `MOSQUITTO_BIN` (see `mosquitto.rs`).
                let current = mosquitto::ensure_mosquitto();
                if let Err(e) = &current {
                    println!("xtask: no current Mosquitto ({e}); the machine's stands in");
                }
                if std::env::var_os("MQTT_URL").is_none() {
                    let program = current
                        .as_ref()
                        .map_or_else(|_| PathBuf::from("mosquitto"), Clone::clone);
                    if let Some(own) = OwnMosquitto::start(&program) {
                        env.push(("MQTT_URL", own.url()));
                        running.push(TestBroker::Mosquitto(own));
                    }
                }
                if let Ok(program) = current {
                    env.push(("MOSQUITTO_BIN", program.display().to_string()));
                }
            }
            Some(pulsar::TEST_BROKER) => {
                if let Some(broker) = pulsar::test_env(env) {
                    running.push(TestBroker::Pulsar(broker));
                }
            }
            Some(kafka::TEST_BROKER) => {
                if let Some(broker) = kafka::test_env(env) {
                    running.push(TestBroker::Kafka(broker));
                }
            }
            _ => {}
        }
    }
    running
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
    let mut env = Vec::new();
    let crates = if backend == "all" {
        backend_crates()?
    } else {
        vec![find_backend(backend)?]
    };
    services(&crates);
    let _brokers = test_brokers(&crates, &mut env);
    // Every test binary runs even after one failed, so that one run shows every failure (cargo
    // stops at the first failing binary otherwise, and a CI run would hide the rest).
    let ok = if backend == "all" {
        cargo_test(
            &["test", "--no-fail-fast", "--workspace"],
            &env,
            &mut totals,
        )?
    } else {
        cargo_test(
            &["test", "--no-fail-fast", "-p", &crates[0].crate_name],
            &env,
            &mut totals,
        )?
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
    let c = find_backend(backend)?;
    if let Some(server) = &c.server {
        if !ensure_server(&c.backend, server) {
            return Err(format!("the {backend} server is not reachable"));
        }
    }
    let mut env = Vec::new();
    let _brokers = test_brokers(std::slice::from_ref(&c), &mut env);
    // The compare bench and the CLI bench move the same number of messages, so their msg/s
    // compare; every compare bench uses 200-byte payloads on a q1 topic, as the CLI run below.
    let messages = std::env::var("BENCH_MESSAGES").unwrap_or_else(|_| "100000".to_owned());
    env.push(("BENCH_MESSAGES", messages.clone()));
    env.push(("PUBSUB_BACKEND", backend.to_owned()));
    let envs = || env.iter().map(|(k, v)| (*k, v.as_str()));
    let cli_args = [
        "bench",
        "--qos",
        "q1",
        "--size",
        "200",
        "--messages",
        &messages,
        "--typed-messages",
        "0",
        "--rate",
        "0",
    ];
    let cli_run = |rates: &mut Vec<f64>| -> Result<(), String> {
        println!(
            "xtask: PUBSUB_BACKEND={backend} tg-pubsub {}",
            cli_args.join(" ")
        );
        let out = Command::new(cargo)
            // the CLI's features are named like the backends; Pulsar and Kafka are not default
            .args([
                "run",
                "--release",
                "-q",
                "-p",
                "tg-pubsub-cli",
                "--features",
            ])
            .args([backend, "--"])
            .args(cli_args)
            .envs(envs())
            .current_dir(root())
            .output()
            .map_err(|e| format!("cannot run the CLI: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}");
        if !out.status.success() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            return Err(format!(
                "the CLI bench on {backend} failed ({})",
                out.status
            ));
        }
        rates.push(
            cli_rate(&text).ok_or_else(|| "the CLI bench printed no raw-bytes row".to_owned())?,
        );
        Ok(())
    };
    let mut rates = Vec::new();
    cli_run(&mut rates)?;
    println!("xtask: cargo bench -p {} --bench compare", c.crate_name);
    let status = Command::new(cargo)
        .args(["bench", "-p", &c.crate_name, "--bench", "compare"])
        .envs(envs())
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run cargo bench: {e}"))?;
    if !status.success() {
        return Err(format!("the {backend} bench failed ({status})"));
    }
    cli_run(&mut rates)?;
    cli_run(&mut rates)?;
    let shown: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    rates.sort_by(f64::total_cmp);
    println!(
        "\n### CLI bench on {backend}, q1, {messages} messages of 200 bytes (runs before and after the compare bench)\n\n\
         | runs (msg/s) | median msg/s | load average |\n|---|---:|---|\n| {} | {:.0} | {} |",
        shown.join(", "),
        rates[rates.len() / 2],
        load_average()
    );
    Ok(())
}

/// The msg/s of the CLI bench's raw-bytes throughput row (`| throughput | raw bytes | n | s |
/// msg/s | …`, the table `tg_testkit::bench::format_table` prints).
fn cli_rate(output: &str) -> Option<f64> {
    output.lines().find_map(|line| {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        match cells.as_slice() {
            ["", "throughput", "raw bytes", _, _, rate, ..] => rate.parse().ok(),
            _ => None,
        }
    })
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
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
    schema::run("check")?;
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
    fn backends_come_from_crate_metadata() {
        let json = serde_json::json!({"packages": [
            {"name": "tg-runtime", "metadata": null},
            {"name": "tg-backend-redis", "metadata": {"tg-pubsub": {
                "backend": "redis", "server": {"port": 6379, "start": "redis-server"}}}},
            {"name": "tg-backend-pulsar", "metadata": {"tg-pubsub": {
                "backend": "pulsar", "test-broker": "pulsar-lite"}}},
        ]});
        let crates = backends_from_metadata(&json).unwrap();
        assert_eq!(crates.len(), 2);
        assert_eq!(crates[0].crate_name, "tg-backend-redis");
        assert_eq!(crates[0].server.as_ref().map(|s| s.port), Some(6379));
        assert_eq!(crates[1].test_broker.as_deref(), Some("pulsar-lite"));
        let bad = serde_json::json!({"packages": [{"name": "x", "metadata": {"tg-pubsub": {
            "backend": "x", "server": {"port": "one"}}}}]});
        assert!(backends_from_metadata(&bad).unwrap_err().contains("port"));
    }

    #[test]
    fn every_backend_crate_of_the_workspace_is_found() {
        let crates = backend_crates().unwrap();
        assert_eq!(crates[0].backend, "memory");
        for c in &crates {
            assert_eq!(c.crate_name, format!("tg-backend-{}", c.backend));
        }
        let dirs = std::fs::read_dir(root().join("crates"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("tg-backend-") && n != "tg-backend-api")
            .count();
        assert_eq!(
            crates.len(),
            dirs,
            "a tg-backend-* crate lacks [package.metadata.tg-pubsub]"
        );
    }
}
