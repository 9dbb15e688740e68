//! Getting ready to publish: `cargo xtask publish-check` packages and verifies every publishable
//! crate in the order they would be uploaded (nothing is uploaded), and `cargo xtask examples`
//! builds and runs the facade's examples as a reader of its README would.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{backend_crates, ensure_server, root};

/// The category slugs crates.io accepts (its `src/boot/categories.toml`); anything else is
/// dropped with a warning at upload, so the check refuses it first.
const CATEGORIES: &[&str] = &[
    "algorithms",
    "api-bindings",
    "asynchronous",
    "authentication",
    "caching",
    "command-line-interface",
    "command-line-utilities",
    "compression",
    "computer-vision",
    "concurrency",
    "config",
    "cryptography",
    "cryptography::cryptocurrencies",
    "data-structures",
    "database",
    "database-implementations",
    "date-and-time",
    "development-tools",
    "development-tools::build-utils",
    "development-tools::cargo-plugins",
    "development-tools::debugging",
    "development-tools::ffi",
    "development-tools::procedural-macro-helpers",
    "development-tools::profiling",
    "development-tools::testing",
    "email",
    "embedded",
    "emulators",
    "encoding",
    "external-ffi-bindings",
    "filesystem",
    "game-development",
    "game-engines",
    "games",
    "graphics",
    "gui",
    "hardware-support",
    "internationalization",
    "localization",
    "mathematics",
    "memory-management",
    "multimedia",
    "multimedia::audio",
    "multimedia::encoding",
    "multimedia::images",
    "multimedia::video",
    "network-programming",
    "no-std",
    "os",
    "os::linux-apis",
    "os::macos-apis",
    "os::unix-apis",
    "os::windows-apis",
    "parser-implementations",
    "parsing",
    "rendering",
    "rendering::data-formats",
    "rendering::engine",
    "rendering::graphics-api",
    "rust-patterns",
    "science",
    "science::robotics",
    "simulation",
    "template-engine",
    "text-editors",
    "text-processing",
    "value-formatting",
    "visualization",
    "wasm",
    "web-programming",
    "web-programming::http-client",
    "web-programming::http-server",
    "web-programming::websocket",
];

/// The crate whose examples `examples` runs.
const FACADE: &str = "tg-pubsub";
/// The example that `examples` also runs against every local broker.
const SWITCH_EXAMPLE: &str = "switch_backend";
/// The brokers that example runs against: the ones with a local server on every machine of the
/// project (the facade feature of each is named like the backend).
const SWITCH_BACKENDS: &[&str] = &["redis", "postgres", "mqtt", "rabbitmq"];
/// How long one example may run: each ends on its own within seconds.
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `publish-check` or `examples`.
pub(crate) fn run(command: &str) -> Result<(), String> {
    match command {
        "publish-check" => publish_check(),
        "examples" => examples(),
        other => Err(format!("publish: unknown command {other:?}")),
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A workspace member as `cargo metadata` describes it.
#[derive(Debug, Clone)]
struct Member {
    name: String,
    publish: bool,
    manifest_dir: PathBuf,
    json: serde_json::Value,
}

/// A dependency of one workspace member on another.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InternalDep {
    name: String,
    /// `normal`, `build` or `dev`.
    kind: String,
    /// Whether it carries a version requirement (a path-only dev-dependency is dropped on publish).
    versioned: bool,
}

fn metadata() -> Result<serde_json::Value, String> {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err("cargo metadata failed".to_owned());
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cargo metadata printed no JSON: {e}"))
}

fn members(metadata: &serde_json::Value) -> Result<Vec<Member>, String> {
    let packages = metadata["packages"]
        .as_array()
        .ok_or("cargo metadata has no packages")?;
    packages
        .iter()
        .map(|p| {
            let name = p["name"]
                .as_str()
                .ok_or("a package without a name")?
                .to_owned();
            // `publish` is null (anywhere) or the list of registries allowed; `[]` is `false`.
            let publish = match &p["publish"] {
                serde_json::Value::Null => true,
                serde_json::Value::Array(list) => !list.is_empty(),
                _ => true,
            };
            let manifest_dir = p["manifest_path"]
                .as_str()
                .map(|m| {
                    Path::new(m)
                        .parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_default()
                })
                .ok_or_else(|| format!("{name}: no manifest_path"))?;
            Ok(Member {
                name,
                publish,
                manifest_dir,
                json: p.clone(),
            })
        })
        .collect()
}

/// The dependencies of `member` on other workspace members.
fn internal_deps(member: &Member, names: &BTreeSet<&str>) -> Vec<InternalDep> {
    let mut deps: Vec<InternalDep> = member.json["dependencies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["path"].is_string())
        .filter_map(|d| {
            let name = d["name"].as_str()?;
            names.contains(name).then(|| InternalDep {
                name: name.to_owned(),
                kind: d["kind"].as_str().unwrap_or("normal").to_owned(),
                versioned: d["req"].as_str().is_some_and(|r| r != "*"),
            })
        })
        .collect();
    deps.sort_by(|a, b| (&a.name, &a.kind).cmp(&(&b.name, &b.kind)));
    deps.dedup();
    deps
}

/// What crates.io and a reader of the registry page need from one manifest.
fn metadata_problems(member: &Member) -> Vec<String> {
    let p = &member.json;
    let text = |key: &str| p[key].as_str().filter(|s| !s.trim().is_empty());
    let mut problems = Vec::new();
    for key in ["description", "documentation", "rust_version"] {
        if text(key).is_none() {
            problems.push(format!("no `{}`", key.replace('_', "-")));
        }
    }
    if text("license").is_none() && text("license_file").is_none() {
        problems.push("no `license`".to_owned());
    }
    if let Some(repository) = text("repository") {
        if repository.contains(".invalid") || repository.contains("example.") {
            problems.push(format!("`repository` is a placeholder: {repository}"));
        }
    }
    match text("readme") {
        None => problems.push("no `readme`".to_owned()),
        Some(readme) if !member.manifest_dir.join(readme).is_file() => {
            problems.push(format!("`readme` {readme} does not exist"));
        }
        Some(_) => {}
    }
    let keywords: Vec<&str> = p["keywords"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str())
        .collect();
    if keywords.is_empty() || keywords.len() > 5 {
        problems.push(format!(
            "{} keywords (crates.io takes 1 to 5)",
            keywords.len()
        ));
    }
    for k in &keywords {
        let valid = k.len() <= 20
            && k.starts_with(|c: char| c.is_ascii_alphabetic())
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            problems.push(format!("keyword {k:?} is not one crates.io takes"));
        }
    }
    let categories: Vec<&str> = p["categories"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str())
        .collect();
    if categories.is_empty() || categories.len() > 5 {
        problems.push(format!(
            "{} categories (crates.io takes 1 to 5)",
            categories.len()
        ));
    }
    for c in &categories {
        if !CATEGORIES.contains(c) {
            problems.push(format!("category {c:?} is not a crates.io slug"));
        }
    }
    problems
}

/// The publishable crates in an order in which each one's dependencies (and versioned
/// dev-dependencies: crates.io wants those to exist too) come before it, or why there is none.
fn publish_order(members: &[Member]) -> Result<Vec<(String, Vec<String>)>, String> {
    let names: BTreeSet<&str> = members.iter().map(|m| m.name.as_str()).collect();
    let publishable: BTreeSet<&str> = members
        .iter()
        .filter(|m| m.publish)
        .map(|m| m.name.as_str())
        .collect();
    let mut problems = Vec::new();
    // crate → the crates that must be on the registry first
    let mut before: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for member in members.iter().filter(|m| m.publish) {
        let entry = before.entry(member.name.as_str()).or_default();
        for dep in internal_deps(member, &names) {
            let needed = dep.kind != "dev" || dep.versioned;
            if dep.kind != "dev" && !dep.versioned {
                problems.push(format!(
                    "{}: {} dependency {} has no version (cargo refuses to publish a path-only dependency)",
                    member.name, dep.kind, dep.name
                ));
            }
            if !needed {
                continue;
            }
            if !publishable.contains(dep.name.as_str()) {
                problems.push(format!(
                    "{}: {} dependency {} is `publish = false`{}",
                    member.name,
                    dep.kind,
                    dep.name,
                    if dep.kind == "dev" {
                        " (make it path-only: cargo drops a dev-dependency without a version)"
                    } else {
                        ""
                    }
                ));
                continue;
            }
            entry.insert(dep.name.clone());
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    let mut order = Vec::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    while done.len() < before.len() {
        let ready: Vec<&str> = before
            .iter()
            .filter(|(name, deps)| !done.contains(**name) && deps.iter().all(|d| done.contains(d)))
            .map(|(name, _)| *name)
            .collect();
        if ready.is_empty() {
            let stuck: Vec<String> = before
                .iter()
                .filter(|(name, _)| !done.contains(**name))
                .map(|(name, deps)| {
                    let waiting: Vec<&str> = deps
                        .iter()
                        .filter(|d| !done.contains(*d))
                        .map(String::as_str)
                        .collect();
                    format!("  {name} needs {}", waiting.join(", "))
                })
                .collect();
            return Err(format!(
                "no publishing order exists: these crates wait on each other (a versioned \
                 dev-dependency closes the cycle; make it path-only):\n{}",
                stuck.join("\n")
            ));
        }
        for name in ready {
            done.insert(name.to_owned());
            order.push((name.to_owned(), before[name].iter().cloned().collect()));
        }
    }
    Ok(order)
}

/// Runs cargo, echoing stdout and stderr as they come, and returns its success and the stderr
/// lines.
fn cargo_echo(args: &[&str], env: &[(&str, String)]) -> Result<(bool, Vec<String>), String> {
    println!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(env!("CARGO"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(root())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let mut lines = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            lines.push(line);
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("cargo did not finish: {e}"))?;
    Ok((status.success(), lines))
}

fn publish_check() -> Result<(), String> {
    let started = Instant::now();
    let members = members(&metadata()?)?;
    let mut problems = Vec::new();
    for member in members.iter().filter(|m| m.publish) {
        for problem in metadata_problems(member) {
            problems.push(format!("{}: {problem}", member.name));
        }
    }
    let kept: Vec<&str> = members
        .iter()
        .filter(|m| !m.publish)
        .map(|m| m.name.as_str())
        .collect();
    let order = publish_order(&members)?;
    println!(
        "xtask: {} crates to publish, in this order ({} kept back: {}):",
        order.len(),
        kept.len(),
        kept.join(", ")
    );
    for (i, (name, deps)) in order.iter().enumerate() {
        let after = if deps.is_empty() {
            String::new()
        } else {
            format!("  (after {})", deps.join(", "))
        };
        println!("  {:>2}. {name}{after}", i + 1);
    }
    if !problems.is_empty() {
        return Err(format!(
            "the manifests are not ready:\n  {}",
            problems.join("\n  ")
        ));
    }

    // Package every crate and build each from its .crate file as a user would get it, with the
    // crates it depends on from the same run (cargo puts them in a temporary local registry).
    // The verification builds share one target directory of their own, so the third-party
    // crates compile once per feature set instead of once per crate.
    let target = root().join("target").join("publish-check");
    let mut args = vec!["package", "--allow-dirty"];
    for (name, _) in &order {
        args.extend(["-p", name.as_str()]);
    }
    let env = [("CARGO_TARGET_DIR", target.display().to_string())];
    let (ok, lines) = cargo_echo(&args, &env)?;
    let missing: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("manifest has no"))
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    if !ok {
        return Err(format!("cargo package failed after {elapsed:.0} s"));
    }
    if !missing.is_empty() {
        return Err(format!(
            "cargo package warned about missing metadata:\n  {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }
    println!(
        "xtask: publish-check passed: {} crates packaged and verified in publishing order in {elapsed:.0} s ({})",
        order.len(),
        target.join("package").display()
    );
    Ok(())
}

/// An example target of the facade and the features it needs.
#[derive(Debug)]
struct Example {
    name: String,
    required_features: Vec<String>,
}

fn facade_examples(members: &[Member]) -> Result<Vec<Example>, String> {
    let facade = members
        .iter()
        .find(|m| m.name == FACADE)
        .ok_or_else(|| format!("no {FACADE} in the workspace"))?;
    let mut examples: Vec<Example> = facade.json["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "example"))
        })
        .filter_map(|t| {
            Some(Example {
                name: t["name"].as_str()?.to_owned(),
                required_features: t["required-features"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect(),
            })
        })
        .collect();
    examples.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(examples)
}

/// Builds the facade's examples with `features` and returns the executables by example name.
fn build_examples(
    only: Option<&str>,
    features: &[&str],
) -> Result<BTreeMap<String, PathBuf>, String> {
    let mut args = vec![
        "build",
        "-p",
        FACADE,
        "--message-format=json-render-diagnostics",
    ];
    match only {
        Some(name) => args.extend(["--example", name]),
        None => args.push("--examples"),
    }
    let joined = features.join(",");
    if !features.is_empty() {
        args.extend(["--features", joined.as_str()]);
    }
    println!("xtask: cargo {}", args.join(" "));
    let output = Command::new(env!("CARGO"))
        .args(&args)
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !output.status.success() {
        return Err(format!("building the examples of {FACADE} failed"));
    }
    let mut built = BTreeMap::new();
    for line in output.stdout.split(|b| *b == b'\n') {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let is_example = message["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "example"));
        if message["reason"] == "compiler-artifact" && is_example {
            if let (Some(name), Some(exe)) = (
                message["target"]["name"].as_str(),
                message["executable"].as_str(),
            ) {
                built.insert(name.to_owned(), PathBuf::from(exe));
            }
        }
    }
    Ok(built)
}

/// Runs one example to its end (at most [`EXAMPLE_TIMEOUT`]) with `env` set and the backend
/// choice of the caller's environment removed; it must exit 0.
fn run_example(label: &str, exe: &Path, env: &[(&str, &str)]) -> Result<(), String> {
    println!("xtask: example {label}");
    let mut command = Command::new(exe);
    command
        .env_remove("PUBSUB_BACKEND")
        .env_remove("PUBSUB_FALLBACK")
        .envs(env.iter().copied())
        .current_dir(root())
        .stdout(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut printed = 0usize;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            printed += n;
            print!("{}", String::from_utf8_lossy(&buf[..n]));
        }
        printed
    });
    let deadline = Instant::now() + EXAMPLE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "example {label} still ran after {} s; stopped it",
                    EXAMPLE_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("example {label}: {e}")),
        }
    };
    let printed = reader.join().unwrap_or(0);
    if !status.success() {
        return Err(format!("example {label} failed ({status})"));
    }
    if printed == 0 {
        // framework_service is shown verbatim in the repository's README and stays silent.
        println!("xtask: (example {label} printed nothing)");
    }
    Ok(())
}

fn examples() -> Result<(), String> {
    let members = members(&metadata()?)?;
    let examples = facade_examples(&members)?;
    let (mut passed, mut failed, mut skipped) = (0u32, 0u32, 0u32);
    let mut failures = Vec::new();
    let mut record = |label: String, result: Result<(), String>| match result {
        Ok(()) => passed += 1,
        Err(e) => {
            println!("xtask: FAILED: {e}");
            failed += 1;
            failures.push(label);
        }
    };

    // Every example on the embedded default, as from a fresh checkout.
    let built = build_examples(None, &[])?;
    for example in &examples {
        if !example.required_features.is_empty() {
            println!(
                "xtask: example {} needs features {} (run below where they are compiled in)",
                example.name,
                example.required_features.join(",")
            );
            continue;
        }
        let result = match built.get(&example.name) {
            Some(exe) => run_example(&example.name, exe, &[]),
            None => Err(format!("example {} was not built", example.name)),
        };
        record(example.name.clone(), result);
    }

    // The backend-switching example on every local broker.
    let servers = backend_crates()?;
    let built = build_examples(Some(SWITCH_EXAMPLE), SWITCH_BACKENDS)?;
    let exe = built
        .get(SWITCH_EXAMPLE)
        .ok_or_else(|| format!("example {SWITCH_EXAMPLE} was not built"))?;
    for backend in SWITCH_BACKENDS {
        let label = format!("{SWITCH_EXAMPLE} on {backend}");
        let reachable = servers
            .iter()
            .find(|c| c.backend == *backend)
            .and_then(|c| c.server.as_ref())
            .map(|server| ensure_server(backend, server));
        match reachable {
            Some(true) => record(
                label.clone(),
                run_example(&label, exe, &[("PUBSUB_BACKEND", backend)]),
            ),
            Some(false) if !in_ci() => {
                println!("xtask: skipped {label}: no {backend} server on this machine");
                skipped += 1;
            }
            Some(false) => record(
                label.clone(),
                Err(format!("CI=true and no {backend} server for {label}")),
            ),
            None => record(
                label.clone(),
                Err(format!("no crate says which local server {backend} uses")),
            ),
        }
    }
    println!("examples: {passed} passed, {failed} failed, {skipped} skipped");
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("examples failed: {}", failures.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, publish: bool, deps: serde_json::Value) -> Member {
        Member {
            name: name.to_owned(),
            publish,
            manifest_dir: PathBuf::new(),
            json: serde_json::json!({ "name": name, "dependencies": deps }),
        }
    }

    fn dep(name: &str, kind: Option<&str>, req: &str) -> serde_json::Value {
        serde_json::json!({ "name": name, "kind": kind, "req": req, "path": format!("/x/{name}") })
    }

    #[test]
    fn dependencies_come_first_and_path_only_dev_dependencies_do_not_count() {
        let members = [
            member(
                "facade",
                true,
                serde_json::json!([dep("backend", None, "^0.1.0")]),
            ),
            member(
                "api",
                true,
                serde_json::json!([dep("backend", Some("dev"), "*")]),
            ),
            member(
                "backend",
                true,
                serde_json::json!([dep("api", None, "^0.1.0")]),
            ),
            member(
                "xtask",
                false,
                serde_json::json!([dep("api", None, "^0.1.0")]),
            ),
        ];
        let order = publish_order(&members).unwrap();
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["api", "backend", "facade"]);
    }

    #[test]
    fn a_versioned_dev_dependency_cycle_is_named() {
        let members = [
            member(
                "api",
                true,
                serde_json::json!([dep("backend", Some("dev"), "^0.1.0")]),
            ),
            member(
                "backend",
                true,
                serde_json::json!([dep("api", None, "^0.1.0")]),
            ),
        ];
        let err = publish_order(&members).unwrap_err();
        assert!(err.contains("api needs backend"), "{err}");
        assert!(err.contains("backend needs api"), "{err}");
    }

    #[test]
    fn a_dependency_on_an_unpublished_crate_is_refused() {
        let members = [
            member("cli", true, serde_json::json!([dep("kit", None, "^0.1.0")])),
            member("kit", false, serde_json::json!([])),
        ];
        assert!(publish_order(&members)
            .unwrap_err()
            .contains("cli: normal dependency kit is `publish = false`"));
    }

    #[test]
    fn manifests_of_the_workspace_are_ready() {
        let members = members(&metadata().unwrap()).unwrap();
        for member in members.iter().filter(|m| m.publish) {
            assert_eq!(
                metadata_problems(member),
                Vec::<String>::new(),
                "{}",
                member.name
            );
        }
        let order = publish_order(&members).unwrap();
        assert!(order.iter().any(|(n, _)| n == FACADE));
    }
}
