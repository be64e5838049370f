//! Greetings remembered (transaction pooling). A transaction-mode client is greeted with
//! the ParameterStatus a server reports once the client's startup settings are applied;
//! getting them takes a pooled server connection. The answer depends only on who logs
//! in, where, and with which startup settings, so it is kept per (user, database,
//! endpoint, startup settings) and the next client with the same startup is greeted at
//! once, without a server connection: a login storm after a failover, or a client that
//! logs in and out in a loop, costs the pool nothing, and a client can log in while every
//! pooled connection is busy (its first transaction then waits for one, as any does).
//!
//! An entry lives `TTL`, so a server upgraded in place or a setting changed with
//! `ALTER ROLE ... SET` shows in new clients' greetings within that time; the number of
//! entries is bounded (clients that put a pid into `application_name` would otherwise
//! grow it without end). A client's first transaction always runs on a real connection
//! brought to its settings, as before: only the greeting's values can be that old.

use std::collections::{BTreeMap, HashMap};

use bytes::{Bytes, BytesMut};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Reported settings, name → value, in the server's spelling (`ConnState::reported`).
pub type Reported = BTreeMap<Box<[u8]>, Box<[u8]>>;

/// The ParameterStatus messages that tell a client `reported`: what a greeting sends
/// before BackendKeyData. Remembered greetings are kept encoded, so a client greeted from
/// one gets a copy of bytes rather than a message built per setting (about 4,000
/// instructions per login for the 14 settings PostgreSQL reports).
pub fn encode(reported: &Reported) -> Bytes {
    let size = reported.iter().map(|(n, v)| 7 + n.len() + v.len()).sum();
    let mut out = BytesMut::with_capacity(size);
    for (name, value) in reported {
        crate::pg::protocol::messages::parameter_status_bytes(&mut out, name, value);
    }
    out.freeze()
}

/// How long a remembered greeting is used.
pub const TTL: Duration = Duration::from_secs(30);
/// At most this many remembered greetings per cluster.
pub const MAX_ENTRIES: usize = 1024;

/// Who logs in where, with which startup settings (borrowed: a lookup allocates nothing).
#[derive(Clone, Copy)]
pub struct Who<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub read_only: bool,
    pub startup: &'a [(String, String)],
}

impl Who<'_> {
    fn same(&self, k: &Key) -> bool {
        self.user == k.user
            && self.database == k.database
            && self.read_only == k.read_only
            && self.startup == &*k.startup
    }

    fn hash(&self, s: &RandomState) -> u64 {
        s.hash_one((self.user, self.database, self.read_only, self.startup))
    }
}

struct Key {
    user: String,
    database: String,
    read_only: bool,
    startup: Box<[(String, String)]>,
}

struct Entry {
    key: Key,
    /// `encode`d.
    status: Bytes,
    at: Instant,
}

/// One cluster's remembered greetings (`PgCluster::greetings`).
#[derive(Default)]
pub struct Greetings {
    hasher: RandomState,
    entries: Mutex<HashMap<u64, Entry>>,
}

impl Greetings {
    /// The greeting remembered for `who`, if younger than `TTL` at `now`: its
    /// ParameterStatus messages (`encode`).
    pub fn get(&self, who: Who, now: Instant) -> Option<Bytes> {
        let h = who.hash(&self.hasher);
        let entries = self.entries.lock().unwrap();
        let e = entries.get(&h)?;
        (who.same(&e.key) && now.saturating_duration_since(e.at) < TTL).then(|| e.status.clone())
    }

    /// Remember what a server reported to `who`'s greeting. When full, expired entries
    /// go first; if none has, the new one is not kept (the next such client asks a
    /// server again, as without this cache).
    pub fn put(&self, who: Who, reported: &Reported, now: Instant) {
        let h = who.hash(&self.hasher);
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&h) {
            entries.retain(|_, e| now.saturating_duration_since(e.at) < TTL);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(
            h,
            Entry {
                key: Key {
                    user: who.user.to_owned(),
                    database: who.database.to_owned(),
                    read_only: who.read_only,
                    startup: who.startup.into(),
                },
                status: encode(reported),
                at: now,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(v: &str) -> Reported {
        let mut r = Reported::new();
        r.insert(b"server_version"[..].into(), v.as_bytes().into());
        r
    }

    fn who<'a>(user: &'a str, startup: &'a [(String, String)]) -> Who<'a> {
        Who {
            user,
            database: "app",
            read_only: false,
            startup,
        }
    }

    #[test]
    fn a_greeting_is_kept_for_the_same_login_only_and_for_ttl() {
        let g = Greetings::default();
        let t0 = Instant::now();
        let a = vec![("application_name".to_string(), "web".to_string())];
        let b = vec![("application_name".to_string(), "worker".to_string())];
        assert!(g.get(who("u", &a), t0).is_none());
        g.put(who("u", &a), &reported("17.2"), t0);
        assert_eq!(
            g.get(who("u", &a), t0 + Duration::from_secs(1)).unwrap(),
            &b"S\0\0\0\x18server_version\x0017.2\0"[..]
        );
        assert!(g.get(who("u", &b), t0).is_none(), "other startup settings");
        assert!(g.get(who("v", &a), t0).is_none(), "other user");
        let ro = Who {
            read_only: true,
            ..who("u", &a)
        };
        assert!(g.get(ro, t0).is_none(), "other endpoint");
        assert!(g.get(who("u", &a), t0 + TTL).is_none(), "expired");
    }

    #[test]
    fn the_number_of_greetings_is_bounded_and_expired_ones_make_room() {
        let g = Greetings::default();
        let t0 = Instant::now();
        let startups: Vec<Vec<(String, String)>> = (0..=MAX_ENTRIES)
            .map(|i| vec![("application_name".to_string(), format!("pid {i}"))])
            .collect();
        for s in &startups[..MAX_ENTRIES] {
            g.put(who("u", s), &reported("17"), t0);
        }
        g.put(who("u", &startups[MAX_ENTRIES]), &reported("17"), t0);
        assert_eq!(g.len(), MAX_ENTRIES);
        assert!(g.get(who("u", &startups[MAX_ENTRIES]), t0).is_none(), "full: not kept");
        g.put(who("u", &startups[MAX_ENTRIES]), &reported("17"), t0 + TTL);
        assert_eq!(g.len(), 1, "the expired ones made room");
        assert!(g.get(who("u", &startups[MAX_ENTRIES]), t0 + TTL).is_some());
    }
}
