//! GTID positions, as fresh reads and the control plane compare them.
//!
//! - MariaDB names a position by the last GTID per replication domain,
//!   `domain-server-sequence` (`0-1-100,1-2-5`). Sequence numbers go on across a
//!   failover within a domain, so "has applied `d-s-n`" is "is at `n` or past it in
//!   domain `d`" (what `MASTER_GTID_WAIT` itself checks).
//! - MySQL names every transaction: a GTID set `uuid:1-5:7-9,uuid2:1-3`, and "has
//!   applied" is set containment (what `WAIT_FOR_EXECUTED_GTID_SET` checks).
//!
//! A causal token carries one of these plus the cluster it belongs to
//! (`Token`); its text uses only `[A-Za-z0-9./-]`, so it fits a cookie, a connection
//! attribute and a SQL string literal as it is.

use std::collections::BTreeMap;
use std::fmt;

/// A MySQL GTID set: per source UUID (with its tag, if any), sorted disjoint
/// intervals of transaction numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GtidSet(BTreeMap<String, Vec<(u64, u64)>>);

impl GtidSet {
    /// `uuid:1-5:7,uuid2:1-3` (MySQL 8.3's tags, `uuid:tag:1-5`, kept with the UUID).
    pub fn parse(text: &str) -> Result<GtidSet, String> {
        let mut set = GtidSet::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut pieces = part.split(':');
            let mut key = pieces.next().unwrap_or_default().to_ascii_lowercase();
            for p in pieces {
                let interval = match p.split_once('-') {
                    Some((a, b)) => a.parse::<u64>().ok().zip(b.parse::<u64>().ok()),
                    None => p.parse::<u64>().ok().map(|a| (a, a)),
                };
                match interval {
                    Some((a, b)) if a <= b => set.insert(&key, a, b),
                    Some(_) => return Err(format!("bad GTID interval {p} in {part}")),
                    None => key = format!("{key}:{}", p.to_ascii_lowercase()),
                }
            }
        }
        Ok(set)
    }

    fn insert(&mut self, key: &str, a: u64, b: u64) {
        let v = self.0.entry(key.to_string()).or_default();
        v.push((a, b));
        v.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for &(a, b) in v.iter() {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        *v = merged;
    }

    pub fn add(&mut self, other: &GtidSet) {
        for (k, ivs) in &other.0 {
            for &(a, b) in ivs {
                self.insert(k, a, b);
            }
        }
    }

    /// What `self` holds that `other` does not.
    pub fn minus(&self, other: &GtidSet) -> GtidSet {
        let mut out = GtidSet::default();
        for (k, ivs) in &self.0 {
            let theirs = other.0.get(k).map(Vec::as_slice).unwrap_or(&[]);
            for &(a, b) in ivs {
                let mut start = a;
                for &(c, d) in theirs {
                    if d < start || c > b {
                        continue;
                    }
                    if c > start {
                        out.insert(k, start, c - 1);
                    }
                    start = start.max(d.saturating_add(1));
                }
                if start <= b {
                    out.insert(k, start, b);
                }
            }
        }
        out
    }

    pub fn count(&self) -> u64 {
        self.0.values().flatten().map(|(a, b)| b - a + 1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for GtidSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (k, ivs) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            f.write_str(k)?;
            for (a, b) in ivs {
                if a == b {
                    write!(f, ":{a}")?;
                } else {
                    write!(f, ":{a}-{b}")?;
                }
            }
        }
        Ok(())
    }
}

impl GtidSet {
    /// Does `self` hold every transaction of `other`?
    pub fn contains(&self, other: &GtidSet) -> bool {
        other.minus(self).is_empty()
    }
}

/// A MariaDB GTID position: per replication domain, the last (server id, sequence).
pub fn mariadb_pos(text: &str) -> BTreeMap<u32, (u32, u64)> {
    text.split(',')
        .filter_map(|p| {
            let mut it = p.trim().splitn(3, '-');
            Some((
                it.next()?.parse().ok()?,
                (it.next()?.parse().ok()?, it.next()?.parse().ok()?),
            ))
        })
        .collect()
}

/// What a read must see, or what a replica has applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// MariaDB: per domain, the last (server id, sequence).
    Maria(BTreeMap<u32, (u32, u64)>),
    /// MySQL: a GTID set.
    My(GtidSet),
}

impl Position {
    /// A position as the server writes it (`@@gtid_current_pos`, `last_gtid`,
    /// `@@gtid_executed`); None for the empty text (nothing written yet) or one that
    /// does not parse.
    pub fn parse(maria: bool, text: &str) -> Option<Position> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        if maria {
            let pos = mariadb_pos(text);
            let parts = text.split(',').filter(|p| !p.trim().is_empty()).count();
            (!pos.is_empty() && pos.len() == parts).then_some(Position::Maria(pos))
        } else {
            GtidSet::parse(text).ok().filter(|s| !s.is_empty()).map(Position::My)
        }
    }

    /// Has a server at `self` applied everything up to `need`? Positions of the other
    /// engine never cover each other.
    pub fn covers(&self, need: &Position) -> bool {
        match (self, need) {
            (Position::Maria(have), Position::Maria(need)) => {
                need.iter().all(|(d, (_, n))| have.get(d).is_some_and(|(_, h)| h >= n))
            }
            (Position::My(have), Position::My(need)) => have.contains(need),
            _ => false,
        }
    }

    /// A position at least as demanding as both (per domain the later sequence; the
    /// union of sets). Positions of different engines cannot meet: the later one wins.
    pub fn join(a: Option<Position>, b: Option<&Position>) -> Option<Position> {
        match (a, b) {
            (Some(Position::Maria(mut x)), Some(Position::Maria(y))) => {
                for (d, (s, n)) in y {
                    match x.get(d) {
                        Some((_, m)) if m >= n => {}
                        _ => {
                            x.insert(*d, (*s, *n));
                        }
                    }
                }
                Some(Position::Maria(x))
            }
            (Some(Position::My(mut x)), Some(Position::My(y))) => {
                x.add(y);
                Some(Position::My(x))
            }
            (_, Some(b)) => Some(b.clone()),
            (a, None) => a,
        }
    }

    /// The server's own text form (for `MASTER_GTID_WAIT`, `WAIT_FOR_EXECUTED_GTID_SET`).
    pub fn to_server_text(&self) -> String {
        match self {
            Position::Maria(m) => m
                .iter()
                .map(|(d, (s, n))| format!("{d}-{s}-{n}"))
                .collect::<Vec<_>>()
                .join(","),
            Position::My(set) => set.to_string(),
        }
    }
}

/// A name's 64-bit FNV-1a hash: a cluster's identity in its tokens. (MySQL has no
/// cluster-wide identifier like PostgreSQL's system identifier; the cluster's name
/// in the config is what every Switchyard instance in front of it shares.)
pub fn cluster_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A causal token of a MySQL cluster: `sy1.m<cluster>.<d>-<s>-<n>/...` (MariaDB) or
/// `sy1.y<cluster>.<uuid>.<a>-<b>.../...` (MySQL), cluster in hex. The server's `,`
/// becomes `/` and MySQL's `:` becomes `.`, so the text needs no quoting anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub cluster: u64,
    pub position: Position,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    /// A PostgreSQL cluster's token.
    Postgres,
    OtherCluster,
    /// A MariaDB token on a MySQL cluster or the reverse.
    OtherEngine,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => {
                "invalid value for @switchyard_causal_token: not a token from SELECT @switchyard_causal_token"
            }
            TokenError::Postgres => {
                "@switchyard_causal_token is a PostgreSQL cluster's token; use a token from this cluster's connections"
            }
            TokenError::OtherCluster => {
                "@switchyard_causal_token comes from another cluster; use a token from this cluster's connections"
            }
            TokenError::OtherEngine => {
                "@switchyard_causal_token comes from a cluster of the other engine (MariaDB vs MySQL); use a token from this cluster's connections"
            }
        })
    }
}

impl Token {
    pub fn encode(&self) -> String {
        let (tag, body) = match &self.position {
            Position::Maria(_) => ('m', self.position.to_server_text().replace(',', "/")),
            Position::My(set) => ('y', set.to_string().replace(',', "/").replace(':', ".")),
        };
        format!("sy1.{tag}{:x}.{body}", self.cluster)
    }

    pub fn parse(text: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        let rest = text.strip_prefix("sy1.").ok_or(TokenError::Malformed)?;
        let (head, body) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        let mut chars = head.chars();
        let tag = chars.next().ok_or(TokenError::Malformed)?;
        let cluster = chars.as_str();
        if !matches!(tag, 'm' | 'y') {
            // `sy1.<system id>.<timeline>.<lsn>`, all hex: PostgreSQL's.
            let hex = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit());
            let fields: Vec<&str> = rest.split('.').collect();
            return Err(if fields.len() == 3 && fields.iter().all(|f| hex(f)) {
                TokenError::Postgres
            } else {
                TokenError::Malformed
            });
        }
        let cluster = (!cluster.is_empty() && cluster.len() <= 16)
            .then(|| u64::from_str_radix(cluster, 16).ok())
            .flatten()
            .ok_or(TokenError::Malformed)?;
        if body.is_empty() || !body.bytes().all(|b| b.is_ascii_alphanumeric() || b"./-".contains(&b)) {
            return Err(TokenError::Malformed);
        }
        let position = match tag {
            'm' => Position::parse(true, &body.replace('/', ",")),
            'y' => {
                // Each `uuid.a-b.c` back to `uuid:a-b:c`.
                let text = body.replace('/', ",").replace('.', ":");
                Position::parse(false, &text)
            }
            _ => return Err(TokenError::Malformed),
        }
        .ok_or(TokenError::Malformed)?;
        Ok(Token { cluster, position })
    }

    /// The token's position, if it belongs to the cluster `cluster` whose servers are
    /// MariaDB (`maria`) or MySQL.
    pub fn check(&self, cluster: u64, maria: Option<bool>) -> Result<&Position, TokenError> {
        if self.cluster != cluster {
            return Err(TokenError::OtherCluster);
        }
        match (maria, &self.position) {
            (Some(true), Position::My(_)) | (Some(false), Position::Maria(_)) => Err(TokenError::OtherEngine),
            _ => Ok(&self.position),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(text: &str) -> Position {
        Position::parse(true, text).unwrap()
    }
    fn y(text: &str) -> Position {
        Position::parse(false, text).unwrap()
    }

    #[test]
    fn mariadb_positions_compare_per_domain() {
        assert!(m("0-1-100").covers(&m("0-1-100")));
        assert!(m("0-1-101").covers(&m("0-1-100")));
        assert!(!m("0-1-99").covers(&m("0-1-100")));
        // After a failover the new primary writes under its own server id, and the
        // sequence goes on: 0-2-101 is past 0-1-100.
        assert!(m("0-2-101").covers(&m("0-1-100")));
        // A domain the replica has not seen is not applied.
        assert!(!m("0-1-500").covers(&m("0-1-100,1-3-1")));
        assert!(m("0-1-500,1-3-2").covers(&m("0-1-100,1-3-1")));
        assert_eq!(
            Position::join(Some(m("0-1-100,1-3-7")), Some(&m("0-2-120,1-3-5,2-4-1"))),
            Some(m("0-2-120,1-3-7,2-4-1"))
        );
        assert_eq!(m("1-3-7,0-1-100").to_server_text(), "0-1-100,1-3-7");
        assert_eq!(Position::parse(true, ""), None);
        assert_eq!(Position::parse(true, "0-1-x"), None, "a malformed part is no position");
    }

    #[test]
    fn mysql_positions_compare_as_sets() {
        let u = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        let v = "4e11fa47-71ca-11e1-9e33-c80aa9429562";
        assert!(y(&format!("{u}:1-10")).covers(&y(&format!("{u}:5"))));
        assert!(!y(&format!("{u}:1-4:6-10")).covers(&y(&format!("{u}:5"))), "a gap");
        assert!(!y(&format!("{u}:1-10")).covers(&y(&format!("{v}:1"))));
        assert_eq!(
            Position::join(Some(y(&format!("{u}:1-3"))), Some(&y(&format!("{u}:4-6,{v}:1")))),
            Some(y(&format!("{u}:1-6,{v}:1")))
        );
        assert!(!m("0-1-1").covers(&y(&format!("{u}:1"))), "engines never mix");
    }

    #[test]
    fn tokens_round_trip_and_name_their_cluster() {
        let id = cluster_id("main");
        assert_ne!(id, cluster_id("other"));
        for position in [
            m("0-1-100,1-3-7"),
            y("3E11FA47-71CA-11E1-9E33-C80AA9429562:1-5:11-18,4e11fa47-71ca-11e1-9e33-c80aa9429562:1"),
        ] {
            let token = Token {
                cluster: id,
                position: position.clone(),
            };
            let text = token.encode();
            assert!(
                text.starts_with("sy1.") && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"./-".contains(&b)),
                "{text}"
            );
            let back = Token::parse(&text).unwrap();
            assert_eq!(back, token);
            let maria = matches!(position, Position::Maria(_));
            assert_eq!(back.check(id, Some(maria)), Ok(&position));
            assert_eq!(back.check(id, Some(!maria)), Err(TokenError::OtherEngine));
            assert_eq!(back.check(cluster_id("other"), None), Err(TokenError::OtherCluster));
        }
        assert_eq!(Token::parse("sy1.1b2f.1.3000148"), Err(TokenError::Postgres));
        assert_eq!(Token::parse("sy1.c1b2f.1.3000148"), Err(TokenError::Postgres));
        for bad in [
            "",
            "sy1.",
            "sy1.m.0-1-1",
            "sy1.mzz.0-1-1",
            "sy1.m1.",
            "sy1.m1.0-1-x",
            "sy2.m1.0-1-1",
            "sy1.m1.0-1-1'",
        ] {
            assert_eq!(Token::parse(bad), Err(TokenError::Malformed), "{bad:?}");
        }
    }
}
