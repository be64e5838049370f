//! MySQL's side of the query digests (`obs::digest`): naming the commands a relay passes
//! on (`describe`), and where they run (`place`). `Answers` follows their answers.

use super::auth::Client;
use super::protocol;
use crate::cluster::topology::{NodeState, Role};
use crate::cluster::ClusterCtx;
use crate::obs::digest::{Place, Route};

/// Name the command just passed on for the query digests: a `COM_QUERY`'s or
/// `COM_STMT_PREPARE`'s text (when the whole packet is in the buffer: `payload` holds
/// what is, `len` is its length), the statement a `COM_STMT_EXECUTE` runs; a
/// `COM_STMT_CLOSE` forgets its statement.
pub(super) fn describe(
    answers: &mut super::answers::Answers,
    classifier: &super::classify::Classifier,
    cmd: u8,
    payload: &[u8],
    len: usize,
) {
    let id = || payload.get(1..5).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let whole = payload.len() >= len;
    let now = std::time::Instant::now();
    match cmd {
        protocol::COM_QUERY | protocol::COM_STMT_PREPARE if whole => {
            let digest = classifier.digest(&payload[1..len]);
            answers.describe_last(Some(digest), cmd == protocol::COM_STMT_PREPARE, now);
        }
        protocol::COM_STMT_EXECUTE => {
            let digest = id().and_then(|id| answers.prepared.get(&id).cloned());
            answers.describe_last(digest, false, now);
        }
        protocol::COM_STMT_CLOSE => {
            if let Some(id) = id() {
                answers.prepared.remove(&id);
            }
        }
        _ => {}
    }
}

/// The client's login database, for the query digests' traces (`db.namespace`).
pub(super) fn client_database(client: &Client) -> std::borrow::Cow<'_, str> {
    client
        .database
        .as_deref()
        .map(String::from_utf8_lossy)
        .unwrap_or_default()
}

/// Where a MySQL session's statements run, for the query digests.
pub(super) fn place<'a>(cluster: &'a ClusterCtx, node: &'a NodeState, database: &'a str, route: Route) -> Place<'a> {
    Place {
        cluster: &cluster.name,
        node: &node.name,
        addr: &node.addr,
        database,
        system: "mysql",
        on_primary: node.role == Role::Primary,
        route,
    }
}
