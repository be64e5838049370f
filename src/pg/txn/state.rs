//! Session settings a transaction-mode client asked for, and how to make a pooled
//! connection match them. The client believes it has one session; it has a series of
//! connections, each carrying whatever the previous user left (`applied`). Before a unit
//! runs, the connection is brought to the client's `desired` state.

use std::collections::BTreeMap;

use crate::pg::classify::SetAction;
use crate::pg::protocol::views::ParameterStatus;

/// Setting name (lower case) → a statement that sets it.
pub type Settings = BTreeMap<String, String>;

pub fn quote_literal(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    push_literal(&mut s, v);
    s
}

/// `v` as a string literal at the end of `out`, its quotes doubled. (Written out rather
/// than `format!` over `replace`: every new transaction-mode client builds one statement
/// per startup setting, and this allocates nothing beyond `out`.)
fn push_literal(out: &mut String, v: &str) {
    out.push('\'');
    for (i, part) in v.split('\'').enumerate() {
        if i > 0 {
            out.push_str("''");
        }
        out.push_str(part);
    }
    out.push('\'');
}

pub fn quote_ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

fn set_config(name: &str, value: &str) -> String {
    let mut s = String::with_capacity(48 + name.len() + value.len());
    s.push_str("SELECT pg_catalog.set_config(");
    push_literal(&mut s, name);
    s.push_str(", ");
    push_literal(&mut s, value);
    s.push_str(", false)");
    s
}

/// The client's startup parameters as the statements that recreate them. `set_config`
/// takes the value as a string, exactly as a startup packet or `-c` does (a list such as
/// `search_path=a,b` stays a list).
pub fn startup_state(params: &[(String, String)]) -> Settings {
    let mut state = Settings::new();
    let mut set = |name: &str, value: &str| {
        let name = name.to_ascii_lowercase();
        state.insert(name.clone(), set_config(&name, value));
    };
    for (k, v) in params {
        if k == "options" {
            // "-c name=value" / "-cname=value" / "--name=value", space separated.
            let mut words = v.split_whitespace();
            while let Some(w) = words.next() {
                let pair = match w {
                    "-c" => words.next(),
                    w if w.starts_with("-c") => Some(&w[2..]),
                    w if w.starts_with("--") => Some(&w[2..]),
                    _ => None,
                };
                if let Some((name, value)) = pair.and_then(|p| p.split_once('=')) {
                    set(&name.replace('-', "_"), value);
                }
            }
        } else {
            set(k, v);
        }
    }
    state
}

/// Reported parameters a client can change for its session (the rest describe the server
/// or are managed by the proxy).
fn client_settable(name: &str) -> bool {
    !matches!(
        name,
        "server_version"
            | "server_encoding"
            | "integer_datetimes"
            | "is_superuser"
            | "session_authorization"
            | "in_hot_standby"
            | "default_transaction_read_only"
            | "scram_iterations"
    )
}

pub struct SessionState {
    /// Shared with the session's `TxnClient`: one copy per client.
    startup: std::sync::Arc<[(String, String)]>,
    /// What the client asked for.
    pub desired: Settings,
    /// SETs of the unit in progress: they count once it ends without error or rollback.
    pending: Vec<SetAction>,
    unit_failed: bool,
    read_only_endpoint: bool,
}

impl SessionState {
    /// `read_only_endpoint`: sessions of the ro endpoint may fall back to the primary;
    /// they stay read-only there too.
    pub fn new(startup: impl Into<std::sync::Arc<[(String, String)]>>, read_only_endpoint: bool) -> SessionState {
        let mut s = SessionState {
            desired: Settings::new(),
            startup: startup.into(),
            pending: Vec::new(),
            unit_failed: false,
            read_only_endpoint,
        };
        s.reset_to_startup();
        s
    }

    fn reset_to_startup(&mut self) {
        self.desired = startup_state(&self.startup);
        if self.read_only_endpoint {
            self.desired.insert(
                "default_transaction_read_only".into(),
                "SET default_transaction_read_only = on".into(),
            );
        }
    }

    /// Statements that bring a connection from `applied` to `desired`, one per setting:
    /// sent as separate Queries, so one that fails cannot take the others with it.
    pub fn replay(&self, applied: &Settings) -> Vec<String> {
        let mut statements: Vec<String> = applied
            .keys()
            .filter(|name| !self.desired.contains_key(*name))
            .map(|name| format!("RESET {}", quote_ident(name)))
            .collect();
        statements.extend(
            self.desired
                .iter()
                .filter(|(name, stmt)| applied.get(*name) != Some(stmt))
                .map(|(_, stmt)| stmt.clone()),
        );
        statements
    }

    /// Every unit goes to the primary (`SET switchyard.route = 'primary'`).
    pub fn routes_to_primary(&self) -> bool {
        self.desired
            .get("switchyard.route")
            .is_some_and(|s| s.to_ascii_lowercase().contains("primary"))
    }

    /// Transactions are SERIALIZABLE by default: a standby refuses them.
    pub fn serializable(&self) -> bool {
        self.desired
            .get("default_transaction_isolation")
            .is_some_and(|s| s.to_ascii_lowercase().contains("serializable"))
    }

    /// A statement of the unit in progress changes settings.
    pub fn observe(&mut self, sets: &[SetAction]) {
        self.pending.extend(sets.iter().cloned());
    }

    /// The unit in progress failed or rolled back: its SETs changed nothing.
    /// No SET of a unit in progress waits to count (the session can be carried).
    pub fn at_rest(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn unit_failed(&mut self) {
        self.unit_failed = true;
    }

    /// A retried unit starts over.
    pub fn unit_restarted(&mut self) {
        self.pending.clear();
        self.unit_failed = false;
    }

    /// A unit ended between transactions (`applied`: the connection's settings): its SETs
    /// count if it ended without error or rollback.
    pub fn settle(&mut self, applied: &mut Settings) {
        let sets = std::mem::take(&mut self.pending);
        if std::mem::replace(&mut self.unit_failed, false) {
            return;
        }
        for s in sets {
            match s {
                SetAction::Set { name, statement } => {
                    applied.insert(name.clone(), statement.clone());
                    self.desired.insert(name, statement);
                }
                SetAction::Reset { name } => {
                    applied.remove(&name);
                    self.desired.remove(&name);
                }
                SetAction::ResetAll => {
                    // RESET ALL brings a direct connection back to its startup values; the
                    // pooled one now has server defaults, and gets those values at the next
                    // replay.
                    applied.clear();
                    self.reset_to_startup();
                }
            }
        }
    }

    /// The server reported a setting's new value in the client's session (SET,
    /// set_config(), RESET, a rolled-back SET undone): the next connection gets it too.
    /// This catches what the classifier cannot see, such as Django's `SELECT
    /// set_config('TimeZone', ...)`. A value that is not UTF-8 is not replayed (it would
    /// be re-sent as text the server reads in the client's encoding).
    pub fn reported(&mut self, s: ParameterStatus, applied: &mut Settings) {
        let (Ok(name), Ok(value)) = (std::str::from_utf8(s.name), std::str::from_utf8(s.value)) else {
            return;
        };
        let name = name.to_ascii_lowercase();
        if client_settable(&name) {
            let stmt = set_config(&name, value);
            applied.insert(name.clone(), stmt.clone());
            self.desired.insert(name, stmt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parameters_become_set_statements() {
        let state = startup_state(&[
            ("application_name".into(), "shop".into()),
            ("TimeZone".into(), "Europe/Paris".into()),
            (
                "options".into(),
                "-c search_path=app,public --work-mem=4MB -cstatement_timeout=5s".into(),
            ),
            ("DateStyle".into(), "ISO, DMY".into()),
        ]);
        let set = |n: &str, v: &str| format!("SELECT pg_catalog.set_config('{n}', '{v}', false)");
        assert_eq!(state["application_name"], set("application_name", "shop"));
        assert_eq!(state["timezone"], set("timezone", "Europe/Paris"));
        assert_eq!(state["search_path"], set("search_path", "app,public"));
        assert_eq!(state["work_mem"], set("work_mem", "4MB"));
        assert_eq!(state["statement_timeout"], set("statement_timeout", "5s"));
        assert_eq!(state["datestyle"], set("datestyle", "ISO, DMY"));
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(""), "''");
        assert_eq!(quote_literal("'a''"), "'''a'''''");
        assert_eq!(
            set_config("search_path", "a, 'b'"),
            "SELECT pg_catalog.set_config('search_path', 'a, ''b''', false)"
        );
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    fn set(name: &str, stmt: &str) -> SetAction {
        SetAction::Set {
            name: name.into(),
            statement: stmt.into(),
        }
    }

    #[test]
    fn a_connection_is_brought_to_what_the_client_asked_for() {
        let s = SessionState::new(vec![("application_name".into(), "shop".into())], true);
        let mut applied = Settings::new();
        applied.insert("work_mem".into(), "SET work_mem = '1MB'".into());
        applied.insert("application_name".into(), s.desired["application_name"].clone());
        assert_eq!(
            s.replay(&applied),
            vec![
                "RESET \"work_mem\"".to_string(),
                "SET default_transaction_read_only = on".to_string()
            ]
        );
    }

    #[test]
    fn sets_count_only_when_their_unit_succeeds() {
        let mut s = SessionState::new(Vec::new(), false);
        let mut applied = Settings::new();
        s.observe(&[set("timezone", "SET TIME ZONE 'UTC'")]);
        s.unit_failed();
        s.settle(&mut applied);
        assert!(s.desired.is_empty() && applied.is_empty());
        s.observe(&[set("timezone", "SET TIME ZONE 'UTC'")]);
        s.settle(&mut applied);
        assert_eq!(s.desired["timezone"], "SET TIME ZONE 'UTC'");
        assert_eq!(applied, s.desired);
        s.observe(&[SetAction::ResetAll]);
        s.settle(&mut applied);
        assert!(s.desired.is_empty() && applied.is_empty());
    }

    #[test]
    fn reported_values_are_kept_for_the_next_connection() {
        let mut s = SessionState::new(Vec::new(), false);
        let mut applied = Settings::new();
        s.reported(
            ParameterStatus {
                name: b"TimeZone",
                value: b"Asia/Tokyo",
            },
            &mut applied,
        );
        assert_eq!(s.desired["timezone"], set_config("timezone", "Asia/Tokyo"));
        // The server's own facts, and values in another encoding, are not replayed.
        s.reported(
            ParameterStatus {
                name: b"server_version",
                value: b"15",
            },
            &mut applied,
        );
        s.reported(
            ParameterStatus {
                name: b"application_name",
                value: b"\xa4",
            },
            &mut applied,
        );
        assert_eq!(s.desired.len(), 1);
        assert!(!s.serializable());
        s.observe(&[set(
            "default_transaction_isolation",
            "SET default_transaction_isolation = 'serializable'",
        )]);
        s.settle(&mut applied);
        assert!(s.serializable());
    }
}
