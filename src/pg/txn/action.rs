//! What the transaction machine (`machine.rs`) and its driver (`driver.rs`) say to each
//! other: the machine's settings (`Config`) and the actions it asks the driver to carry
//! out (`Action`), among them where a unit's connection comes from (`Target`).

use crate::error::Error;
use crate::pg::classify::CausalStatement;

/// Where a unit's connection comes from: the routing decision, made by the machine
/// (`Machine::route`) and carried out by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The primary, confirmed on the connection itself.
    Primary,
    /// A readable node: a standby within lag that satisfies the client's fresh-read
    /// floor (placed by the driver), else the primary.
    Readable,
}

/// What the driver must do, in order.
#[derive(Debug, Clone)]
pub enum Action {
    /// Get a server connection on `to`. `read`: the unit only reads (proven by the
    /// classifier), so it may run again elsewhere until answered; `exclude`: a node that
    /// just failed this unit; `rerun`: the unit in progress runs again (not a new one,
    /// so a shutdown does not hold it back).
    Acquire {
        to: Target,
        read: bool,
        exclude: Option<String>,
        rerun: bool,
    },
    /// Give the held connection back: to its pool if `reuse`, else close it.
    Release { reuse: bool },
    /// Close the idle pooled connections to a database a statement needs free.
    CloseIdle(String),
    /// End the session, telling the client why (None: it left). Boxed: an `Error` is 80
    /// bytes, twice the largest other action, and the driver's loop holds an action in
    /// every idle client's session future.
    End(Option<Box<Error>>),
    /// Answer `SHOW`/`SET`/`RESET switchyard.causal_token` (the driver keeps the token
    /// and calls `on_causal_reply`).
    Causal(CausalStatement),
    /// Ask the held connection's server how many session advisory locks, WITH HOLD
    /// cursors and temporary objects its session holds (the client, pinned only by
    /// such, may have released them); the driver calls `on_pins_counted`.
    CountPins,
    /// Carry out a client's LISTEN / UNLISTEN statements on the shared listening
    /// connection (`pg::notify`); the driver calls `on_listened`.
    Listen(Vec<crate::pg::notify::ListenOp>),
}

pub struct Config {
    /// The cluster's name, shared (`ClusterCtx::name`): no copy per client.
    pub cluster: std::sync::Arc<str>,
    /// The session came in on the ro endpoint.
    pub read_only_endpoint: bool,
    /// `read_write_split` on the rw endpoint.
    pub split: bool,
    pub max_message: u32,
    /// The pid the client was given (BackendKeyData).
    pub client_pid: i32,
    pub client_key: i32,
    /// Track statements for the query digests (`[telemetry] query_digests`) or traces.
    pub digests: bool,
    /// Traces are on: read each statement's `traceparent` comment.
    pub traces: bool,
}
