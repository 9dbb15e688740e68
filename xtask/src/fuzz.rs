//! `cargo xtask fuzz [seconds] [target…]`: every fuzz target of `fuzz/` (or the ones named) for
//! `seconds` each (default 30, what CI runs), with cargo-fuzz (libFuzzer) on the nightly
//! toolchain.
//!
//! cargo-fuzz is installed once into the tools cache (`~/.cache/tg-pubsub/tools`); each target's corpus is `fuzz/corpus/<target>`
//! (committed, so every run starts from what earlier runs found) and a crash leaves its input in
//! `fuzz/artifacts/<target>`, which fails the command.

use std::path::PathBuf;
use std::process::Command;

/// cargo-fuzz, installed once into the cache outside the checkout ([`crate::cache_dir`]), so
/// that fresh clones (CI) do not build it again.
fn tools() -> PathBuf {
    crate::cache_dir().join("tools")
}

fn cargo_fuzz() -> PathBuf {
    tools().join("bin/cargo-fuzz")
}

/// Installs cargo-fuzz under `target/tools` unless it is there.
fn ensure_cargo_fuzz() -> Result<(), String> {
    if cargo_fuzz().is_file() {
        return Ok(());
    }
    println!(
        "xtask: installing cargo-fuzz into {} (once)",
        tools().display()
    );
    crate::run(
        env!("CARGO"),
        &[
            "install",
            "--locked",
            "--root",
            tools().to_str().ok_or("target path is not UTF-8")?,
            "cargo-fuzz",
        ],
    )
}

/// The targets: the `[[bin]]` names of `fuzz/Cargo.toml`.
fn targets() -> Result<Vec<String>, String> {
    let manifest = std::fs::read_to_string(crate::root().join("fuzz/Cargo.toml"))
        .map_err(|e| format!("fuzz/Cargo.toml: {e}"))?;
    Ok(manifest
        .split("[[bin]]")
        .skip(1)
        .filter_map(|section| {
            let line = section
                .lines()
                .find(|l| l.trim_start().starts_with("name"))?;
            Some(line.split('"').nth(1)?.to_owned())
        })
        .collect())
}

/// `[seconds] [target…]`: the seconds (default 30) and the targets to run (none named: all).
pub(crate) fn run_args(args: &[&str]) -> Result<(), String> {
    let (seconds, only) = match args.split_first() {
        Some((first, rest)) if first.bytes().all(|b| b.is_ascii_digit()) => (
            first
                .parse()
                .map_err(|_| format!("fuzz: {first:?} is not a number of seconds"))?,
            rest,
        ),
        _ => (30, args),
    };
    run(seconds, only)
}

/// Runs the targets named in `only` (all of them when it is empty) for `seconds` each.
pub(crate) fn run(seconds: u64, only: &[&str]) -> Result<(), String> {
    let all = targets()?;
    if let Some(unknown) = only.iter().find(|t| !all.iter().any(|a| a == *t)) {
        return Err(format!(
            "fuzz: no target {unknown:?}; the targets are {}",
            all.join(", ")
        ));
    }
    ensure_cargo_fuzz()?;
    // The relay target builds the pulsar crate, whose build script runs protoc.
    crate::pulsar::ensure_protoc();
    let fuzz_dir = crate::root().join("fuzz");
    let mut report = Vec::new();
    for target in all {
        if !only.is_empty() && !only.contains(&target.as_str()) {
            continue;
        }
        let corpus = fuzz_dir.join("corpus").join(&target);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        println!("xtask: fuzzing {target} for {seconds} s");
        // libFuzzer's instrumentation needs the nightly toolchain (installed beside stable);
        // cargo-fuzz runs the `cargo` rustup puts on PATH, which reads RUSTUP_TOOLCHAIN.
        let output = Command::new(cargo_fuzz())
            .env("RUSTUP_TOOLCHAIN", "nightly")
            .args(["run", &target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .current_dir(&fuzz_dir)
            .output()
            .map_err(|e| format!("cannot run cargo-fuzz: {e}"))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let runs = stderr
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map_or("?".to_owned(), |n| n.trim().to_owned());
        if !output.status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "fuzz target {target} failed after {runs} runs (input in fuzz/artifacts/{target}):\n{}",
                tail.join("\n")
            ));
        }
        // Keep the committed corpus to the inputs that add coverage.
        let minimized = Command::new(cargo_fuzz())
            .env("RUSTUP_TOOLCHAIN", "nightly")
            .args(["cmin", &target])
            .arg(&corpus)
            .current_dir(&fuzz_dir)
            .output()
            .map_err(|e| format!("cannot run cargo-fuzz cmin: {e}"))?;
        if !minimized.status.success() {
            println!("xtask: could not minimise the {target} corpus; it is left as it is");
        }
        let kept = std::fs::read_dir(&corpus).map_or(0, |d| d.count());
        report.push(format!(
            "{target:<20} {seconds:>6} s {runs:>12} runs  0 crashes  corpus {kept}"
        ));
    }
    println!("\nfuzz targets:");
    for line in report {
        println!("  {line}");
    }
    Ok(())
}
