//! CancelRequest routing. Each client session gets a BackendKeyData minted by the proxy
//! (the client never sees a server's pid), mapped here to the server connection it
//! stands for. A cancel can arrive on any listener, on a fresh connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::protocol::messages::cancel_request;

#[derive(Clone)]
struct Target {
    key: i32,
    addr: String,
    server_pid: i32,
    server_key: i32,
    /// Whether the session holds the server connection above now.
    active: bool,
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<i32, Target>>,
}

/// Removes the session's key when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub key: i32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.map.lock().unwrap().remove(&self.pid);
    }
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>, addr: &str, server_pid: i32, server_key: i32) -> Registration {
        let mut rng = rand::rng();
        let key: i32 = rng.random();
        let mut map = self.map.lock().unwrap();
        let pid = loop {
            let pid = rng.random_range(1..i32::MAX);
            if !map.contains_key(&pid) {
                break pid;
            }
        };
        map.insert(
            pid,
            Target {
                key,
                addr: addr.to_string(),
                server_pid,
                server_key,
                active: !addr.is_empty(),
            },
        );
        Registration {
            registry: self.clone(),
            pid,
            key,
        }
    }

    /// Point a session's key at the server connection it holds now (transaction
    /// pooling); `None` when it holds none, and a cancel has nothing to stop.
    pub fn retarget(&self, pid: i32, target: Option<(&str, i32, i32)>) {
        if let Some(t) = self.map.lock().unwrap().get_mut(&pid) {
            match target {
                Some((addr, server_pid, server_key)) => {
                    if t.addr != addr {
                        t.addr = addr.to_string(); // only when the node changes
                    }
                    t.server_pid = server_pid;
                    t.server_key = server_key;
                    t.active = true;
                }
                None => t.active = false,
            }
        }
    }

    /// Forward a client's CancelRequest to the server its session is on. Unknown keys
    /// are dropped silently, as PostgreSQL does (no answer is ever sent to a cancel).
    pub async fn forward(&self, pid: i32, key: i32) {
        let target = self
            .map
            .lock()
            .unwrap()
            .get(&pid)
            .filter(|t| t.key == key && t.active)
            .cloned();
        let Some(t) = target else {
            debug!(pid, "cancel request for an unknown session ignored");
            return;
        };
        let send = async {
            let mut s = TcpStream::connect(&t.addr).await?;
            s.write_all(&cancel_request(t.server_pid, t.server_key)).await?;
            s.shutdown().await
        };
        match tokio::time::timeout(Duration::from_secs(5), send).await {
            Ok(Ok(())) => {
                info!(server = %t.addr, server_pid = t.server_pid, "cancel request forwarded")
            }
            Ok(Err(e)) => info!(server = %t.addr, error = %e, "could not forward cancel request"),
            Err(_) => info!(server = %t.addr, "cancel request timed out"),
        }
    }
}
