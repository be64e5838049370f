//! One error for whatever refuses or ends a client's request: the SQLSTATE the client
//! gets, a sentence it can act on, which side failed, and whether another node may
//! succeed where this one failed. SQLSTATEs are chosen here, by constructor, and
//! nowhere else; the rest of the proxy says *what* happened.

use std::fmt;

use bytes::Bytes;

/// A SQLSTATE: five ASCII characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState([u8; 5]);

impl SqlState {
    pub const PROTOCOL_VIOLATION: SqlState = SqlState(*b"08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState(*b"08006");
    pub const TRANSACTION_RESOLUTION_UNKNOWN: SqlState = SqlState(*b"08007");
    pub const INVALID_PASSWORD: SqlState = SqlState(*b"28P01");
    pub const INVALID_AUTHORIZATION: SqlState = SqlState(*b"28000");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState(*b"0A000");
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState(*b"57P03");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState(*b"57P01");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState(*b"53300");
    pub const IDLE_IN_TRANSACTION_TIMEOUT: SqlState = SqlState(*b"25P03");
    pub const QUERY_CANCELED: SqlState = SqlState(*b"57014");
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState(*b"42501");
    pub const SYNTAX_ERROR: SqlState = SqlState(*b"42601");
    pub const READ_ONLY_SQL_TRANSACTION: SqlState = SqlState(*b"25006");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState(*b"22023");
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState(*b"55000");

    /// A code a server sent; anything that is not five ASCII characters is not one.
    pub fn parse(code: &[u8]) -> Option<SqlState> {
        let code: [u8; 5] = code.try_into().ok()?;
        code.iter().all(u8::is_ascii_alphanumeric).then_some(SqlState(code))
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII.
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }

    /// The class (first two characters), e.g. `08` connection exception.
    pub fn class(&self) -> &str {
        &self.as_str()[..2]
    }

    /// A server's warning or error of class 57 (operator intervention: shutdown,
    /// crash of another backend): the connection is about to go. A read that has not
    /// been answered may move to another node.
    pub fn server_going_away(&self) -> bool {
        self.class() == "57"
    }

    /// How a standby refuses what a primary would run: 0A000 (reads of unlogged or
    /// temporary tables, SERIALIZABLE in hot standby) and 25006 (a statement taken for a
    /// read that writes after all). A split read refused so, before its answer reached
    /// the client, runs again on the primary.
    pub fn only_a_primary_runs_it(&self) -> bool {
        *self == SqlState::FEATURE_NOT_SUPPORTED || *self == SqlState::READ_ONLY_SQL_TRANSACTION
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SqlState({})", self.as_str())
    }
}

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something wrong (bad message, bad password).
    Client,
    /// A server failed or refused.
    Server,
    /// The proxy's own decision (no node to route to, pool exhausted, shutdown).
    Proxy,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    code: SqlState,
    message: String,
    side: Side,
    retry_elsewhere: bool,
    /// The proxy ran out of a local resource (file descriptors) opening a server
    /// connection: worth trying again shortly, not elsewhere.
    retry_soon: bool,
    /// A server's own ErrorResponse (a refused login), passed to the client unchanged.
    raw: Option<Bytes>,
    /// A MySQL server's own error number and SQLSTATE (a refused login), passed on.
    mysql: Option<MysqlCode>,
}

/// MySQL 8's ER_CLIENT_INTERACTION_TIMEOUT: what its server says when `wait_timeout`
/// ends an idle client.
const CLIENT_INTERACTION_TIMEOUT: MysqlCode = MysqlCode {
    number: 4031,
    state: *b"HY000",
};

/// A MySQL error as a client sees it: error number and SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MysqlCode {
    pub number: u16,
    pub state: [u8; 5],
}

impl Error {
    fn new(code: SqlState, side: Side, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
            side,
            retry_elsewhere: false,
            retry_soon: false,
            raw: None,
            mysql: None,
        }
    }

    /// A malformed, unexpected or oversized message from the client.
    pub fn protocol(message: impl Into<String>) -> Error {
        Error::new(SqlState::PROTOCOL_VIOLATION, Side::Client, message)
    }

    /// Something the client asked for that Switchyard does not do.
    pub fn unsupported(message: impl Into<String>) -> Error {
        Error::new(SqlState::FEATURE_NOT_SUPPORTED, Side::Client, message)
    }

    /// A wrong password or a failed SCRAM proof.
    pub fn auth_failed(message: impl Into<String>) -> Error {
        Error::new(SqlState::INVALID_PASSWORD, Side::Client, message)
    }

    /// A user the proxy does not know, or no user at all.
    pub fn not_authorized(message: impl Into<String>) -> Error {
        Error::new(SqlState::INVALID_AUTHORIZATION, Side::Client, message)
    }

    /// Nothing to route to now (no primary, every node down or drained); the client may
    /// come back later.
    pub fn no_route(message: impl Into<String>) -> Error {
        Error::new(SqlState::CANNOT_CONNECT_NOW, Side::Proxy, message)
    }

    /// Servers were tried and none could be reached or logged in to.
    pub fn connect_failed(message: impl Into<String>) -> Error {
        Error {
            retry_elsewhere: true,
            ..Error::new(SqlState::CONNECTION_FAILURE, Side::Server, message)
        }
    }

    /// Connecting to a server failed with `e`: out of file descriptors here (the proxy's
    /// own limit, not the server's fault) is 53300 and tried again shortly
    /// (`is_out_of_descriptors`); anything else is `connect_failed`.
    pub fn server_connect(what: impl fmt::Display, e: &std::io::Error) -> Error {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => Error {
                retry_soon: true,
                ..Error::new(
                    SqlState::TOO_MANY_CONNECTIONS,
                    Side::Proxy,
                    format!("{what}: Switchyard is out of file descriptors ({e}); retry, or raise its limit (LimitNOFILE=, ulimit -n) or lower proxy.max_clients"),
                )
            },
            _ => Error::connect_failed(format!("{what}: {e}")),
        }
    }

    /// The proxy ran out of file descriptors opening a server connection: another node
    /// would fare no better, and one may be free a moment later.
    pub fn is_out_of_descriptors(&self) -> bool {
        self.retry_soon
    }

    /// A server refused a login for a reason another node would share (an
    /// authentication method the proxy cannot answer).
    pub fn login_failed(message: impl Into<String>) -> Error {
        Error::new(SqlState::CONNECTION_FAILURE, Side::Server, message)
    }

    /// A server connection broke during the session.
    pub fn server_lost(cluster: &str, node: &str, reason: impl fmt::Display) -> Error {
        Error {
            retry_elsewhere: true,
            ..Error::new(
                SqlState::CONNECTION_FAILURE,
                Side::Server,
                format!("server connection to node \"{node}\" of cluster \"{cluster}\" was lost: {reason}"),
            )
        }
    }

    /// The server was lost while a commit was in flight: it may or may not have
    /// committed. Never retried (it could run twice).
    pub fn resolution_unknown(cluster: &str, node: &str, reason: impl fmt::Display) -> Error {
        Error::new(
            SqlState::TRANSACTION_RESOLUTION_UNKNOWN,
            Side::Server,
            format!("server connection to node \"{node}\" of cluster \"{cluster}\" was lost while a commit was in flight ({reason}): whether the transaction committed is unknown; check before running it again"),
        )
    }

    /// A server sent something the proxy cannot follow.
    pub fn server_protocol(message: impl Into<String>) -> Error {
        Error::new(SqlState::PROTOCOL_VIOLATION, Side::Server, message)
    }

    /// A server refused the login with its own ErrorResponse (`raw`), which the client
    /// gets unchanged. Another node may do better only when this one could not serve
    /// anyone: starting up or shutting down (57P03), too many connections (53300), a
    /// connection exception (08); not for an unknown database or a bad password.
    pub fn server_refused(code: &[u8], message: impl Into<String>, raw: Bytes) -> Error {
        let code = SqlState::parse(code).unwrap_or(SqlState::CONNECTION_FAILURE);
        Error {
            retry_elsewhere: code == SqlState::CANNOT_CONNECT_NOW
                || code == SqlState::TOO_MANY_CONNECTIONS
                || code.class() == "08",
            raw: Some(raw),
            ..Error::new(code, Side::Server, message)
        }
    }

    /// A MySQL server refused a login (or the proxy's checks on a new connection) with
    /// its own error. Another node may do better for the errors that say this one cannot
    /// serve anyone: too many connections (1040), shutting down (1053), a host blocked
    /// (1129/1130 are not: the same user is refused everywhere).
    pub fn mysql_server_refused(number: u16, state: [u8; 5], message: impl Into<String>) -> Error {
        let code = SqlState::parse(&state).unwrap_or(SqlState::CONNECTION_FAILURE);
        Error {
            retry_elsewhere: matches!(number, 1040 | 1053 | 1927) || code.class() == "08",
            mysql: Some(MysqlCode { number, state }),
            ..Error::new(code, Side::Server, message)
        }
    }

    /// No pooled server connection became free in time.
    pub fn pool_exhausted(message: impl Into<String>) -> Error {
        Error::new(SqlState::TOO_MANY_CONNECTIONS, Side::Proxy, message)
    }

    /// A client over one of the proxy's client limits (`proxy::limits`).
    pub fn too_many_clients(message: impl Into<String>) -> Error {
        Error::new(SqlState::TOO_MANY_CONNECTIONS, Side::Proxy, message)
    }

    /// A client over its user's limit: MySQL clients get ER_TOO_MANY_USER_CONNECTIONS.
    pub fn too_many_clients_of_user(message: impl Into<String>) -> Error {
        Error {
            mysql: Some(MysqlCode {
                number: 1203,
                state: *b"42000",
            }),
            ..Error::new(SqlState::TOO_MANY_CONNECTIONS, Side::Proxy, message)
        }
    }

    /// A client idle in a transaction past `idle_transaction_timeout_ms`.
    pub fn idle_in_transaction(message: impl Into<String>) -> Error {
        Error {
            mysql: Some(CLIENT_INTERACTION_TIMEOUT),
            ..Error::new(SqlState::IDLE_IN_TRANSACTION_TIMEOUT, Side::Proxy, message)
        }
    }

    /// A query stopped by `query_timeout_ms` (MySQL: ER_QUERY_INTERRUPTED).
    pub fn query_canceled(message: impl Into<String>) -> Error {
        Error {
            mysql: Some(MysqlCode {
                number: 1317,
                state: *b"70100",
            }),
            ..Error::new(SqlState::QUERY_CANCELED, Side::Proxy, message)
        }
    }

    /// A client idle past `client_idle_timeout_ms` (57P01, as an administrator's
    /// disconnect).
    pub fn client_idle(message: impl Into<String>) -> Error {
        Error {
            mysql: Some(CLIENT_INTERACTION_TIMEOUT),
            ..Error::new(SqlState::ADMIN_SHUTDOWN, Side::Proxy, message)
        }
    }

    /// The session's node is no longer a valid place for it. `node_up`: it is healthy
    /// but changed role or was drained (the operator's doing), else it is down.
    pub fn evicted(node_up: bool, reason: impl fmt::Display) -> Error {
        let code = if node_up {
            SqlState::ADMIN_SHUTDOWN
        } else {
            SqlState::CONNECTION_FAILURE
        };
        Error::new(code, Side::Proxy, format!("terminating connection: {reason}"))
    }

    /// An admin console command the user may not run.
    pub fn insufficient_privilege(message: impl Into<String>) -> Error {
        Error::new(SqlState::INSUFFICIENT_PRIVILEGE, Side::Client, message)
    }

    /// A setting the proxy handles itself was given a value it cannot use (a causal
    /// token that is malformed or from another cluster).
    pub fn invalid_parameter(message: impl Into<String>) -> Error {
        Error::new(SqlState::INVALID_PARAMETER_VALUE, Side::Client, message)
    }

    /// A session-mode connection's node is not as fresh as the client asked, and the
    /// session cannot move.
    pub fn not_fresh(message: impl Into<String>) -> Error {
        Error::new(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, Side::Proxy, message)
    }

    /// An admin console command that is not one.
    pub fn syntax(message: impl Into<String>) -> Error {
        Error::new(SqlState::SYNTAX_ERROR, Side::Client, message)
    }

    /// A client too far behind its LISTEN notifications (`pg::notify::QUEUE`).
    pub fn notifications_behind() -> Error {
        Error::new(
            SqlState(*b"53400"),
            Side::Proxy,
            "terminating connection: more notifications waited for this client than Switchyard keeps (1024); read them sooner (between transactions), or LISTEN on fewer channels",
        )
    }

    pub fn shutdown() -> Error {
        Error::new(
            SqlState::ADMIN_SHUTDOWN,
            Side::Proxy,
            "terminating connection: Switchyard is shutting down (this process stops, or a new binary replaced it); reconnect",
        )
    }

    /// The client's cluster was removed from the config by a reload.
    pub fn cluster_removed(cluster: &str) -> Error {
        Error::new(
            SqlState::ADMIN_SHUTDOWN,
            Side::Proxy,
            format!("terminating connection: cluster \"{cluster}\" was removed from Switchyard's configuration (a reload); it is no longer served here"),
        )
    }

    pub fn code(&self) -> SqlState {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// May another node succeed where this failed (nothing the client did is at fault)?
    pub fn retry_elsewhere(&self) -> bool {
        self.retry_elsewhere
    }

    /// A standby refused a login for something replication may not have brought it yet:
    /// a database (3D000) or role (28000) just created on the primary. The next
    /// candidate (another standby, the primary) may have it.
    pub fn standby_behind(&self) -> bool {
        (self.raw.is_some() && (self.code == SqlState(*b"3D000") || self.code == SqlState::INVALID_AUTHORIZATION))
            // MySQL: unknown database (1049), access denied (1045) on a replica.
            || self.mysql.is_some_and(|m| m.number == 1049 || m.number == 1045)
    }

    /// The MySQL error number and SQLSTATE for this error: a MySQL server's own, else
    /// the nearest MySQL error to our SQLSTATE (chosen here, like the SQLSTATEs).
    pub fn mysql_code(&self) -> MysqlCode {
        if let Some(m) = self.mysql {
            return m;
        }
        let (number, state) = match self.code {
            SqlState::INVALID_PASSWORD | SqlState::INVALID_AUTHORIZATION => (1045, *b"28000"), // ER_ACCESS_DENIED_ERROR
            SqlState::PROTOCOL_VIOLATION => (1043, *b"08S01"), // ER_HANDSHAKE_ERROR / bad packet
            SqlState::FEATURE_NOT_SUPPORTED => (1235, *b"42000"), // ER_NOT_SUPPORTED_YET
            SqlState::TOO_MANY_CONNECTIONS => (1040, *b"08004"), // ER_CON_COUNT_ERROR
            SqlState::ADMIN_SHUTDOWN => (1053, *b"08S01"),     // ER_SERVER_SHUTDOWN
            SqlState::INSUFFICIENT_PRIVILEGE => (1227, *b"42000"), // ER_SPECIFIC_ACCESS_DENIED_ERROR
            SqlState::SYNTAX_ERROR => (1064, *b"42000"),       // ER_PARSE_ERROR
            SqlState::READ_ONLY_SQL_TRANSACTION => (1792, *b"25006"), // ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
            SqlState::INVALID_PARAMETER_VALUE => (1231, *b"42000"), // ER_WRONG_VALUE_FOR_VAR
            // Server-range numbers only: clients take 2000+ for their own errors and
            // refuse them in a server's packet ("malformed packet").
            // No server to route to now: the connection is rejected (SQLSTATE 08004).
            SqlState::CANNOT_CONNECT_NOW => (1105, *b"08004"),
            // A server connection lost or unreachable: ER_NET_READ_ERROR.
            SqlState::CONNECTION_FAILURE | SqlState::TRANSACTION_RESOLUTION_UNKNOWN => (1158, *b"08S01"),
            _ => (1105, *b"HY000"), // ER_UNKNOWN_ERROR
        };
        MysqlCode { number, state }
    }

    /// A client timeout ended the session (idle, idle in a transaction).
    pub fn is_client_timeout(&self) -> bool {
        self.side == Side::Proxy && self.mysql == Some(CLIENT_INTERACTION_TIMEOUT)
    }

    /// A server's own ErrorResponse, if this is one.
    pub fn is_forwarded(&self) -> bool {
        self.raw.is_some()
    }

    /// A server's own ErrorResponse, passed on unchanged (`pg::protocol::messages`
    /// encodes the rest: `Error::to_fatal`, `Error::to_error`).
    pub fn raw(&self) -> Option<&[u8]> {
        self.raw.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_server_errors_allow_a_retry() {
        let c = |s: &[u8]| SqlState::parse(s).unwrap();
        assert!(c(b"57P01").server_going_away() && c(b"57P02").server_going_away());
        assert!(!c(b"08006").server_going_away());
        assert!(c(b"0A000").only_a_primary_runs_it() && c(b"25006").only_a_primary_runs_it());
        assert!(!c(b"42P01").only_a_primary_runs_it());
    }

    #[test]
    fn sqlstates_are_five_characters() {
        assert_eq!(SqlState::parse(b"3D000").unwrap().as_str(), "3D000");
        assert!(SqlState::parse(b"3D00").is_none());
        assert!(SqlState::parse(&[b'3', b'D', 0, b'0', b'0']).is_none());
        assert_eq!(SqlState::CONNECTION_FAILURE.class(), "08");
    }

    #[test]
    fn a_refused_login_is_retried_elsewhere_only_when_the_node_is_at_fault() {
        let refused = |code: &[u8]| Error::server_refused(code, "x", Bytes::from_static(b"E"));
        assert!(refused(b"57P03").retry_elsewhere());
        assert!(refused(b"53300").retry_elsewhere());
        assert!(refused(b"08004").retry_elsewhere());
        assert!(!refused(b"3D000").retry_elsewhere());
        assert!(!refused(b"28P01").retry_elsewhere());
        assert!(refused(b"3D000").standby_behind() && !refused(b"28P01").standby_behind());
        assert!(
            !Error::not_authorized("x").standby_behind(),
            "only a server's own refusal"
        );
        let e = refused(b"3D000");
        assert_eq!((e.code().as_str(), e.side()), ("3D000", Side::Server));
        assert_eq!(&e.to_fatal()[..], b"E", "the server's own bytes");
    }

    #[test]
    fn our_errors_carry_our_codes() {
        let e = Error::server_lost("main", "n1", "reset");
        assert_eq!(e.code(), SqlState::CONNECTION_FAILURE);
        assert!(e.retry_elsewhere());
        assert_eq!(
            e.message(),
            "server connection to node \"n1\" of cluster \"main\" was lost: reset"
        );
        assert_eq!(Error::evicted(true, "x").code(), SqlState::ADMIN_SHUTDOWN);
        assert_eq!(Error::evicted(false, "x").code(), SqlState::CONNECTION_FAILURE);
        assert_eq!(Error::protocol("x").side(), Side::Client);
        let bytes = Error::pool_exhausted("full").to_fatal();
        assert_eq!(&bytes[..], b"E\0\0\0\x20SFATAL\0VFATAL\0C53300\0Mfull\0\0");
    }

    #[test]
    fn mysql_clients_get_mysql_error_numbers() {
        let n = |e: Error| (e.mysql_code().number, e.mysql_code().state);
        assert_eq!(n(Error::auth_failed("x")), (1045, *b"28000"));
        assert_eq!(n(Error::evicted(true, "x")), (1053, *b"08S01"));
        assert_eq!(n(Error::evicted(false, "x")), (1158, *b"08S01"));
        assert_eq!(n(Error::no_route("x")), (1105, *b"08004"));
        let refused = Error::mysql_server_refused(1049, *b"42000", "Unknown database 'x'");
        assert_eq!(n(refused.clone()), (1049, *b"42000"));
        assert!(!refused.retry_elsewhere());
        assert!(Error::mysql_server_refused(1040, *b"08004", "Too many connections").retry_elsewhere());
    }
}
