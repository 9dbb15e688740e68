//! The generated framework types against the framework itself, both ways, for every type.
//!
//! The pinned Python package (in the test venv `cargo xtask services` makes) serialises a
//! populated and an empty instance of each dataclass (`xtask/schema/golden.py emit`); each Rust
//! type decodes both and encodes them again, which must give the framework's JSON as a value —
//! except that the framework writes `null` for `None` where we leave the key out, so its nulls
//! are removed before comparing. Then the framework decodes what Rust wrote
//! (`golden.py verify`) and must get instances equal to the ones it started from.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use tg_schema::trustgraph::{reencode, PYTHON_NAMES};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The test venv's Python, or why there is none.
fn python() -> Result<PathBuf, String> {
    let python = std::env::var_os("TG_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/pulsar-venv/bin/python"));
    if python.is_file() {
        Ok(python)
    } else {
        Err(format!(
            "no Python with trustgraph-base at {} (run `cargo xtask services`, or set TG_PYTHON)",
            python.display()
        ))
    }
}

/// `None` written by the framework as `null`, removed everywhere (objects and nested values).
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

#[test]
fn every_generated_type_matches_the_framework_both_ways() {
    let python = match python() {
        Ok(p) => p,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => panic!("{why} (CI=true)"),
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let script = workspace().join("xtask/schema/golden.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg("emit")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vectors: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        vectors.len(),
        PYTHON_NAMES.len(),
        "the framework has {} dataclasses, we generated {}",
        vectors.len(),
        PYTHON_NAMES.len()
    );

    let mut problems = Vec::new();
    let mut written = String::new();
    for vector in &vectors {
        let name = vector["name"].as_str().unwrap();
        let mut line = serde_json::Map::new();
        line.insert("name".into(), name.into());
        for which in ["populated", "empty"] {
            let python_json = vector[which].as_str().unwrap();
            let Some(result) = reencode(name, python_json.as_bytes()) else {
                problems.push(format!("{name}: no generated type"));
                continue;
            };
            let rust_json = match result {
                Ok(bytes) => String::from_utf8(bytes).unwrap(),
                Err(e) => {
                    problems.push(format!("{name} ({which}): does not decode: {e}"));
                    continue;
                }
            };
            let theirs = without_nulls(serde_json::from_str(python_json).unwrap());
            let ours: Value = serde_json::from_str(&rust_json).unwrap();
            if ours != theirs {
                problems.push(format!(
                    "{name} ({which}): the framework wrote {python_json}, we wrote {rust_json}"
                ));
            }
            line.insert(which.into(), rust_json.into());
        }
        written.push_str(&Value::Object(line).to_string());
        written.push('\n');
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let file = std::env::temp_dir().join(format!("tg-schema-golden-{}.jsonl", std::process::id()));
    std::fs::write(&file, written).unwrap();
    let verify = Command::new(&python)
        .arg(&script)
        .arg("verify")
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "the framework reads what we wrote differently:\n{report}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        report.contains(&format!("verified {} vectors", 2 * PYTHON_NAMES.len())),
        "{report}"
    );
}
