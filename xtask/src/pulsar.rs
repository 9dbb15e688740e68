//! The Pulsar backend's test broker: `protoc` for the build, pulsar-lite in a Python venv, and the
//! checksum relay in front of it (see `docs/pulsar.md`).
//!
//! No Apache Pulsar broker can be installed from the package registries this project uses, so the
//! tests run against pulsar-lite (PyPI `pulsar-lite==0.2.0`, a Rust broker speaking the Pulsar
//! binary protocol, shipped as a binary inside the wheel). The same venv holds the Python framework
//! (`trustgraph-base`) the interop tests talk to.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::broker::{free_port, serve_for_a_while, BrokerProcess};
use crate::root;

/// The test broker the Pulsar crate's metadata names.
pub(crate) const TEST_BROKER: &str = "pulsar-lite";

/// What the venv gets from PyPI.
const PYTHON_PACKAGES: &[&str] = &["pulsar-lite==0.2.0", "trustgraph-base==2.11.1"];

/// pulsar-lite's configuration: no metrics server (it would bind 0.0.0.0:8080), a 5 MiB message
/// limit (its default, written out so the backend's `max_payload` matches it).
const PULSAR_LITE_CONF: &str = "\
[metrics]
enabled = false
";

/// Makes sure `protoc` (needed to build the `pulsar` crate) is on the PATH, installing Debian's
/// `protobuf-compiler` when it is missing. Says what it did; false if it is still missing.
pub(crate) fn ensure_protoc() -> bool {
    let works = || {
        Command::new("protoc")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works() || std::env::var_os("PROTOC").is_some() {
        return true;
    }
    println!("xtask: protoc is missing (the pulsar crate's build needs it); installing protobuf-compiler");
    let sudo = if is_root() { "" } else { "sudo " };
    let script = format!(
        "{sudo}apt-get update -qq && DEBIAN_FRONTEND=noninteractive {sudo}apt-get install -y -qq protobuf-compiler"
    );
    let installed = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .stdout(Stdio::null())
        .status();
    if let Err(e) = &installed {
        println!("xtask: could not run `{script}`: {e}");
    }
    let ok = works();
    if !ok {
        println!("xtask: protoc is still missing; install protobuf-compiler (Debian) by hand");
    }
    ok
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn venv() -> PathBuf {
    root().join("target").join("pulsar-venv")
}

/// The venv's python.
pub(crate) fn python() -> PathBuf {
    venv().join("bin").join("python")
}

/// The pulsar-lite binary inside the venv's site-packages, if installed.
fn broker_binary() -> Option<PathBuf> {
    let lib = venv().join("lib");
    std::fs::read_dir(&lib)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| {
            e.path()
                .join("site-packages")
                .join("pulsar_lite")
                .join("bin")
                .join("pulsar-lite")
        })
        .find(|p| p.is_file())
}

/// Creates the venv and installs pulsar-lite and trustgraph-base into it, unless a previous run
/// did (a marker file names what was installed). Returns the broker binary.
pub(crate) fn ensure_venv() -> Result<PathBuf, String> {
    let marker = venv().join(".tg-pubsub-installed");
    let wanted = PYTHON_PACKAGES.join(" ");
    if let Some(bin) = broker_binary() {
        if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == wanted) && python().is_file()
        {
            return Ok(bin);
        }
    }
    println!(
        "xtask: installing {wanted} into {} (once)",
        venv().display()
    );
    if !python().is_file() {
        let python3 = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let make_venv = || {
            Command::new(&python3)
                .args(["-m", "venv"])
                .arg(venv())
                .status()
                .map_err(|e| format!("cannot run {python3} -m venv: {e}"))
        };
        let mut status = make_venv()?;
        if !status.success() {
            // Debian's python3 has no venv module without python3-venv
            println!("xtask: `{python3} -m venv` failed; installing python3-venv and retrying");
            let sudo = if is_root() { "" } else { "sudo " };
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "{sudo}apt-get update -qq && DEBIAN_FRONTEND=noninteractive {sudo}apt-get install -y -qq python3-venv python3-pip"
                ))
                .stdout(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(venv());
            status = make_venv()?;
        }
        if !status.success() {
            return Err(format!(
                "`{python3} -m venv {}` failed ({status}); Debian needs the python3-venv package",
                venv().display()
            ));
        }
    }
    let status = Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PYTHON_PACKAGES)
        .status()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !status.success() {
        return Err(format!("pip install {wanted} failed ({status})"));
    }
    let bin = broker_binary().ok_or_else(|| {
        format!(
            "pulsar-lite installed, but its binary is not under {}/lib/*/site-packages/pulsar_lite/bin",
            venv().display()
        )
    })?;
    let _ = std::fs::write(&marker, &wanted);
    Ok(bin)
}

/// A pulsar-lite process owned by xtask on a free port with its own database, stopped on drop.
pub(crate) struct PulsarLite {
    process: BrokerProcess,
}

impl PulsarLite {
    /// Starts one and waits until it listens.
    pub(crate) fn start(binary: &Path) -> Result<Self, String> {
        let port = free_port()?;
        let process = BrokerProcess::start(
            "pulsar-lite",
            binary,
            port,
            |dir| {
                let conf = dir.join("pulsar-lite.toml");
                // an unwritable run directory fails the start with the broker's own message
                let _ = std::fs::write(&conf, PULSAR_LITE_CONF);
                [
                    "--addr".to_owned(),
                    format!("127.0.0.1:{port}"),
                    "--db-path".to_owned(),
                    dir.join("db").display().to_string(),
                    "--config".to_owned(),
                    conf.display().to_string(),
                    "--log-level".to_owned(),
                    "warn".to_owned(),
                ]
                .to_vec()
            },
            Duration::from_secs(20),
        )?;
        Ok(Self { process })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.process.port()))
    }
}

/// The checksum relay (`tg_testkit::pulsar_relay`) as a process: the `pulsar_relay` example of
/// tg-backend-pulsar, run with `cargo run`. xtask cannot link the relay itself: it reads frames with
/// the `pulsar` crate, whose build needs the `protoc` that xtask installs. Stopped on drop.
struct Relay {
    child: Child,
    url: String,
}

impl Relay {
    /// Builds and starts a relay in front of `broker`; waits for the URL it prints.
    fn start(broker: SocketAddr) -> Result<Self, String> {
        let args = [
            "run",
            "--quiet",
            "-p",
            "tg-backend-pulsar",
            "--example",
            "pulsar_relay",
            "--",
        ];
        println!("xtask: cargo {} {broker}", args.join(" "));
        let mut child = Command::new(env!("CARGO"))
            .args(args)
            .arg(broker.to_string())
            .current_dir(root())
            // the relay runs until its standard input closes: it cannot outlive xtask
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        let url = line.trim().to_owned();
        if !matches!(read, Some(Ok(n)) if n > 0) || !url.starts_with("pulsar://") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "`cargo {}` printed no relay URL ({:?})",
                args.join(" "),
                line.trim()
            ));
        }
        Ok(Self { child, url })
    }

    /// `pulsar://127.0.0.1:<port>`.
    fn url(&self) -> String {
        self.url.clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// pulsar-lite with the checksum relay in front, for one xtask run.
pub(crate) struct TestBroker {
    // drop order: the relay first, then the broker
    relay: Relay,
    lite: PulsarLite,
    binary: PathBuf,
}

impl TestBroker {
    /// Installs what is missing and starts broker and relay.
    pub(crate) fn start() -> Result<Self, String> {
        let binary = ensure_venv()?;
        let lite = PulsarLite::start(&binary)?;
        let relay = Relay::start(lite.addr())
            .map_err(|e| format!("cannot start the checksum relay: {e}"))?;
        println!(
            "xtask: Pulsar tests use pulsar-lite on {} through the checksum relay {} (log: {})",
            lite.addr(),
            relay.url(),
            lite.process.log().display()
        );
        Ok(Self {
            relay,
            lite,
            binary,
        })
    }

    /// The environment the tests and benches read.
    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PULSAR_URL", self.relay.url()),
            ("PULSAR_LITE_URL", format!("pulsar://{}", self.lite.addr())),
            ("PULSAR_LITE_BIN", self.binary.display().to_string()),
            ("PULSAR_PYTHON", python().display().to_string()),
        ]
    }
}

/// For `test pulsar` and `test all`: protoc, and (unless `PULSAR_URL` is set) a broker with its
/// relay, whose variables are added to `env`. The returned value keeps them running.
///
/// With `XTASK_PULSAR_SERVE_SECS=N` it prints the variables and keeps the broker up for N seconds
/// before the tests run (for running single tests by hand meanwhile).
pub(crate) fn test_env(env: &mut Vec<(&'static str, String)>) -> Option<TestBroker> {
    ensure_protoc();
    if std::env::var_os("PULSAR_URL").is_some() {
        println!("xtask: PULSAR_URL is set; the Pulsar tests use that broker");
        return None;
    }
    match TestBroker::start() {
        Ok(broker) => {
            env.extend(broker.env());
            serve_for_a_while("XTASK_PULSAR_SERVE_SECS", &broker.env());
            Some(broker)
        }
        Err(e) => {
            println!("xtask: could NOT start pulsar-lite: {e}; the Pulsar tests will be skipped (or fail under CI=true)");
            None
        }
    }
}

/// `cargo xtask services`: protoc for the build and the venv with pulsar-lite (the broker itself
/// is started per test run, on a free port).
pub(crate) fn services() {
    let protoc = ensure_protoc();
    let venv = ensure_venv();
    println!(
        "{:<10} {:<16} {}",
        "pulsar",
        "per test run",
        match (&venv, protoc) {
            (Ok(_), true) => "ready (protoc, pulsar-lite venv)".to_owned(),
            (Err(e), _) => format!("DOWN: {e}"),
            (Ok(_), false) => "DOWN: protoc missing".to_owned(),
        }
    );
}
