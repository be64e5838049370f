//! The Grafana dashboard (`deploy/grafana/switchyard.json`) and the metrics reference
//! name only metrics `/metrics` has, and every metric is documented. No servers: the
//! families come from `Metrics` itself, which lists them even with no series yet.

use std::collections::BTreeSet;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// (family, type) of every metric in the exposition, and the sample names they give.
fn exposition() -> (Vec<(String, String)>, BTreeSet<String>) {
    let families = switchyard::obs::metrics::Metrics::default().families();
    // The list is what the exposition writes: every family that has a series there.
    let text = switchyard::obs::metrics::Metrics::default().render(&[], &[]);
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = l.split_once(' ').unwrap();
        assert!(
            families.contains(&(name.to_string(), kind.to_string())),
            "{name} {kind} unlisted"
        );
    }
    let mut samples = BTreeSet::new();
    for (name, kind) in &families {
        match kind.as_str() {
            "counter" => {
                samples.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    samples.insert(format!("{name}{s}"));
                }
            }
            _ => {
                samples.insert(name.clone());
            }
        }
    }
    (families, samples)
}

/// Every `switchyard_...` name in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("switchyard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_only_metrics_that_exist() {
    let (_, samples) = exposition();
    let text = std::fs::read_to_string(root().join("deploy/grafana/switchyard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 20, "{} queries", all.len());
    let mut used = BTreeSet::new();
    for e in &all {
        used.extend(names_in(e));
    }
    let unknown: Vec<_> = used.iter().filter(|n| !samples.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics /metrics lacks: {unknown:?}"
    );
    // The variable and the panels exist as Grafana expects them.
    assert_eq!(dashboard["uid"], "switchyard");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels
        .iter()
        .all(|p| p["gridPos"]["w"].as_u64().is_some_and(|w| w <= 24)));
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "cluster"]);
}

#[test]
fn every_metric_is_documented_and_the_reference_names_only_real_ones() {
    let (families, samples) = exposition();
    let doc = std::fs::read_to_string(root().join("docs/src/operations/metrics.md")).unwrap();
    let undocumented: Vec<_> = families
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !doc.contains(n.as_str()))
        .collect();
    assert!(undocumented.is_empty(), "metrics.md does not name: {undocumented:?}");
    // Names in the reference are families or their samples.
    let known = |n: &String| samples.contains(n) || families.iter().any(|(f, _)| f == n);
    let unknown: Vec<_> = names_in(&doc).into_iter().filter(|n| !known(n)).collect();
    assert!(
        unknown.is_empty(),
        "metrics.md names metrics /metrics lacks: {unknown:?}"
    );
}
