//! The digest tables: buckets, quantiles, merging, eviction, per-place totals.
use super::*;

/// A sample's place key, as `record` computes it.
fn pk(s: &Sample<'_>) -> u64 {
    Place {
        cluster: s.cluster,
        node: s.node,
        addr: "",
        on_primary: s.on_primary,
        route: s.route,
        database: "",
        system: "postgresql",
    }
    .key()
}

fn rec(r: &mut Recorder<'_>, s: Sample<'_>) {
    r.record(pk(&s), s);
}

fn sample<'a>(d: &'a Arc<Digest>, node: &'a str, micros: u64) -> Sample<'a> {
    Sample {
        cluster: "main",
        node,
        on_primary: node == "a",
        route: if node == "a" { Route::Primary } else { Route::Split },
        digest: d,
        micros,
        rows: 1,
        failed: false,
    }
}

#[test]
fn buckets_are_ordered_and_cover_their_values() {
    for v in [0u64, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 100, 1_000, 65_535, 1 << 20] {
        let b = bucket(v);
        assert!(bucket_floor(b) <= v, "{v} below its bucket {b}");
        if b + 1 < BUCKETS {
            assert!(v < bucket_floor(b + 1), "{v} above its bucket {b}");
        }
    }
    assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    assert!((1..BUCKETS).all(|i| bucket_floor(i) > bucket_floor(i - 1)));
}

#[test]
fn samples_merge_per_statement_node_and_route() {
    let d = Arc::new(Digest::new(7, "SELECT  *\n FROM t WHERE id = $1"));
    let other = Arc::new(Digest::new(8, "INSERT INTO t VALUES ($1)"));
    let digests = Digests::new(2, true, 100);
    // Two workers, two nodes.
    for (worker, node, us) in [(0, "a", 100), (1, "a", 300), (0, "b", 50), (1, "b", 50)] {
        rec(&mut digests.lock(worker), sample(&d, node, us));
    }
    let mut r = digests.lock(0);
    rec(
        &mut r,
        Sample {
            failed: true,
            rows: 0,
            ..sample(&other, "a", 1_000)
        },
    );
    drop(r);
    let rows = digests.rows(Some("main"), Grouping::Node, Order::TotalTime, 10);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].query, "INSERT INTO t VALUES ($1)");
    assert_eq!((rows[0].calls, rows[0].errors, rows[0].rows), (1, 1, 0));
    let on_a = &rows[1];
    assert_eq!(on_a.query, "SELECT * FROM t WHERE id = $1");
    assert_eq!(
        (on_a.node.as_deref(), on_a.role, on_a.route),
        (Some("a"), Some("primary"), Some(Route::Primary))
    );
    assert_eq!((on_a.calls, on_a.rows), (2, 2));
    assert_eq!(
        (on_a.total_time_ms, on_a.min_time_ms, on_a.max_time_ms),
        (0.4, 0.1, 0.3)
    );
    assert_eq!(rows[2].route, Some(Route::Split));
    let by_query = digests.rows(None, Grouping::Query, Order::Calls, 10);
    assert_eq!(by_query.len(), 2);
    assert_eq!((by_query[0].calls, by_query[0].node.as_deref()), (4, None));
    assert!(digests.rows(Some("other"), Grouping::Node, Order::Calls, 10).is_empty());
    assert_eq!(digests.rows(None, Grouping::Node, Order::Calls, 1).len(), 1);
}

#[test]
fn quantiles_stay_within_a_bucket_and_the_observed_range() {
    let d = Arc::new(Digest::new(1, "SELECT 1"));
    let digests = Digests::new(1, true, 10);
    let mut r = digests.lock(0);
    for us in 1..=1000u64 {
        rec(&mut r, sample(&d, "a", us));
    }
    drop(r);
    let row = &digests.rows(None, Grouping::Query, Order::Calls, 1)[0];
    assert!((0.375..=0.625).contains(&row.p50_ms), "p50 {}", row.p50_ms);
    assert!((0.9..=1.0).contains(&row.p99_ms), "p99 {}", row.p99_ms);
    assert_eq!(row.max_time_ms, 1.0);
}

#[test]
fn a_full_table_evicts_its_least_called_entries() {
    let digests = Digests::new(1, true, 20);
    let hot = Arc::new(Digest::new(0, "SELECT hot"));
    let mut r = digests.lock(0);
    for _ in 0..5 {
        rec(&mut r, sample(&hot, "a", 10));
    }
    for id in 1..=100 {
        let d = Arc::new(Digest::new(id, "SELECT cold"));
        rec(&mut r, sample(&d, "a", 10));
    }
    drop(r);
    let (held, evicted) = digests.counts();
    assert!(held <= 20, "{held} entries held");
    assert_eq!(held + evicted, 101);
    let rows = digests.rows(None, Grouping::Node, Order::Calls, 1);
    assert_eq!((rows[0].query.as_str(), rows[0].calls), ("SELECT hot", 5));
    digests.reset();
    assert_eq!(digests.counts().0, 0);
}

#[test]
fn texts_are_collapsed_and_cut() {
    assert_eq!(&*Digest::new(1, "  SELECT\t1\n\n FROM  t ").text, "SELECT 1 FROM t");
    let long = format!("SELECT {}", "é, ".repeat(2000));
    let d = Digest::new(1, &long);
    assert!(d.text.len() <= MAX_TEXT + '…'.len_utf8());
    assert!(d.text.ends_with('…'));
}

#[test]
fn places_count_every_sample_and_survive_a_reset() {
    let digests = Digests::new(2, true, 1);
    let (a, b) = (Arc::new(Digest::new(1, "A")), Arc::new(Digest::new(2, "B")));
    rec(&mut digests.lock(0), sample(&a, "a", 100));
    rec(&mut digests.lock(1), sample(&b, "a", 3_000));
    rec(
        &mut digests.lock(1),
        Sample {
            failed: true,
            ..sample(&b, "a", 5)
        },
    );
    digests.reset();
    let rows = digests.place_rows();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(
        (r.calls, r.errors, r.rows, r.role, r.route),
        (3, 1, 3, "primary", Route::Primary)
    );
    // Cumulative: 5 µs and 100 µs are under 128 µs; 3 ms under 4.096 ms.
    let at = |le: f64| {
        r.buckets
            .iter()
            .take_while(|(b, _)| *b <= le + 1e-9)
            .map(|b| b.1)
            .sum::<u64>()
    };
    assert_eq!((at(0.000064), at(0.000128), at(0.002048), at(0.004096)), (1, 2, 2, 3));
    assert_eq!(r.buckets.last(), Some(&(f64::MAX, 0)));
}

#[test]
fn orders_parse_and_unknown_ones_are_named() {
    assert_eq!("p99".parse::<Order>(), Ok(Order::P99));
    assert!("fastest".parse::<Order>().unwrap_err().contains("total_time"));
}
