//! The code's shape, checked against what ARCHITECTURE.md says of it:
//! - the top-level modules form the layers its code map lists, each using only the
//!   layers before it (so no module cycle, and neither engine reaches into the other);
//! - no `static` holds the proxy's runtime state (two proxies can share a process),
//!   except the few listed here with the reason they are harmless.
//!
//! Dependencies are read from the source: every `crate::<module>` path outside
//! comments, and the names inside `use crate::{...}`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Source text without `//` comments (doc comments name modules freely).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string literal ("http://...") is rare in paths we look
            // for; cutting there only hides text after it.
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
        .collect()
}

/// The top-level modules each top-level module uses.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = code(&std::fs::read_to_string(&f).unwrap());
        let deps = graph.entry(top.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = &group[..group.find('}').unwrap_or(group.len())];
                for part in inner.split(',') {
                    let name = ident_at(part.trim());
                    if !name.is_empty() {
                        deps.insert(name);
                    }
                }
            } else {
                let name = ident_at(rest);
                if !name.is_empty() {
                    deps.insert(name);
                }
            }
        }
        deps.remove(&top);
    }
    graph
}

/// ARCHITECTURE.md's layers: the numbered list after the line that starts "Layers",
/// each item naming its modules in backticks before the first colon.
fn layers() -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let start = text
        .find("\nLayers")
        .expect("ARCHITECTURE.md has a \"Layers\" paragraph");
    let mut layers = Vec::new();
    let mut in_list = false;
    for line in text[start..].lines().skip(1) {
        let t = line.trim_start();
        let numbered = t
            .split_once(". ")
            .filter(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        match numbered {
            Some((_, item)) => {
                in_list = true;
                let head = &item[..item.find(':').unwrap_or(item.len())];
                let names: Vec<String> = head
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(|s| s.trim_end_matches('/').trim_end_matches(".rs").to_string())
                    .collect();
                assert!(!names.is_empty(), "layer without modules: {line}");
                layers.push(names);
            }
            None if in_list && t.is_empty() => break,
            None => {}
        }
    }
    layers
}

#[test]
fn top_level_modules_use_only_the_layers_before_them() {
    let graph = graph();
    let layers = layers();
    let mut layer_of = BTreeMap::new();
    for (i, names) in layers.iter().enumerate() {
        for n in names {
            assert!(
                layer_of.insert(n.clone(), i).is_none(),
                "{n} is listed twice in ARCHITECTURE.md"
            );
        }
    }
    let mut wrong = Vec::new();
    for (module, deps) in &graph {
        let Some(&mine) = layer_of.get(module) else {
            wrong.push(format!("src/{module} is not in ARCHITECTURE.md's layers"));
            continue;
        };
        for d in deps {
            match layer_of.get(d) {
                Some(&theirs) if theirs < mine => {}
                Some(_) => wrong.push(format!(
                    "{module} (layer {}) uses {d} (layer {})",
                    mine + 1,
                    layer_of[d] + 1
                )),
                None => wrong.push(format!("{module} uses {d}, which is not in ARCHITECTURE.md's layers")),
            }
        }
    }
    for n in layer_of.keys() {
        if !graph.contains_key(n) {
            wrong.push(format!("ARCHITECTURE.md lists {n}, which is not a module of src/"));
        }
    }
    assert!(
        wrong.is_empty(),
        "the layout disagrees with ARCHITECTURE.md:\n  {}",
        wrong.join("\n  ")
    );
}

/// `static`s that may stay, and why: none of them is a proxy's state.
const ALLOWED_STATICS: &[(&str, &str)] = &[
    // Unique ids for per-thread caches: unique across proxies too, which is all they need.
    ("src/pg/classify/mod.rs", "static NEXT_CLASSIFIER"),
    ("src/local_watch.rs", "static NEXT_KEY"),
    // The next port the local cluster harness (demo, tests) tries: the process's, so that
    // two callers in it never get the same one; no proxy reads it.
    ("src/demo/postgres.rs", "static NEXT"),
    // A random secret for the fake salts of unknown users: any value works, per process.
    ("src/pg/auth.rs", "static SECRET"),
    // Test and fuzz fixtures.
    ("src/pg/txn/machine_tests.rs", "static K"),
    ("src/pg/fuzz.rs", "static K"),
];

#[test]
fn no_static_holds_runtime_state() {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root()).unwrap().to_string_lossy().to_string();
        let text = code(&std::fs::read_to_string(&f).unwrap());
        let mut in_thread_local = false;
        for line in text.lines() {
            let t = line.trim();
            // Per-thread caches (`thread_local!`) belong to a worker thread, not a proxy.
            if t.starts_with("thread_local!") {
                in_thread_local = true;
            }
            if in_thread_local {
                if t == "}" {
                    in_thread_local = false;
                }
                continue;
            }
            let is_static =
                t.starts_with("static ") || t.starts_with("pub static ") || t.starts_with("pub(crate) static ");
            // Constant tables are `static`s too; only interior mutability holds state.
            let mutable = ["Mutex", "RwLock", "OnceLock", "OnceCell", "Atomic", "Cell", "Lazy"]
                .iter()
                .any(|m| t.contains(m));
            if is_static && mutable {
                let allowed = ALLOWED_STATICS
                    .iter()
                    .any(|(file, head)| rel == *file && t.contains(head));
                if !allowed {
                    found.push(format!("{rel}: {t}"));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "statics holding state (put it in `Shared` or a cluster):\n  {}",
        found.join("\n  ")
    );
}

/// Files of pure logic (`ARCHITECTURE.md`: "routing does no I/O", the transaction
/// machine is I/O-free, pools' rules take time as an argument): they use nothing that
/// does I/O, so they are tested, and fuzzed, from values alone.
const PURE: &[&str] = &[
    "src/cluster/routing.rs",
    "src/cluster/freshness.rs",
    "src/proxy/pool.rs",
    "src/proxy/timeouts.rs",
    "src/pg/txn/machine.rs",
    "src/pg/txn/owed.rs",
    "src/pg/txn/state.rs",
    "src/pg/txn/statements.rs",
    "src/pg/txn/unit.rs",
    "src/pg/txn/conn.rs",
    "src/pg/txn/action.rs",
    "src/pg/txn/spares.rs",
];

const DOES_IO: &[&str] = &[
    "async",
    "await",
    "tokio::net",
    "tokio::io",
    "tokio::fs",
    "tokio::process",
    "tokio::signal",
    "tokio::spawn",
    "tokio::task",
    "tokio::time::sleep",
    "tokio::time::timeout",
    "std::net",
    "std::fs",
    "std::process",
    "tokio_postgres",
    "mysql_async",
    "crate::tls",
    "crate::proxy::shared",
    "crate::proxy::stream",
    "crate::proxy::connector",
    "crate::proxy::cancel",
    "crate::obs",
    "crate::cluster::health",
    "crate::pg::pool",
    "crate::pg::fresh",
    "crate::pg::freshness",
    "crate::pg::session",
    "crate::pg::server",
    "crate::pg::health",
    "crate::pg::tls",
    "crate::pg::cancel",
    "crate::pg::auth_query",
];

#[test]
fn pure_logic_imports_nothing_that_does_io() {
    let mut found = Vec::new();
    for file in PURE {
        let text = code(&std::fs::read_to_string(root().join(file)).unwrap());
        for bad in DOES_IO {
            let hit = text.match_indices(bad).any(|(i, _)| {
                let before = text[..i].chars().next_back();
                let after = text[i + bad.len()..].chars().next();
                // A whole path segment: not `foo_tokio`, not `crate::pg::pool_x`.
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                    && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            if hit {
                found.push(format!("{file} uses {bad}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "pure logic reaching for I/O:\n  {}",
        found.join("\n  ")
    );
}
