//! `cargo xtask schema sync|check`: the framework's message types, generated from the pinned
//! Python package.
//!
//! `xtask/schema/introspect.py` runs in the test venv (which pins `trustgraph-base`) and describes
//! every dataclass of `trustgraph.schema` as JSON; this module writes one Rust module per Python
//! module into `crates/tg-schema/src/trustgraph/`, formatted with rustfmt. `check` writes nothing
//! and fails when the committed files differ from what `sync` would write, so CI catches both a
//! hand edit and a framework upgrade that was not synced.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::pulsar;

/// Where the generated modules live.
fn out_dir() -> PathBuf {
    crate::root().join("crates/tg-schema/src/trustgraph")
}

/// Runs the introspection script in the test venv and returns its JSON.
fn introspect() -> Result<Value, String> {
    pulsar::ensure_venv()?;
    let python = pulsar::python();
    let script = crate::root().join("xtask/schema/introspect.py");
    let output = Command::new(&python)
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !output.status.success() {
        return Err(format!("{} failed ({})", script.display(), output.status));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("introspection printed no JSON: {e}"))
}

pub(crate) fn run(mode: &str) -> Result<(), String> {
    let description = introspect()?;
    let files = generate(&description)?;
    let dir = out_dir();
    match mode {
        "sync" => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let keep: BTreeSet<&String> = files.keys().collect();
            for entry in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
                let path = entry.map_err(|e| e.to_string())?.path();
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_owned();
                if !keep.contains(&name) {
                    std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            for (name, text) in &files {
                let path = dir.join(name);
                std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            println!(
                "xtask: wrote {} files to {} ({} types from trustgraph-base {})",
                files.len(),
                dir.display(),
                count_types(&description),
                description["version"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        "check" => {
            let mut differ = Vec::new();
            for (name, text) in &files {
                let path = dir.join(name);
                if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                    differ.push(name.clone());
                }
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !files.contains_key(&name) {
                        differ.push(format!("{name} (not generated)"));
                    }
                }
            }
            if differ.is_empty() {
                println!(
                    "xtask: crates/tg-schema/src/trustgraph is what trustgraph-base {} generates ({} types)",
                    description["version"].as_str().unwrap_or("?"),
                    count_types(&description)
                );
                Ok(())
            } else {
                Err(format!(
                    "the generated schema differs from trustgraph-base {} in: {}; run `cargo xtask schema sync`",
                    description["version"].as_str().unwrap_or("?"),
                    differ.join(", ")
                ))
            }
        }
        other => Err(format!("unknown schema command {other:?}: sync or check")),
    }
}

fn count_types(description: &Value) -> usize {
    modules(description)
        .iter()
        .map(|m| m["classes"].as_array().map_or(0, Vec::len))
        .sum()
}

fn modules(description: &Value) -> Vec<Value> {
    description["modules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The Rust module a Python module of `trustgraph.schema` goes to: `trustgraph.schema.llm` →
/// `llm`; the `core` package's modules share `core`.
fn rust_module(python: &str) -> String {
    let rest = python.strip_prefix("trustgraph.schema.").unwrap_or(python);
    rest.split('.').next().unwrap_or(rest).to_owned()
}

/// Field names Rust reserves; written as raw identifiers (serde strips the `r#`).
const KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "dyn", "else", "enum", "extern", "false",
    "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref",
    "return", "static", "struct", "trait", "true", "type", "unsafe", "use", "where", "while",
    "abstract", "become", "box", "do", "final", "gen", "macro", "override", "priv", "try",
    "typeof", "unsized", "virtual", "yield",
];

/// Names the generated code uses unqualified; a framework class must not take them.
const RESERVED_TYPES: &[&str] = &["Option", "Vec", "String", "Box", "BTreeMap", "Value"];

struct Class<'a> {
    module: String,
    python_module: String,
    name: String,
    json: &'a Value,
}

fn generate(description: &Value) -> Result<BTreeMap<String, String>, String> {
    let version = description["version"].as_str().unwrap_or("?").to_owned();
    let modules_json = description["modules"]
        .as_array()
        .ok_or("introspection has no modules")?;
    let mut classes: Vec<Class<'_>> = Vec::new();
    for m in modules_json {
        let python_module = m["module"].as_str().unwrap_or_default().to_owned();
        for c in m["classes"].as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or_default().to_owned();
            if RESERVED_TYPES.contains(&name.as_str()) {
                return Err(format!(
                    "framework class {name} clashes with a Rust type the generated code uses"
                ));
            }
            classes.push(Class {
                module: rust_module(&python_module),
                python_module: python_module.clone(),
                name,
                json: c,
            });
        }
    }
    let module_of: BTreeMap<&str, &str> = classes
        .iter()
        .map(|c| (c.name.as_str(), c.module.as_str()))
        .collect();
    if module_of.len() != classes.len() {
        return Err("two framework classes share a name".to_owned());
    }
    let boxed = boxed_fields(&classes);

    let mut by_module: BTreeMap<String, Vec<&Class<'_>>> = BTreeMap::new();
    for c in &classes {
        by_module.entry(c.module.clone()).or_default().push(c);
    }
    let module_docs: BTreeMap<String, Vec<&str>> = {
        let mut docs: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for m in modules_json {
            let module = rust_module(m["module"].as_str().unwrap_or_default());
            docs.entry(module)
                .or_default()
                .push(m["module"].as_str().unwrap_or_default());
        }
        docs
    };

    let mut files = BTreeMap::new();
    for (module, members) in &by_module {
        let mut out = String::new();
        let sources = module_docs[module].join("`, `");
        out.push_str(&format!(
            "//! The framework's `{sources}` types (trustgraph-base {version}).\n//!\n//! Generated by `cargo xtask schema sync`; do not edit.\n\n"
        ));
        let mut uses: BTreeSet<String> = BTreeSet::new();
        let mut body = String::new();
        for class in members {
            body.push_str(&class_code(class, &module_of, &boxed, &mut uses)?);
        }
        uses.retain(|u| !u.starts_with(&format!("super::{module}::")));
        for u in &uses {
            out.push_str(&format!("use {u};\n"));
        }
        out.push('\n');
        out.push_str(&body);
        files.insert(format!("{module}.rs"), rustfmt(&out)?);
    }
    files.insert(
        "mod.rs".to_owned(),
        rustfmt(&mod_rs(&version, &classes, &by_module))?,
    );
    Ok(files)
}

fn mod_rs(
    version: &str,
    classes: &[Class<'_>],
    by_module: &BTreeMap<String, Vec<&Class<'_>>>,
) -> String {
    let mut out = format!(
        "//! The Python framework's message types: every dataclass of `trustgraph.schema` in\n\
//! trustgraph-base {version}, one module per Python module, and all of them here (as\n\
//! `from trustgraph.schema import *` has them).\n\
//!\n\
//! Generated by `cargo xtask schema sync` from the installed package; CI checks that the\n\
//! committed code is what the pinned version generates. Field order and JSON names are the\n\
//! framework's; `X | None` is `Option<X>` (omitted from the JSON when `None`, while the framework\n\
//! writes `null`; both read back the same); defaults are the framework's; `bytes` fields are\n\
//! `String`s, because the framework carries them as UTF-8 text; `Any` is a [`serde_json::Value`].\n\
//!\n\
//! ```\n\
//! use tg_schema::trustgraph::TextCompletionRequest;\n\
//! let request = TextCompletionRequest {{ prompt: \"hello\".into(), ..Default::default() }};\n\
//! assert_eq!(request.operation, \"completion\");\n\
//! ```\n\n"
    );
    out.push_str(&format!(
        "/// The trustgraph-base version these types were generated from.\npub const FRAMEWORK_VERSION: &str = \"{version}\";\n\n"
    ));
    for module in by_module.keys() {
        out.push_str(&format!("pub mod {module};\n"));
    }
    out.push('\n');
    for (module, members) in by_module {
        let names: Vec<&str> = members.iter().map(|c| c.name.as_str()).collect();
        out.push_str(&format!("pub use {module}::{{{}}};\n", names.join(", ")));
    }
    out.push_str(
        "\n/// The Python name (`trustgraph.schema.llm.TextCompletionRequest`) of every generated type.\npub const PYTHON_NAMES: &[&str] = &[\n",
    );
    for c in classes {
        out.push_str(&format!("    \"{}.{}\",\n", c.python_module, c.name));
    }
    out.push_str("];\n\n");
    out.push_str(
        "/// Decodes `json` as the type with Python name `python_name` and encodes it again with\n\
/// [`JsonCodec`](crate::JsonCodec); `None` for a name that is not generated. For tests that\n\
/// compare the types with the framework.\n\
#[doc(hidden)]\n\
pub fn reencode(python_name: &str, json: &[u8]) -> Option<Result<Vec<u8>, crate::CodecError>> {\n\
    fn go<T: crate::Message>(json: &[u8]) -> Result<Vec<u8>, crate::CodecError> {\n\
        use crate::Codec;\n\
        crate::JsonCodec.encode(&crate::JsonCodec.decode::<T>(json)?)\n\
    }\n\
    Some(match python_name {\n",
    );
    for c in classes {
        out.push_str(&format!(
            "        \"{}.{}\" => go::<{}::{}>(json),\n",
            c.python_module, c.name, c.module, c.name
        ));
    }
    out.push_str("        _ => return None,\n    })\n}\n");
    out
}

/// `Class.field`s that hold a class by value which holds the first back (directly or through
/// others): boxed, or the type would have infinite size. Of each such cycle only the fields that
/// refer forward (to a class declared later, which Python writes as a string annotation) are
/// boxed: every cycle has one, and `Triple.s` stays a plain `Term` while `Term.triple` is boxed.
fn boxed_fields(classes: &[Class<'_>]) -> BTreeSet<(String, String)> {
    fn by_value(t: &Value) -> Option<&str> {
        match t["kind"].as_str() {
            Some("class") => t["name"].as_str(),
            Some("optional") => by_value(&t["of"]),
            _ => None,
        }
    }
    let mut edges: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for c in classes {
        for f in c.json["fields"].as_array().into_iter().flatten() {
            if let Some(target) = by_value(&f["type"]) {
                edges
                    .entry(c.name.as_str())
                    .or_default()
                    .push((f["name"].as_str().unwrap_or_default(), target));
            }
        }
    }
    let reaches = |from: &str, to: &str| -> bool {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(n) = stack.pop() {
            if n == to {
                return true;
            }
            if seen.insert(n) {
                stack.extend(edges.get(n).into_iter().flatten().map(|(_, t)| *t));
            }
        }
        false
    };
    let order: BTreeMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    let mut boxed = BTreeSet::new();
    for (class, fields) in &edges {
        for (field, target) in fields {
            if order[target] >= order[class] && reaches(target, class) {
                boxed.insert(((*class).to_owned(), (*field).to_owned()));
            }
        }
    }
    boxed
}

/// The Rust type of a field, adding the `use`s it needs.
fn rust_type(
    t: &Value,
    module_of: &BTreeMap<&str, &str>,
    boxed: bool,
    uses: &mut BTreeSet<String>,
) -> Result<String, String> {
    Ok(match t["kind"].as_str().unwrap_or_default() {
        "str" | "bytes" => "String".to_owned(),
        "int" => "i64".to_owned(),
        "float" => "f64".to_owned(),
        "bool" => "bool".to_owned(),
        "any" => "serde_json::Value".to_owned(),
        "optional" => format!("Option<{}>", rust_type(&t["of"], module_of, boxed, uses)?),
        "list" => format!("Vec<{}>", rust_type(&t["of"], module_of, false, uses)?),
        "dict" => {
            uses.insert("std::collections::BTreeMap".to_owned());
            format!(
                "BTreeMap<String, {}>",
                rust_type(&t["of"], module_of, false, uses)?
            )
        }
        "class" => {
            let name = t["name"].as_str().unwrap_or_default();
            let module = module_of
                .get(name)
                .ok_or_else(|| format!("class {name} is referenced but not generated"))?;
            uses.insert(format!("super::{module}::{name}"));
            if boxed {
                format!("Box<{name}>")
            } else {
                name.to_owned()
            }
        }
        other => return Err(format!("unknown type kind {other:?}")),
    })
}

/// How the framework spells a type, for the docs.
fn python_type(t: &Value) -> String {
    match t["kind"].as_str().unwrap_or_default() {
        "optional" => format!("{} | None", python_type(&t["of"])),
        "list" => format!("list[{}]", python_type(&t["of"])),
        "dict" => format!("dict[str, {}]", python_type(&t["of"])),
        "class" => t["name"].as_str().unwrap_or_default().to_owned(),
        "any" => "Any".to_owned(),
        other => other.to_owned(),
    }
}

/// The Rust expression of a non-zero default, `None` when the type's own default is the
/// framework's.
fn default_expr(t: &Value, default: &Value) -> Result<Option<String>, String> {
    let Some(value) = default.get("value") else {
        return Ok(None); // no default in Python: the type's own
    };
    let kind = t["kind"].as_str().unwrap_or_default();
    Ok(match (kind, value) {
        ("optional", Value::Null) => None,
        // `X | None = <value>`: Some of that value
        ("optional", _) => {
            let inner = default_expr(&t["of"], default)?;
            Some(format!(
                "Some({})",
                inner.as_deref().unwrap_or("Default::default()")
            ))
        }
        ("str" | "bytes", Value::String(s)) if s.is_empty() => None,
        ("str" | "bytes", Value::String(s)) => Some(format!("{s:?}.to_owned()")),
        ("int", Value::Number(n)) if n.as_i64() == Some(0) => None,
        ("int", Value::Number(n)) => Some(n.to_string()),
        ("float", Value::Number(n)) if n.as_f64() == Some(0.0) => None,
        ("float", Value::Number(n)) => Some(format!("{:?}", n.as_f64().unwrap_or_default())),
        ("bool", Value::Bool(false)) => None,
        ("bool", Value::Bool(true)) => Some("true".to_owned()),
        ("list", Value::Array(a)) if a.is_empty() => None,
        ("dict", Value::Object(o)) if o.is_empty() => None,
        // a nested dataclass made by its own constructor: its Rust default is the same value
        ("class", Value::Object(_)) if default.get("class").is_some() => None,
        _ => return Err(format!("unsupported default {value} for a {kind} field")),
    })
}

/// A doc comment line: markdown that rustdoc reads as text (no links, tags or code blocks).
fn doc_line(line: &str) -> String {
    let text = line
        .trim()
        .replace('\\', "\\\\")
        .replace('[', "\\[")
        .replace(']', "\\]")
        .replace('<', "\\<")
        .replace('>', "\\>")
        .replace('`', "'")
        .replace('*', "\\*");
    if text.is_empty() {
        "///\n".to_owned()
    } else {
        format!("/// {text}\n")
    }
}

fn class_code(
    class: &Class<'_>,
    module_of: &BTreeMap<&str, &str>,
    boxed: &BTreeSet<(String, String)>,
    uses: &mut BTreeSet<String>,
) -> Result<String, String> {
    let mut out = String::new();
    let doc = class.json["doc"].as_str().unwrap_or_default();
    for line in doc.lines() {
        out.push_str(&doc_line(line));
    }
    if !doc.is_empty() {
        out.push_str("///\n");
    }
    out.push_str(&format!(
        "/// The framework's `{}.{}`.\n",
        class.python_module, class.name
    ));
    let mut defaults = Vec::new();
    let mut fields = String::new();
    for f in class.json["fields"].as_array().into_iter().flatten() {
        let name = f["name"].as_str().unwrap_or_default();
        let is_boxed = boxed.contains(&(class.name.clone(), name.to_owned()));
        let ty = rust_type(&f["type"], module_of, is_boxed, uses)?;
        for line in f["comment"].as_array().into_iter().flatten() {
            fields.push_str(&doc_line(line.as_str().unwrap_or_default()));
        }
        if f["comment"].as_array().is_some_and(|c| !c.is_empty()) {
            fields.push_str("///\n");
        }
        let default = default_expr(&f["type"], &f["default"])
            .map_err(|e| format!("{}.{name}: {e}", class.name))?;
        let python_default = match f["default"].get("value") {
            None => "none (required)".to_owned(),
            Some(Value::Null) => "`None`".to_owned(),
            Some(v) => format!("`{v}`"),
        };
        fields.push_str(&format!(
            "/// Python: `{}`, default {}.\n",
            python_type(&f["type"]),
            python_default
        ));
        let ident = if KEYWORDS.contains(&name) {
            format!("r#{name}")
        } else {
            name.to_owned()
        };
        fields.push_str(&format!("    pub {ident}: {ty},\n"));
        defaults.push((ident, default));
    }
    let trivial = defaults.iter().all(|(_, d)| d.is_none());
    out.push_str("#[message]\n");
    out.push_str(if trivial {
        "#[derive(Debug, Clone, PartialEq, Default)]\n"
    } else {
        "#[derive(Debug, Clone, PartialEq)]\n"
    });
    out.push_str(&format!("pub struct {} {{\n{fields}}}\n\n", class.name));
    if !trivial {
        out.push_str(&format!(
            "impl Default for {} {{\n    fn default() -> Self {{\n        Self {{\n",
            class.name
        ));
        for (ident, default) in &defaults {
            out.push_str(&format!(
                "            {ident}: {},\n",
                default.as_deref().unwrap_or("Default::default()")
            ));
        }
        out.push_str("        }\n    }\n}\n\n");
    }
    uses.insert("crate::message".to_owned());
    Ok(out)
}

/// Formats generated code the way `cargo fmt` formats the rest of the crate.
fn rustfmt(code: &str) -> Result<String, String> {
    let mut child = Command::new("rustfmt")
        .args(["--edition", "2021", "--emit", "stdout"])
        .current_dir(crate::root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run rustfmt: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("rustfmt has no stdin")?
        .write_all(code.as_bytes())
        .map_err(|e| format!("cannot feed rustfmt: {e}"))?;
    let output = child
        .wait_with_output()
        .map_err(|e| format!("rustfmt did not finish: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "rustfmt refused the generated code: {}\n{code}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    String::from_utf8(output.stdout).map_err(|e| e.to_string())
}
