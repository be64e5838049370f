//! The client commands the proxy answers or completes itself instead of relaying them:
//! parsing `KILL ...` statements and `COM_CHANGE_USER` (by hand: `mysql_common`'s
//! `ComChangeUser` parses it but has no accessors), and handling them (`Relay`'s
//! `handle_own`).

use std::sync::atomic::Ordering;

use mysql_common::constants::CapabilityFlags;
use mysql_common::packets::{AuthPlugin, AuthSwitchRequest};
use tracing::{debug, info, warn};

use super::auth::{check_answer, denied, login_password, switch_to};
use super::protocol::{self, read_packet, write_packet};
use super::relay::{Own, Relay, INTERCEPT_MAX};
use super::server::{self, LoginRequest, ServerConn};
use super::session::{set_read_only, End};
use crate::cluster::routing::Endpoint;
use crate::config::AuthMethod;
use crate::error::Error;
use crate::proxy::cancel::Target as KillTarget;
use crate::proxy::limits;
use crate::proxy::stream::{write_flush, ClientStream};

/// `COM_CHANGE_USER`'s fields, read by hand: `mysql_common`'s `ComChangeUser` parses
/// them but has no accessors.
#[derive(Debug, PartialEq)]
pub(super) struct ChangeUserCmd<'a> {
    pub(super) user: &'a [u8],
    pub(super) auth: &'a [u8],
    pub(super) database: &'a [u8],
    pub(super) charset: Option<u16>,
    pub(super) plugin: Option<&'a [u8]>,
    pub(super) attributes: Option<&'a [u8]>,
}

pub(super) fn cstr<'a>(r: &mut &'a [u8]) -> Option<&'a [u8]> {
    let i = r.iter().position(|&b| b == 0)?;
    let s = &r[..i];
    *r = &r[i + 1..];
    Some(s)
}

pub(super) fn parse_change_user(p: &[u8], caps: CapabilityFlags) -> Option<ChangeUserCmd<'_>> {
    let mut rest = p.get(1..)?;
    let user = cstr(&mut rest)?;
    let auth = if caps.contains(CapabilityFlags::CLIENT_SECURE_CONNECTION) {
        let n = *rest.first()? as usize;
        let a = rest.get(1..1 + n)?;
        rest = &rest[1 + n..];
        a
    } else {
        cstr(&mut rest)?
    };
    let database = cstr(&mut rest)?;
    let mut charset = None;
    if rest.len() >= 2 {
        charset = Some(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    let plugin = if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) && !rest.is_empty() {
        Some(cstr(&mut rest)?)
    } else {
        None
    };
    let attributes = (caps.contains(CapabilityFlags::CLIENT_CONNECT_ATTRS) && !rest.is_empty()).then_some(rest);
    Some(ChangeUserCmd {
        user,
        auth,
        database,
        charset,
        plugin,
        attributes,
    })
}

/// `KILL [HARD|SOFT] [QUERY|CONNECTION] <id>`: the id is one of ours.
pub(super) fn parse_kill(sql: &[u8]) -> Option<(bool, u32)> {
    let text = std::str::from_utf8(sql).ok()?;
    let mut words = text.split_ascii_whitespace().map(|w| w.trim_end_matches(';'));
    if !words.next()?.eq_ignore_ascii_case("kill") {
        return None;
    }
    let mut query_only = false;
    for w in words {
        if w.eq_ignore_ascii_case("hard") || w.eq_ignore_ascii_case("soft") || w.eq_ignore_ascii_case("connection") {
            continue;
        }
        if w.eq_ignore_ascii_case("query") {
            query_only = true;
            continue;
        }
        return w.parse().ok().map(|id| (query_only, id));
    }
    None
}

/// The commands the proxy answers or completes itself, once the relay has stopped both
/// directions between whole packets: `KILL [QUERY] <id>` and `COM_PROCESS_KILL` (the id
/// is the proxy's connection id, looked up in the shared cancel/KILL registry; the kill
/// runs on the target's node as this client), `COM_CHANGE_USER` (checked by the proxy,
/// then done on the server connection), and on the ro endpoint `COM_RESET_CONNECTION`
/// (read-only is set again after the reset).
impl Relay<'_> {
    /// A command the proxy looked at and leaves to the server after all.
    async fn pass_to_server(&mut self, server: &mut ServerConn, payload: &[u8]) -> Result<(), End> {
        let mut framed = Vec::new();
        protocol::frame(&mut framed, 0, payload);
        {
            // Its answer is owed like any command's (the relay passes it on).
            let mut t = self.tracked.lock().unwrap();
            t.answers.command(payload[0]);
            t.update();
        }
        self.awaiting.store(true, Ordering::Relaxed);
        write_flush(&mut server.stream, &framed).await.map_err(End::Io)
    }

    pub(super) async fn handle_own(
        &mut self,
        payload: &[u8],
        client: &mut ClientStream,
        server: &mut ServerConn,
        caps: CapabilityFlags,
    ) -> Result<(), End> {
        self.inbound.last_seq = 0;
        let own = if payload[0] == protocol::COM_RESET_CONNECTION {
            Some(Own::Reset)
        } else if payload[0] == protocol::COM_CHANGE_USER {
            Some(Own::ChangeUser)
        } else if payload[0] == protocol::COM_QUERY && super::fresh::mentions_token(&payload[1..]) {
            Some(Own::Token(super::fresh::token_statement(&payload[1..])))
        } else if payload[0] == protocol::COM_PROCESS_KILL {
            // The old binary form of `KILL <id>` (PyMySQL's `kill()`).
            payload.get(1..5).map(|b| Own::Kill {
                query_only: false,
                id: u32::from_le_bytes(b.try_into().expect("4 bytes")),
            })
        } else {
            parse_kill(&payload[1..]).map(|(query_only, id)| Own::Kill { query_only, id })
        };
        if matches!(own, Some(Own::Reset | Own::ChangeUser)) {
            // Their answers are read here: what earlier commands are owed goes first.
            self.finish_answers(client, server).await?;
        }
        let reply: Vec<u8> = match own {
            None => {
                // A KILL the proxy does not take (KILL USER ..., KILL QUERY ID ...):
                // the server runs it.
                return self.pass_to_server(server, payload).await;
            }
            Some(Own::Reset) => {
                write_packet(&mut server.stream, 0, payload).await.map_err(End::Io)?;
                let mut buf = Vec::new();
                read_packet(&mut server.stream, &mut buf, INTERCEPT_MAX)
                    .await
                    .map_err(End::Io)?;
                if buf.first() == Some(&0x00) {
                    self.after_reset(server, caps).await?;
                }
                buf
            }
            Some(Own::Token(stmt)) => return self.answer_token(stmt, client, server, caps).await,
            Some(Own::ChangeUser) => return self.change_user(payload, client, server, caps).await,
            Some(Own::Kill { query_only, id }) => {
                let target = self
                    .shared
                    .cancels
                    .mysql_target(id)
                    .filter(|t| *t.cluster == *self.cluster.name);
                match target {
                    // Not one of ours: a server thread id; the server decides.
                    None => {
                        return self.pass_to_server(server, payload).await;
                    }
                    Some(t) => match self.kill(&t, query_only).await {
                        Ok(()) => protocol::ok_payload(),
                        Err(e) => protocol::err_payload(&e),
                    },
                }
            }
        };
        write_packet(client, 1, &reply).await.map_err(End::Io)?;
        Ok(())
    }

    /// `COM_CHANGE_USER`: the new user's answer to our challenge is checked here (with
    /// an auth switch first when the client's first answer is not one for it), then
    /// the server connection is changed with the server's own challenge. Any failure
    /// ends the session, as MySQL does: no guessing passwords on an open session, and
    /// no session left half changed (MariaDB resets session state before it checks).
    async fn change_user(
        &mut self,
        payload: &[u8],
        client: &mut ClientStream,
        server: &mut ServerConn,
        caps: CapabilityFlags,
    ) -> Result<(), End> {
        let Some(cmd) = parse_change_user(payload, self.client.capabilities) else {
            return self
                .refuse(client, 1, Error::protocol("malformed COM_CHANGE_USER"))
                .await;
        };
        let name = String::from_utf8_lossy(cmd.user).into_owned();
        let mut plugin = cmd
            .plugin
            .map(|p| AuthPlugin::from_bytes(p).into_owned())
            .unwrap_or(AuthPlugin::MysqlNativePassword);
        let config = self.shared.config();
        let Some(user) = config.user(&name).cloned() else {
            debug!(user = %name, "COM_CHANGE_USER to a user not in [[users]]");
            return self.refuse(client, 1, denied(&name, !cmd.auth.is_empty())).await;
        };
        let mut reply_seq = 1;
        if user.auth != AuthMethod::Trust {
            let password = match login_password(&user) {
                Ok(p) => p,
                Err(e) => return self.refuse(client, 1, e).await,
            };
            let mut answer = cmd.auth.to_vec();
            if let Some(to) = switch_to(&plugin, &answer, password) {
                let mut data = self.client.nonce.to_vec();
                data.push(0);
                let switch = AuthSwitchRequest::new(to.as_bytes(), &data[..]);
                write_packet(client, 1, &protocol::to_vec(&switch))
                    .await
                    .map_err(End::Io)?;
                let got = read_packet(client, &mut answer, INTERCEPT_MAX).await.map_err(End::Io)?;
                reply_seq = got.wrapping_add(1);
                plugin = to;
            }
            if let Err(e) = check_answer(&name, password, &self.client.nonce, &plugin, &answer) {
                return self.refuse(client, reply_seq, e).await;
            }
        }
        // Counted under the new user from now on, within its max_clients.
        let counted = limits::change_user(self.shared, &mut self.client.admission.lock().unwrap(), &user.name);
        if let Err(e) = counted {
            return self.refuse(client, reply_seq, e).await;
        }
        // Its place under max_server_connections moves to the new user too.
        let ask = crate::proxy::budget::BudgetAsk {
            cluster: self.cluster,
            idle: &super::ClusterInfo::of(self.cluster).pools,
            node: &self.node.name,
            user: &user.name,
            caps: config.server_connection_caps(&self.cluster.name, &user.name),
        };
        let until = tokio::time::Instant::now() + self.cluster.state.snapshot().server_login_timeout;
        if let Err(full) = ask.move_user(&mut server.budget, until).await {
            let e = Error::pool_exhausted(format!(
                "node \"{}\" of cluster \"{}\": {full}",
                self.node.name, self.cluster.name
            ));
            return self.refuse(client, reply_seq, e).await;
        }
        let change = server::ChangeUser {
            user: &user.name,
            password: user.password.as_deref(),
            database: cmd.database,
            charset: cmd.charset,
            attributes: cmd.attributes,
        };
        if let Err(e) = server::change_user(server, &change, caps, &self.node.addr).await {
            return self.refuse(client, reply_seq, e).await;
        }
        self.after_reset(server, caps).await?;
        self.shared.cancels.set_user(&self.registered, &user.name);
        self.fresh_user_changed(&user.name);
        info!(cluster = %self.cluster.name, engine = "mysql", from = %self.user.name, to = %user.name, "COM_CHANGE_USER");
        self.user = user;
        if plugin == AuthPlugin::CachingSha2Password {
            write_packet(client, reply_seq, &[0x01, 0x03]).await.map_err(End::Io)?;
            reply_seq = reply_seq.wrapping_add(1);
        }
        write_packet(client, reply_seq, &protocol::ok_payload())
            .await
            .map(|_| ())
            .map_err(End::Io)
    }

    /// What a reset (COM_RESET_CONNECTION, COM_CHANGE_USER) undid that the proxy set:
    /// READ ONLY on ro; GTID tracking on rw.
    async fn after_reset(&mut self, server: &mut ServerConn, caps: CapabilityFlags) -> Result<(), End> {
        if self.endpoint == Endpoint::ReadOnly {
            set_read_only(server, caps).await.map_err(End::Failed)?;
        }
        if self.multiplex && server.tracking {
            // Transaction pooling follows the session through these trackers; without
            // them it cannot, so the session keeps this connection.
            let sql = super::multiplex::tracking_sql(self.fresh.maria);
            if protocol::first_value(&mut server.stream, caps, &sql).await.is_err() {
                self.tracked
                    .lock()
                    .unwrap()
                    .pinned
                    .get_or_insert("session tracking the server refused after a reset");
            }
            return Ok(());
        }
        if self.tracking && self.endpoint == Endpoint::ReadWrite {
            let maria = self.fresh.maria;
            if protocol::first_value(&mut server.stream, caps, super::fresh::Fresh::tracking_sql(maria))
                .await
                .is_err()
            {
                // Writes then count as of unknown position: reads after them go to the
                // primary, never to a replica that may lack them.
                self.tracking = false;
                self.tracked.lock().unwrap().answers.track = false;
            }
        }
        Ok(())
    }

    /// Tell the client `e` at sequence id `seq` and end the session.
    async fn refuse(&mut self, client: &mut ClientStream, seq: u8, e: Error) -> Result<(), End> {
        let _ = write_packet(client, seq, &protocol::err_payload(&e)).await;
        self.told = true;
        Err(End::Failed(e))
    }

    /// `query_timeout_ms` fired: `KILL QUERY` the statement running on the held
    /// connection (`thread`). The client gets the server's own error (1317, "Query
    /// execution was interrupted"), and the session goes on.
    pub(super) async fn kill_running_query(&self, thread: u32) {
        let target = KillTarget {
            cluster: self.cluster.name.clone(),
            addr: self.node.addr.clone(),
            server_id: thread as i32,
            server_key: 0,
            user: self.user.name.clone(),
            active: true,
        };
        if let Err(e) = self.kill(&target, true).await {
            warn!(cluster = %self.cluster.name, engine = "mysql", server_thread = thread, error = %e, "query_timeout_ms: KILL QUERY failed");
        }
    }

    /// Run `KILL [QUERY] <server thread>` on the target's node, logged in as this client
    /// (the server decides whether this user may kill that one, as it would direct).
    async fn kill(&self, t: &KillTarget, query_only: bool) -> Result<(), Error> {
        let timeout = self.cluster.state.snapshot().server_login_timeout;
        let req = LoginRequest {
            user: &self.user.name,
            password: self.user.password.as_deref(),
            database: None,
            capabilities: protocol::proxy_capabilities(),
            collation: self.client.collation,
            attributes: None,
        };
        let mut conn = server::login(&t.addr, &req, &self.cluster.server_tls(), timeout).await?;
        let caps = protocol::proxy_capabilities() & conn.greeting.capabilities;
        // The registry keeps ids as i32 (PostgreSQL's pids); a MySQL thread id is a u32,
        // stored bit for bit, so it is read back as one.
        let thread_id = t.server_id as u32;
        let sql = format!("KILL {}{}", if query_only { "QUERY " } else { "" }, thread_id);
        let result = protocol::first_value(&mut conn.stream, caps, &sql).await.map(|_| ());
        let _ = write_packet(&mut conn.stream, 0, &[protocol::COM_QUIT]).await;
        info!(cluster = %self.cluster.name, engine = "mysql", by = %self.user.name, of = %t.user, node_addr = %t.addr, server_thread = thread_id, query_only, ok = result.is_ok(), "KILL forwarded");
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::protocol;

    #[test]
    fn kill_statements() {
        assert_eq!(parse_kill(b"KILL QUERY 12"), Some((true, 12)));
        assert_eq!(parse_kill(b"kill 7;"), Some((false, 7)));
        assert_eq!(parse_kill(b"KILL HARD CONNECTION 3"), Some((false, 3)));
        assert_eq!(parse_kill(b"KILL USER app"), None);
        assert_eq!(parse_kill(b"SELECT 1"), None);
    }

    #[test]
    fn change_user_commands() {
        let caps = CapabilityFlags::CLIENT_SECURE_CONNECTION
            | CapabilityFlags::CLIENT_PLUGIN_AUTH
            | CapabilityFlags::CLIENT_CONNECT_ATTRS;
        let mut p = vec![protocol::COM_CHANGE_USER];
        p.extend_from_slice(b"bob\0\x03abcapp\0\x2d\x00mysql_native_password\0\x05\x01a\x02bc");
        let c = parse_change_user(&p, caps).unwrap();
        assert_eq!(
            c,
            ChangeUserCmd {
                user: b"bob",
                auth: b"abc",
                database: b"app",
                charset: Some(45),
                plugin: Some(b"mysql_native_password"),
                attributes: Some(b"\x05\x01a\x02bc"),
            }
        );
        // The short form of old clients: no charset, no plugin.
        let c = parse_change_user(b"\x11bob\0\x00db\0", caps).unwrap();
        assert_eq!(
            (c.auth, c.database, c.charset, c.plugin),
            (&b""[..], &b"db"[..], None, None)
        );
        assert!(parse_change_user(b"\x11bob", caps).is_none(), "truncated");
        assert!(
            parse_change_user(b"\x11bob\0\x09ab", caps).is_none(),
            "auth longer than the packet"
        );
    }
}
