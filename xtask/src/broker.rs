//! A test broker process xtask runs for one test or bench run (pulsar-lite, tansu): on a free
//! port, in a run directory of its own under `target/` (its data and log), stopped and its
//! directory removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{reachable, root};

/// A running broker process.
pub(crate) struct BrokerProcess {
    child: Child,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
}

/// A free port on 127.0.0.1.
pub(crate) fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

impl BrokerProcess {
    /// Starts `binary` with the arguments `args` builds from the run directory (the process's
    /// working directory), logging to `<name>.log` there, and waits up to `timeout` until it
    /// listens on `port`. Run directories of xtask runs that are gone (killed before they could
    /// clean up) are removed first.
    pub(crate) fn start(
        name: &str,
        binary: &Path,
        port: u16,
        args: impl FnOnce(&Path) -> Vec<String>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let runs = root().join("target").join(format!("{name}-runs"));
        for entry in std::fs::read_dir(&runs).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let pid = file
                .strip_prefix("run-")
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = runs.join(format!("run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = Command::new(binary)
            .args(args(&dir))
            .current_dir(&dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut own = Self {
            child,
            port,
            dir,
            log,
        };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if reachable(port) {
                return Ok(own);
            }
            if let Ok(Some(status)) = own.child.try_wait() {
                return Err(format!(
                    "{name} exited at start ({status}); see {}",
                    own.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "{name} did not listen on 127.0.0.1:{port} within {timeout:?}; see {}",
            own.log.display()
        ))
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// With `XTASK_<BROKER>_SERVE_SECS=N` (`variable`) set: prints `env` as shell exports and keeps
/// the broker up for N seconds before the tests run, for running single tests by hand meanwhile.
pub(crate) fn serve_for_a_while(variable: &str, env: &[(&'static str, String)]) {
    if let Some(secs) = std::env::var(variable)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        for (k, v) in env {
            println!("export {k}={v}");
        }
        std::thread::sleep(Duration::from_secs(secs));
    }
}
