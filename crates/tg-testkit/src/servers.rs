//! Servers a test owns: a Redis, Mosquitto, PostgreSQL, pulsar-lite or tansu started from the
//! machine's own binaries (or, for a current Mosquitto, `MOSQUITTO_BIN`) on a free
//! 127.0.0.1 port with its data in a fresh directory, which the test can stop and start again (a
//! broker restart) without touching the shared local servers other tests use.
//!
//! Every constructor returns `None` after [`skip`] when the server's binary
//! is not installed (under `CI=true` that is a failure).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{free_port, skip};

/// How long [`OwnServer::start`] waits for the port to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`OwnServer::stop`] waits after the signal before killing.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// The file in a server's directory its standard output and error go to.
const OUTPUT: &str = "output.log";

/// A server process of the test's own; stopped and its directory removed on drop.
#[derive(Debug)]
pub struct OwnServer {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    /// The signal that shuts it down cleanly (`TERM`, or `INT` for PostgreSQL's fast shutdown).
    stop_signal: &'static str,
    /// Run as this user (uid, gid): PostgreSQL refuses to run as root.
    user: Option<(u32, u32)>,
    /// A command that succeeds once the server accepts work (PostgreSQL listens before it does).
    ready: Option<(PathBuf, Vec<String>)>,
    /// Environment of the process.
    env: Vec<(&'static str, &'static str)>,
    dir: PathBuf,
    port: u16,
    url: String,
    child: Option<Child>,
}

/// Whether `program` can be started at all.
fn installed(program: &Path) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The version (major, minor, patch) `program -h` prints; `None` when it cannot be run or says no
/// version.
fn mosquitto_version(program: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(program).arg("-h").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split("mosquitto version ")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

/// A fresh directory under the system's temp dir.
fn fresh_dir(name: &str, port: u16) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tg-own-{name}-{}-{}-{port}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the server's directory");
    dir
}

/// The uid and gid of `user`, from `id`.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").arg(flag).arg(user).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl OwnServer {
    /// A Mosquitto with persistence (so sessions survive a restart), `set_tcp_nodelay`,
    /// anonymous access unless `extra` says otherwise, and `extra` configuration lines (`{dir}` in
    /// them is the server's directory). Not started yet: call [`start`](Self::start).
    pub fn mosquitto(extra: &str) -> Option<Self> {
        Self::mosquitto_of(PathBuf::from("mosquitto"), extra)
    }

    /// As [`mosquitto`](Self::mosquitto), from a current Mosquitto (2.0.13 or later): the one
    /// `MOSQUITTO_BIN` names (`cargo xtask test` unpacks 2.0.21 for it), else the machine's.
    /// Debian bookworm's 2.0.11 differs from current releases where the backend can tell:
    /// - it does not keep to a consumer's Receive Maximum: on each PUBACK it moves up to Receive
    ///   Maximum queued messages into flight, counting only the in-flight messages ahead of the
    ///   acknowledged one (Mosquitto issue 2306), so a consumer acknowledging in order is sent a
    ///   backlog as fast as its socket takes it;
    /// - it sends the topic's retained message when a shared subscription is made, which MQTT 5
    ///   forbids and 2.0.13 stopped.
    ///
    /// `None` after [`skip`] on an older release.
    pub fn current_mosquitto(extra: &str) -> Option<Self> {
        let program = std::env::var_os("MOSQUITTO_BIN")
            .filter(|p| !p.is_empty())
            .map_or_else(|| PathBuf::from("mosquitto"), PathBuf::from);
        match mosquitto_version(&program) {
            Some(v) if v >= (2, 0, 13) => Self::mosquitto_of(program, extra),
            other => {
                let version = other.map_or_else(
                    || "of no known version".to_owned(),
                    |(a, b, c)| format!("{a}.{b}.{c}"),
                );
                skip(&format!(
                    "{} is Mosquitto {version}, and this test needs 2.0.13 or later (before, \
                     Mosquitto sends a consumer far more than its Receive Maximum, issue 2306, \
                     and retained messages on shared subscriptions); set MOSQUITTO_BIN to one \
                     (cargo xtask test mqtt does)",
                    program.display()
                ));
                None
            }
        }
    }

    fn mosquitto_of(program: PathBuf, extra: &str) -> Option<Self> {
        if Command::new(&program)
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            skip("the mosquitto binary is not installed");
            return None;
        }
        let port = free_port();
        let dir = fresh_dir("mosquitto", port);
        // Started as root, mosquitto drops to its own user: let it write its persistence file.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        }
        let conf = dir.join("mosquitto.conf");
        let anonymous = if extra.contains("allow_anonymous") {
            ""
        } else {
            "allow_anonymous true\n"
        };
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\npersistence true\npersistence_location {d}/\n\
                 log_dest none\nset_tcp_nodelay true\nmax_queued_messages 1000000\n\
                 {anonymous}{extra}\n",
                d = dir.display(),
                extra = extra.replace("{dir}", &dir.display().to_string()),
            ),
        )
        .expect("write mosquitto.conf");
        Some(Self {
            name: "mosquitto",
            program,
            args: vec!["-c".into(), conf.display().to_string()],
            stop_signal: "TERM",
            user: None,
            ready: None,
            env: Vec::new(),
            url: format!("mqtt://127.0.0.1:{port}"),
            dir,
            port,
            child: None,
        })
    }

    /// A Redis that keeps its data in an append-only file fsynced on every write, so a restart
    /// loses nothing it acknowledged. Not started yet.
    pub fn redis() -> Option<Self> {
        let program = PathBuf::from("redis-server");
        if !installed(&program) {
            skip("the redis-server binary is not installed");
            return None;
        }
        let port = free_port();
        let dir = fresh_dir("redis", port);
        let args = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.display().to_string(),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            &dir.join("redis.log").display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        Some(Self {
            name: "redis",
            program,
            args,
            stop_signal: "TERM",
            user: None,
            ready: None,
            env: Vec::new(),
            url: format!("redis://127.0.0.1:{port}"),
            dir,
            port,
            child: None,
        })
    }

    /// A PostgreSQL cluster of its own (`initdb` into a fresh directory, trust authentication,
    /// database `postgres`), run as the `postgres` user when the test runs as root. Not started
    /// yet.
    pub fn postgres() -> Option<Self> {
        let Some(bin) = postgres_bindir() else {
            skip("no PostgreSQL server binaries (initdb, postgres) found");
            return None;
        };
        let user = if running_as_root() {
            match user_ids("postgres") {
                Some(ids) => Some(ids),
                None => {
                    skip("running as root and there is no `postgres` user to run PostgreSQL as");
                    return None;
                }
            }
        } else {
            None
        };
        let port = free_port();
        let dir = fresh_dir("postgres", port);
        let data = dir.join("data");
        if let Some((uid, gid)) = user {
            let _ = Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(&dir)
                .status();
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = user {
            use std::os::unix::process::CommandExt;
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let args = [
            "-D",
            &data.display().to_string(),
            "-p",
            &port.to_string(),
            "-k",
            &dir.display().to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=100",
        ]
        .map(str::to_owned)
        .to_vec();
        Some(Self {
            name: "postgres",
            program: bin.join("postgres"),
            args,
            stop_signal: "INT",
            user,
            ready: Some((
                bin.join("pg_isready"),
                [
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ]
                .map(str::to_owned)
                .to_vec(),
            )),
            env: Vec::new(),
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            port,
            child: None,
        })
    }

    /// A pulsar-lite (a Pulsar-protocol broker, see docs/pulsar.md) from `binary`, with its
    /// database in the server's directory and its metrics server off. Not started yet. Its URL is
    /// the broker's own; the `pulsar` crate needs the checksum relay in front of it.
    pub fn pulsar_lite(binary: &Path) -> Option<Self> {
        if !binary.is_file() {
            skip(&format!(
                "the pulsar-lite binary {} is missing (`cargo xtask test pulsar` installs it)",
                binary.display()
            ));
            return None;
        }
        let port = free_port();
        let dir = fresh_dir("pulsar-lite", port);
        let conf = dir.join("pulsar-lite.toml");
        std::fs::write(&conf, "[metrics]\nenabled = false\n").expect("write pulsar-lite.toml");
        let args = [
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--db-path",
            &dir.join("db").display().to_string(),
            "--config",
            &conf.display().to_string(),
            "--log-level",
            "error",
        ]
        .map(str::to_owned)
        .to_vec();
        Some(Self {
            name: "pulsar-lite",
            program: binary.to_owned(),
            args,
            stop_signal: "TERM",
            user: None,
            ready: None,
            env: Vec::new(),
            url: format!("pulsar://127.0.0.1:{port}"),
            dir,
            port,
            child: None,
        })
    }

    /// A tansu (the Apache-Kafka-compatible broker the Kafka tests run, `docs/kafka.md`) from
    /// `binary` with its SQLite storage in the server's directory. `None` after [`skip`] when
    /// `binary` is missing.
    pub fn tansu(binary: &Path) -> Option<Self> {
        Self::tansu_advertising(binary, None)
    }

    /// [`tansu`](Self::tansu) advertising `127.0.0.1:<advertised>` as its address instead of its
    /// own: Kafka clients connect to the brokers the metadata names, so clients meant to go
    /// through a proxy (the silent-network test's) must be told the proxy's address. `None`
    /// advertises its own.
    pub fn tansu_advertising(binary: &Path, advertised: Option<u16>) -> Option<Self> {
        if !binary.is_file() {
            skip(&format!(
                "the tansu binary {} is missing (`cargo xtask test kafka` installs it)",
                binary.display()
            ));
            return None;
        }
        let port = free_port();
        let dir = fresh_dir("tansu", port);
        let listener = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{}", advertised.unwrap_or(port));
        // tansu doubles an absolute path after `sqlite://`: the file is named relative to the
        // working directory, which `start` sets to `dir`
        let args = [
            "broker",
            "--listener-url",
            &listener,
            "--advertised-listener-url",
            &advertised,
            "--storage-engine",
            "sqlite://tansu.db",
        ]
        .map(str::to_owned)
        .to_vec();
        Some(Self {
            name: "tansu",
            program: binary.to_owned(),
            args,
            stop_signal: "TERM",
            user: None,
            ready: None,
            // warnings and errors only in its output, as xtask runs it
            env: vec![("RUST_LOG", "warn")],
            url: format!("kafka://127.0.0.1:{port}"),
            dir,
            port,
            child: None,
        })
    }

    /// The URL clients connect with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its own directory (configuration and data).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the server wrote to its standard output and error since it was first started, its
    /// first and last 8 KiB when longer: a test that fails because the server misbehaved shows
    /// it (the first error is often the cause of the others).
    pub fn output(&self) -> String {
        const PART: usize = 8 * 1024;
        let text = std::fs::read(self.dir.join(OUTPUT)).unwrap_or_default();
        if text.len() <= 2 * PART {
            return String::from_utf8_lossy(&text).into_owned();
        }
        format!(
            "{}\n[… {} bytes …]\n{}",
            String::from_utf8_lossy(&text[..PART]),
            text.len() - 2 * PART,
            String::from_utf8_lossy(&text[text.len() - PART..])
        )
    }

    /// Whether the process is running (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server and waits until its port accepts connections.
    ///
    /// # Panics
    ///
    /// When it cannot be spawned or does not listen within 30 s.
    pub fn start(&mut self) {
        if self.child.is_some() {
            return;
        }
        let mut cmd = Command::new(&self.program);
        // its output goes to a file in its directory, for `output` (a test's diagnosis)
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(OUTPUT))
            .expect("create the server's output file");
        let errors = output.try_clone().expect("clone the output file");
        cmd.args(&self.args)
            .envs(self.env.iter().copied())
            .current_dir(&self.dir)
            .stdout(output)
            .stderr(errors);
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!("own {} exited at start-up ({status})", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "own {} did not listen on port {} within {START_TIMEOUT:?}",
                self.name,
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some((program, args)) = &self.ready {
            while !Command::new(program)
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
            {
                assert!(
                    Instant::now() < deadline,
                    "own {} did not get ready within {START_TIMEOUT:?}",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Shuts the server down cleanly (its stop signal) and waits for it to exit; killed if it
    /// takes longer than 20 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg(format!("-{}", self.stop_signal))
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it, waits `down`, and starts it again with the same data.
    pub fn restart(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.start();
    }

    /// [`restart`](Self::restart) from async code: on a blocking thread, so that the runtime
    /// (the clients under test) keeps running meanwhile.
    pub async fn restarted(mut self, down: Duration) -> Self {
        tokio::task::spawn_blocking(move || {
            self.restart(down);
            self
        })
        .await
        .expect("the restart thread panicked")
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where `initdb` and `postgres` are: `PG_BINDIR`, else the newest `/usr/lib/postgresql/*/bin`,
/// else `pg_config --bindir`.
fn postgres_bindir() -> Option<PathBuf> {
    let ok = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        return ok(&d).then_some(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| ok(d))
        .collect();
    versions.sort();
    if let Some((_, d)) = versions.pop() {
        return Some(d);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    ok(&d).then_some(d)
}
