//! The documentation cannot drift from the code:
//! - the configuration reference (`docs/src/reference/configuration.md`) has one
//!   heading per key, and its keys are exactly those of the config structs, read from
//!   their serde derives (so a new key without documentation fails here); the default
//!   it states for a key is the one serde fills in;
//! - every TOML example in the book and the README passes `switchyard check`, and every
//!   relative link resolves (`scripts/check-docs`);
//! - the book builds with mdBook (installed by `scripts/install-deps.sh`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_reflection::{ContainerFormat, Format, Registry, Tracer, TracerConfig};
use switchyard::config;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn registry() -> Registry {
    let mut tracer = Tracer::new(TracerConfig::default());
    tracer.trace_simple_type::<config::Config>().unwrap();
    // Every enum once more, so that all its variants are seen (the registry refuses
    // half-traced enums).
    tracer.trace_simple_type::<config::ServerTlsMode>().unwrap();
    tracer.trace_simple_type::<config::ClientTls>().unwrap();
    tracer.trace_simple_type::<config::AuthMethod>().unwrap();
    tracer.trace_simple_type::<config::Engine>().unwrap();
    tracer.trace_simple_type::<config::PoolMode>().unwrap();
    tracer.trace_simple_type::<config::ReadBalance>().unwrap();
    tracer.trace_simple_type::<config::SplitBrainRule>().unwrap();
    tracer.trace_simple_type::<config::FailoverMode>().unwrap();
    tracer.trace_simple_type::<config::ReadYourWrites>().unwrap();
    tracer.registry().unwrap()
}

/// The dotted paths of every key, as the reference writes them: tables by name, maps
/// keyed by a name as `NAME`, arrays of tables with `[]`.
fn keys(reg: &Registry, container: &str, prefix: &str, out: &mut BTreeSet<String>) {
    let Some(ContainerFormat::Struct(fields)) = reg.get(container) else {
        return;
    };
    for f in fields {
        let path = format!("{prefix}{}", f.name);
        walk(reg, &f.value, &path, out);
    }
}

fn walk(reg: &Registry, format: &Format, path: &str, out: &mut BTreeSet<String>) {
    match format {
        Format::Option(inner) => walk(reg, inner, path, out),
        Format::Seq(inner) if matches!(**inner, Format::TypeName(ref n) if is_struct(reg, n)) => {
            walk(reg, inner, &format!("{path}[]"), out)
        }
        Format::Map { value, .. } => walk(reg, value, &format!("{path}.NAME"), out),
        Format::TypeName(name) if is_struct(reg, name) => keys(reg, name, &format!("{path}."), out),
        _ => {
            out.insert(path.to_string());
        }
    }
}

fn is_struct(reg: &Registry, name: &str) -> bool {
    matches!(reg.get(name), Some(ContainerFormat::Struct(_)))
}

/// The reference's level-3 headings: "### `key.path`".
fn documented() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("docs/src/reference/configuration.md")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| {
            let h = h.trim();
            assert!(
                h.starts_with('`') && h.ends_with('`') && h.matches('`').count() == 2,
                "a reference heading must be one key in backticks: {h}"
            );
            h.trim_matches('`').to_string()
        })
        .collect()
}

#[test]
fn the_configuration_reference_documents_exactly_the_keys_of_the_config() {
    let reg = registry();
    let mut code = BTreeSet::new();
    keys(&reg, "Config", "", &mut code);
    assert!(
        code.contains("clusters.NAME.nodes[].host"),
        "the walk reaches nested tables: {code:?}"
    );
    let docs = documented();
    let undocumented: Vec<_> = code.difference(&docs).collect();
    let unknown: Vec<_> = docs.difference(&code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/src/reference/configuration.md disagrees with src/config:\n  keys without a heading: {undocumented:?}\n  headings that are no key: {unknown:?}"
    );
}

/// Every key with its optional tables present, and only the keys that have no default
/// set (so that every documented default can be seen).
const ALL_TABLES: &str = r#"
[[users]]
name = "app"

[clusters.main]

[clusters.main.manager]
user = "postgres"

[[clusters.main.nodes]]
name = "a"
host = "127.0.0.1"

[coordination]
etcd = ["http://127.0.0.1:2379"]
instance = "one"

[auth_query]
user = "postgres"
"#;

/// The value at a reference path (`clusters.NAME.nodes[].port`) in the serialized config.
fn at<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    let mut v = v;
    for part in path.split('.') {
        let (name, array) = match part.strip_suffix("[]") {
            Some(n) => (n, true),
            None => (part, false),
        };
        v = if name == "NAME" {
            v.as_object()?.values().next()?
        } else {
            v.get(name)?
        };
        if array {
            v = v.get(0)?;
        }
    }
    Some(v)
}

#[test]
fn the_defaults_in_the_configuration_reference_are_the_configs() {
    let parsed: config::Config = toml::from_str(ALL_TABLES).unwrap();
    let actual = serde_json::to_value(&parsed).unwrap();
    let set: toml::Value = toml::from_str(ALL_TABLES).unwrap();
    let set = serde_json::to_value(&set).unwrap();
    let text = std::fs::read_to_string(root().join("docs/src/reference/configuration.md")).unwrap();
    let (mut compared, mut wrong) = (0, Vec::new());
    let mut key = None;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            key = Some(h.trim().trim_matches('`').to_string());
            continue;
        }
        let (Some(k), Some(default)) = (&key, line.strip_prefix("- **Default:** ")) else {
            continue;
        };
        if at(&set, k).is_some() {
            continue; // given in ALL_TABLES: no default to see
        }
        let value = at(&actual, k);
        let documented = if default.starts_with("none") {
            Some(serde_json::Value::Null)
        } else if let Some(rest) = default.strip_prefix('`') {
            let (span, after) = rest.split_once('`').unwrap();
            // A value alone, or with a parenthesis ("`0` (one per CPU core)"); a default
            // that depends on other keys ("`10000` with ...") is prose, not checked here.
            if !(after.is_empty() || after.starts_with(" (")) {
                continue;
            }
            let parsed: Result<toml::Table, _> = toml::from_str(&format!("v = {span}"));
            Some(match parsed {
                Ok(t) => serde_json::to_value(&t["v"]).unwrap(),
                Err(_) => serde_json::Value::String(span.to_string()),
            })
        } else {
            None // "required", or a sentence
        };
        let Some(documented) = documented else { continue };
        compared += 1;
        let actual = value.cloned().unwrap_or(serde_json::Value::Null);
        if actual != documented {
            wrong.push(format!(
                "{k}: documented {documented}, the config's default is {actual}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/src/reference/configuration.md states wrong defaults:\n  {}",
        wrong.join("\n  ")
    );
    eprintln!("{compared} defaults compared");
    assert!(
        compared >= 50,
        "only {compared} defaults were compared: has the reference's format changed?"
    );
}

#[test]
fn every_toml_example_passes_check_and_every_link_resolves() {
    let out = Command::new(root().join("scripts/check-docs"))
        .arg("--switchyard")
        .arg(env!("CARGO_BIN_EXE_switchyard"))
        .output()
        .expect("scripts/check-docs runs (python3)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "scripts/check-docs failed:\n{text}");
    assert!(
        text.contains("toml"),
        "the summary names the examples it checked: {text}"
    );
}

#[test]
fn the_book_builds() {
    let dest = tempfile::tempdir().unwrap();
    // Where scripts/install-deps.sh put it (`cargo install`: $CARGO_HOME/bin), else PATH.
    let mdbook = std::env::var_os("MDBOOK").map(PathBuf::from).unwrap_or_else(|| {
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
        let installed = cargo_home.join("bin/mdbook");
        if installed.exists() {
            installed
        } else {
            PathBuf::from("mdbook")
        }
    });
    let out = Command::new(&mdbook)
        .arg("build")
        .arg(root().join("docs"))
        .arg("--dest-dir")
        .arg(dest.path())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} could not run ({e}): scripts/install-deps.sh installs mdbook",
                mdbook.display()
            )
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mdbook build failed:\n{stderr}");
    assert!(
        !stderr.contains("[WARN]") && !stderr.contains("[ERROR]"),
        "mdbook warned:\n{stderr}"
    );
    assert!(dest.path().join("reference/configuration.html").exists());
}
