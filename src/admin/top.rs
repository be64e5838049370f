//! `switchyard top`: the query digests of `/queries` as a terminal table refreshed every
//! second, heaviest first, with the rate of calls since the last refresh (like
//! `pg_top` or `mytop`). Rendering is a pure function of two readings, tested here; the
//! CLI (`main.rs`) fetches and prints.

use std::collections::HashMap;
use std::time::Instant;

use serde::Deserialize;

/// One row of `/queries`, as read back.
#[derive(Debug, Clone, Deserialize)]
pub struct Digest {
    pub digest: String,
    pub query: String,
    pub cluster: String,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub route: Option<String>,
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub total_time_ms: f64,
    pub mean_time_ms: f64,
    pub p99_ms: f64,
}

impl Digest {
    fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.cluster,
            self.digest,
            self.node.as_deref().unwrap_or(""),
            self.route.as_deref().unwrap_or("")
        )
    }
}

/// The previous reading, for rates.
#[derive(Default)]
pub struct Top {
    calls: HashMap<String, u64>,
    at: Option<Instant>,
}

impl Top {
    /// The table for `rows` read at `now`, at most `width` columns wide.
    pub fn frame(&mut self, rows: &[Digest], now: Instant, width: usize) -> String {
        let elapsed = self.at.map(|t| now.saturating_duration_since(t).as_secs_f64());
        let mut out = format!(
            "{:>9} {:>10} {:>7} {:>9} {:>9} {:>10} {:>9}  {:<18} {:<8}  query\n",
            "calls/s", "calls", "errors", "mean_ms", "p99_ms", "total_s", "rows", "node", "route"
        );
        let mut calls = HashMap::with_capacity(rows.len());
        for r in rows {
            let key = r.key();
            let rate = match (elapsed, self.calls.get(&key)) {
                (Some(e), Some(&before)) if e > 0.0 => format!("{:.1}", r.calls.saturating_sub(before) as f64 / e),
                (Some(e), None) if e > 0.0 => format!("{:.1}", r.calls as f64 / e),
                _ => "-".into(),
            };
            let node = match &r.node {
                Some(n) => format!("{}.{}", r.cluster, n),
                None => r.cluster.clone(),
            };
            let head = format!(
                "{:>9} {:>10} {:>7} {:>9.3} {:>9.3} {:>10.3} {:>9}  {:<18} {:<8}  ",
                rate,
                r.calls,
                r.errors,
                r.mean_time_ms,
                r.p99_ms,
                r.total_time_ms / 1000.0,
                r.rows,
                cut(&node, 18),
                r.route.as_deref().unwrap_or("-"),
            );
            let room = width.saturating_sub(head.chars().count()).max(20);
            out.push_str(&head);
            out.push_str(&cut(&r.query, room));
            out.push('\n');
            calls.insert(key, r.calls);
        }
        if rows.is_empty() {
            out.push_str("(no statements recorded yet: is [telemetry] query_digests on?)\n");
        }
        self.calls = calls;
        self.at = Some(now);
        out
    }
}

/// `s` in at most `n` characters (the last one an ellipsis when cut).
fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn row(calls: u64, query: &str) -> Digest {
        Digest {
            digest: "00000000000000aa".into(),
            query: query.into(),
            cluster: "main".into(),
            node: Some("pg1".into()),
            route: Some("primary".into()),
            calls,
            errors: 0,
            rows: calls,
            total_time_ms: 1500.0,
            mean_time_ms: 0.25,
            p99_ms: 1.5,
        }
    }

    #[test]
    fn rates_come_from_the_previous_reading() {
        let mut top = Top::default();
        let t0 = Instant::now();
        let first = top.frame(&[row(100, "SELECT 1")], t0, 200);
        assert!(first.lines().nth(1).unwrap().trim_start().starts_with('-'), "{first}");
        let second = top.frame(&[row(300, "SELECT 1")], t0 + Duration::from_secs(2), 200);
        let line = second.lines().nth(1).unwrap();
        assert!(line.trim_start().starts_with("100.0"), "{line}");
        assert!(line.contains("main.pg1") && line.contains("primary") && line.ends_with("SELECT 1"));
    }

    #[test]
    fn long_queries_are_cut_to_the_width() {
        let mut top = Top::default();
        let long = format!("SELECT {}", "x, ".repeat(100));
        let frame = top.frame(&[row(1, &long)], Instant::now(), 120);
        let line = frame.lines().nth(1).unwrap();
        assert_eq!(line.chars().count(), 120, "{line}");
        assert!(line.ends_with('…'));
        assert!(top.frame(&[], Instant::now(), 80).contains("no statements"));
    }
}
