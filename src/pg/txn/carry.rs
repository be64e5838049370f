//! What a transaction-pooling client's machine knows of its session, taken out for a
//! successor process (binary upgrade) and put back there. Only a client at rest goes:
//! greeted, between units, holding no connection, nothing stashed, owed or unsent, not
//! pinned; then everything the session is lies in its settings and statements.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Machine;
use crate::pg::classify::Classifier;
use crate::pg::protocol::views::Parse;

/// The session a client believes it has, apart from who it is (`pg::handover`).
#[derive(Serialize, Deserialize, Default, Debug, PartialEq)]
pub struct MachineCarry {
    /// Setting name → the statement that sets it (`SessionState::desired`).
    pub settings: BTreeMap<String, String>,
    /// Protocol-level prepared statements: the client's name, the Parse message.
    pub statements: Vec<(Vec<u8>, Vec<u8>)>,
    /// SQL-level ones: the name, the client's PREPARE text.
    pub sql_statements: Vec<(String, String)>,
}

impl<'a> Machine<'a> {
    /// The session's state, if the client is at rest (else None: it stays here).
    pub fn carry(&self) -> Option<MachineCarry> {
        let at_rest = self.phase == super::Phase::Serving
            && self.unit.is_none()
            && self.pinned.is_none()
            && self.stash.is_none()
            && self.owed.is_empty()
            && self.actions.is_empty()
            && self.listening.is_empty()
            && self.to_server.is_empty()
            && self.to_client.is_empty()
            && self.streaming == 0
            && !self.client_mid_message
            && self.state.at_rest();
        at_rest.then(|| MachineCarry {
            settings: self.state.desired.clone(),
            statements: self.stmts.carried(),
            sql_statements: self.sql_stmts.carried(),
        })
    }

    /// A machine for a client greeted by another process, serving from its next message.
    pub fn resume(
        cfg: super::Config,
        startup: impl Into<std::sync::Arc<[(String, String)]>>,
        classifier: &'a Classifier,
        carried: MachineCarry,
    ) -> Machine<'a> {
        // Built as if greeted (no first acquire), without the greeting's bytes.
        let mut m = Machine::new(cfg, startup, classifier, Some(&[]));
        m.to_client.clear();
        m.state.desired = carried.settings;
        for (name, parse) in &carried.statements {
            // Written by `carry` as Parse messages; anything else is skipped (the client
            // then hears "prepared statement does not exist" for it, as after a
            // reconnect).
            if let Some(p) = parse.get(5..).and_then(|body| Parse::decode(body).ok()) {
                let class = classifier.classify_bytes(p.query);
                m.stmts.define(
                    &Parse {
                        name: name.as_slice(),
                        ..p
                    },
                    class,
                );
            }
        }
        for (name, text) in carried.sql_statements {
            m.sql_stmts.restore(name, &text);
        }
        m
    }
}
