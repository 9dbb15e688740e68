//! The MQTT backend's current test broker: Mosquitto 2.0.21, Debian's own build from
//! bookworm-backports, unpacked once into the cache outside the checkout. The conformance suite
//! and the benches run on it (it is what the `eclipse-mosquitto:2` image in docker-compose.yml
//! gives users), and so do the tests that need a current release; the other tests that start a
//! broker of their own run on the machine's, Debian bookworm's 2.0.11, so both are covered.
//!
//! The two differ where the backend can tell (see `docs/mqtt.md`): 2.0.11 lets a consumer's
//! in-flight messages grow far past its Receive Maximum (on each PUBACK its
//! `db__message_delete_outgoing` moves up to Receive Maximum queued messages into flight, counting
//! only the in-flight messages ahead of the acknowledged one; Mosquitto issue 2306, fixed in
//! 2.0.13), and it sends retained messages when a shared subscription is made, which MQTT 5
//! forbids and 2.0.13 stopped.
//!
//! The packages come from Debian's archive by their pinned SHA-256 (the same archive apt uses;
//! adding backports to the machine's apt sources would change what every other package resolves
//! to), and are unpacked with `dpkg-deb`, not installed: the machine's own Mosquitto and its
//! service stay as they are. The broker needs one library the machine lacks, libwebsockets 17
//! (bookworm's), found through `LD_LIBRARY_PATH` set by a wrapper script.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The release: what the wrapper's marker records.
const VERSION: &str = "2.0.21-1~bpo12+1";

/// Each package: its path in Debian's archive and its SHA-256 (from the archive's signed
/// `Packages` index for bookworm-backports and bookworm).
const PACKAGES: [(&str, &str); 2] = [
    (
        "pool/main/m/mosquitto/mosquitto_2.0.21-1~bpo12+1_amd64.deb",
        "d547a8c0c347748ac6819ad358165fa429cae9ca1dbfaf70f96433ba8817a38a",
    ),
    (
        "pool/main/libw/libwebsockets/libwebsockets17_4.1.6-3_amd64.deb",
        "05aee1f168ab131b37f03a4e1060fb4d17263dad6e74ab2e9ecb052d35881916",
    ),
];

const ARCHIVE: &str = "http://deb.debian.org/debian";

fn install_root() -> PathBuf {
    crate::cache_dir().join(format!("mosquitto-{}", VERSION.replace('~', "_")))
}

/// The wrapper that starts the unpacked broker with its library path.
fn wrapper() -> PathBuf {
    install_root().join("bin").join("mosquitto")
}

/// Unpacks Mosquitto 2.0.21 unless a previous run did. Returns the program to start (takes the
/// same arguments as `mosquitto`), or why it could not.
pub(crate) fn ensure_mosquitto() -> Result<PathBuf, String> {
    let root = install_root();
    let marker = root.join(".tg-pubsub-installed");
    if wrapper().is_file() && std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == VERSION) {
        return Ok(wrapper());
    }
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err("the test Mosquitto is Debian's amd64 build".into());
    }
    println!(
        "xtask: unpacking Mosquitto {VERSION} from Debian's archive into {} (once)",
        root.display()
    );
    let _ = std::fs::remove_dir_all(&root);
    let files = root.join("files");
    std::fs::create_dir_all(&files)
        .map_err(|e| format!("cannot create {}: {e}", files.display()))?;
    for (path, sha256) in PACKAGES {
        let deb = root.join(path.rsplit('/').next().unwrap_or(path));
        download(&format!("{ARCHIVE}/{path}"), &deb)?;
        let digest = sha256_of(&deb)?;
        if digest != sha256 {
            return Err(format!(
                "{} has SHA-256 {digest}, not the pinned {sha256}",
                deb.display()
            ));
        }
        crate::run("dpkg-deb", &["-x", utf8(&deb)?, utf8(&files)?])?;
        let _ = std::fs::remove_file(&deb);
    }
    let program = files.join("usr/sbin/mosquitto");
    let libs = files.join("usr/lib/x86_64-linux-gnu");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
    // `exec`: the broker keeps the wrapper's process id, so the tests' signals (stop, pause)
    // reach it.
    let script = format!(
        "#!/bin/sh\nLD_LIBRARY_PATH='{}' exec '{}' \"$@\"\n",
        libs.display(),
        program.display()
    );
    std::fs::write(wrapper(), script).map_err(|e| format!("cannot write the wrapper: {e}"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(wrapper(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot make the wrapper executable: {e}"))?;
    }
    let out = Command::new(wrapper())
        .arg("-h")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", wrapper().display()))?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !said.contains("mosquitto version 2.0.21") {
        return Err(format!(
            "the unpacked Mosquitto does not run: {}{}",
            said.lines().next().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let _ = std::fs::write(&marker, VERSION);
    Ok(wrapper())
}

fn download(url: &str, to: &Path) -> Result<(), String> {
    crate::run(
        "curl",
        &[
            "--fail",
            "--silent",
            "--show-error",
            "--location",
            "--max-time",
            "120",
            "-o",
            utf8(to)?,
            url,
        ],
    )
}

/// `path` as the text `crate::run` passes on.
fn utf8(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

fn sha256_of(file: &Path) -> Result<String, String> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .map_err(|e| format!("cannot run sha256sum: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| format!("sha256sum said nothing of {}", file.display()))
}
