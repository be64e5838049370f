//! What sessions did to a server connection (`ConnState`), carried with it from client
//! to client through the pool; the machine reads and updates it, so it lives here, with
//! no I/O, and the pool (`pg::pool`) holds one beside each connection.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::pg::protocol::views;

/// The content hashes (`statements::Stmt::hash`) of the statements prepared on a
/// connection. Looked up at every Bind of a named statement, so hashed with foldhash, not
/// SipHash (about 100 instructions per lookup under `bench/instructions`); its seed is
/// random per set, so a client cannot choose hashes that fall into one bucket.
pub type Prepared = HashSet<u64, foldhash::fast::RandomState>;

/// What sessions did to a server connection, carried with it from client to client.
#[derive(Debug, Default)]
pub struct ConnState {
    /// The server backend's pid.
    pub pid: i32,
    /// Prepared statements (by content hash) that exist on this connection.
    pub prepared: Prepared,
    /// SQL-level prepared statements on this connection: the name → the hash of the
    /// PREPARE that made it (`statements::SqlStatements`).
    pub sql_prepared: HashMap<String, u64>,
    /// Session state applied on this connection: setting name → the SET that made it.
    pub applied: BTreeMap<String, String>,
    /// Reported settings (ParameterStatus) as the server last stated them on this
    /// connection: its own spelling (`UTF8` for a client's `utf8`), in the client's
    /// encoding.
    pub reported: crate::pg::greetings::Reported,
}

impl ConnState {
    /// Note a ParameterStatus the server sent on this connection.
    pub fn report(&mut self, s: views::ParameterStatus) {
        match self.reported.get_mut(s.name) {
            Some(v) if **v == *s.value => {}
            Some(v) => *v = s.value.into(),
            None => {
                self.reported.insert(s.name.into(), s.value.into());
            }
        }
    }
}
