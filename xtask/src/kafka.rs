//! The Kafka backend's test broker: tansu, an Apache-Kafka-compatible broker written in Rust,
//! installed once with `cargo install` into a cache outside the checkout (see `docs/kafka.md`).
//!
//! No Apache Kafka broker can be installed from the package registries this project uses. tansu
//! 0.6.0 with its SQLite storage engine (`libsql`) runs consumer groups correctly; its in-memory
//! engine does not (members never get past JoinGroup/SyncGroup), so that build is not used.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::broker::{free_port, serve_for_a_while, BrokerProcess};

/// The test broker the Kafka crate's metadata names.
pub(crate) const TEST_BROKER: &str = "tansu";

/// What `cargo install` builds: the version, and the storage engine feature.
const TANSU_CRATE: &str = "tansu@0.6.0";
const TANSU_FEATURES: &str = "libsql";

/// Where `cargo install --root` puts it: in the cache outside the checkout
/// ([`crate::cache_dir`]), keyed by what is built. CI runs on a fresh clone each time, and
/// building tansu takes 10–20 minutes on two cores.
fn install_root() -> PathBuf {
    crate::cache_dir().join(format!(
        "{}-{TANSU_FEATURES}",
        TANSU_CRATE.replace('@', "-")
    ))
}

fn binary() -> PathBuf {
    install_root().join("bin").join("tansu")
}

/// Installs tansu unless a previous run did (a marker file names what was installed). Returns the
/// binary. The build takes 10–20 minutes on two cores; later runs find it cached.
pub(crate) fn ensure_tansu() -> Result<PathBuf, String> {
    let marker = install_root().join(".tg-pubsub-installed");
    let wanted = format!("{TANSU_CRATE} --no-default-features --features {TANSU_FEATURES}");
    if binary().is_file() && std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == wanted) {
        return Ok(binary());
    }
    println!(
        "xtask: installing {wanted} into {} (once; 10-20 minutes)",
        install_root().display()
    );
    // `--locked`: without it the current releases of tansu's dependencies do not compile together
    let status = Command::new(env!("CARGO"))
        .args(["install", "--locked", "--root"])
        .arg(install_root())
        .args([
            TANSU_CRATE,
            "--no-default-features",
            "--features",
            TANSU_FEATURES,
        ])
        .status()
        .map_err(|e| format!("cannot run cargo install: {e}"))?;
    if !status.success() || !binary().is_file() {
        return Err(format!("cargo install {wanted} failed ({status})"));
    }
    let _ = std::fs::write(&marker, &wanted);
    Ok(binary())
}

/// Makes sure what the `rdkafka` crate's build of librdkafka needs is there: a C compiler, make
/// and pkg-config, and OpenSSL's headers (TLS and SCRAM), installing Debian's packages when
/// something is missing. Says what it did; false if something is still missing.
pub(crate) fn ensure_build_tools() -> bool {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ready = || {
        works("cc", &["--version"])
            && works("make", &["--version"])
            && works("pkg-config", &["--exists", "openssl"])
    };
    if ready() {
        return true;
    }
    println!("xtask: the librdkafka build needs cc, make, pkg-config and OpenSSL headers; installing build-essential pkg-config libssl-dev");
    let sudo = if is_root() { "" } else { "sudo " };
    let script = format!(
        "{sudo}apt-get update -qq && DEBIAN_FRONTEND=noninteractive {sudo}apt-get install -y -qq build-essential pkg-config libssl-dev"
    );
    if let Err(e) = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .stdout(Stdio::null())
        .status()
    {
        println!("xtask: could not run `{script}`: {e}");
    }
    let ok = ready();
    if !ok {
        println!("xtask: still missing; install build-essential, pkg-config and libssl-dev (Debian) by hand");
    }
    ok
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A tansu broker owned by xtask on a free port with its own SQLite file, stopped on drop.
pub(crate) struct TestBroker {
    process: BrokerProcess,
    binary: PathBuf,
}

impl TestBroker {
    /// Installs tansu if needed, starts it and waits until it listens.
    pub(crate) fn start() -> Result<Self, String> {
        let binary = ensure_tansu()?;
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        // tansu doubles an absolute path after `sqlite://`: the file is named relative to the
        // broker's working directory, the run's own
        let args = |_: &Path| {
            [
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://tansu.db",
            ]
            .map(str::to_owned)
            .to_vec()
        };
        let process = BrokerProcess::start("tansu", &binary, port, args, Duration::from_secs(30))?;
        println!(
            "xtask: Kafka tests use tansu on 127.0.0.1:{port} (log: {})",
            process.log().display()
        );
        Ok(Self { process, binary })
    }

    /// The environment the tests and benches read: the broker in the backend's URL form and in
    /// the Python framework's, and the binary (for tests that run a broker of their own).
    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            // tansu holds every fetch for the whole `fetch.wait.max.ms`, data or not
            // (docs/kafka.md, known defects): 50 ms instead of Kafka's 500 ms
            (
                "KAFKA_URL",
                format!("kafka://127.0.0.1:{}?fetch_wait=50ms", self.process.port()),
            ),
            (
                "KAFKA_BOOTSTRAP_SERVERS",
                format!("127.0.0.1:{}", self.process.port()),
            ),
            ("TANSU_BIN", self.binary.display().to_string()),
        ]
    }
}

/// For `test kafka` and `test all`: the build tools, the Python venv of the interop tests (shared
/// with the Pulsar tests) and (unless `KAFKA_URL` is set) a broker whose variables are added to
/// `env`. The returned value keeps it running.
///
/// With `XTASK_KAFKA_SERVE_SECS=N` it prints the variables and keeps the broker up for N seconds
/// before the tests run (for running single tests by hand meanwhile).
pub(crate) fn test_env(env: &mut Vec<(&'static str, String)>) -> Option<TestBroker> {
    ensure_build_tools();
    // the venv's python, with trustgraph-base and its Kafka client aiokafka, for the interop
    // tests and the Python bench
    match crate::pulsar::ensure_venv() {
        Ok(_) => env.push(("KAFKA_PYTHON", crate::pulsar::python().display().to_string())),
        Err(e) => println!("xtask: the Python venv is missing ({e}); the Kafka interop tests will be skipped (or fail under CI=true)"),
    }
    if std::env::var_os("KAFKA_URL").is_some() {
        println!("xtask: KAFKA_URL is set; the Kafka tests use that broker");
        return None;
    }
    match TestBroker::start() {
        Ok(broker) => {
            env.extend(broker.env());
            serve_for_a_while("XTASK_KAFKA_SERVE_SECS", &broker.env());
            Some(broker)
        }
        Err(e) => {
            println!("xtask: could NOT start tansu: {e}; the Kafka tests will be skipped (or fail under CI=true)");
            None
        }
    }
}

/// `cargo xtask services`: the build tools and tansu (the broker itself is started per test run,
/// on a free port).
pub(crate) fn services() {
    let tools = ensure_build_tools();
    let tansu = ensure_tansu();
    println!(
        "{:<10} {:<16} {}",
        "kafka",
        "per test run",
        match (&tansu, tools) {
            (Ok(_), true) => "ready (tansu, librdkafka build tools)".to_owned(),
            (Err(e), _) => format!("DOWN: {e}"),
            (Ok(_), false) => "DOWN: librdkafka build tools missing".to_owned(),
        }
    );
}
