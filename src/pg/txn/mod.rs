//! Transaction pooling. The client holds a pooled server connection only from the start
//! of a transaction (or of a lone statement) to the ReadyForQuery that ends it. Between
//! transactions it holds nothing, so a failed node costs it nothing, and its next
//! transaction is routed afresh.
//!
//! The logic is a state machine with no I/O (`machine`), split by concern:
//! - `owed`: the answers a connection owes, and whether the client sees each;
//! - `statements`: protocol-level prepared statements renamed to content addresses and
//!   prepared on whatever connection the client gets;
//! - `state`: session settings (startup parameters, SETs) replayed on each connection;
//! - `unit`: whether a unit of work only reads (read/write splitting);
//! - `running`: statements in flight and what finished, for the query digests;
//! - `spares`: the storage of the machine's queues, lent only while a session is busy;
//! - `conn`: what sessions left on a server connection (`ConnState`);
//! - `action`: what the machine asks of the driver (`Action`, `Target`) and its `Config`.
//!
//! The machine makes every routing decision (`Machine::route`: the primary or a
//! readable node) and hands it to the driver in `Action::Acquire`; it has an explicit
//! phase (greeting, serving, acquiring, skipping to Sync, ended). None of these files
//! does I/O or imports a module that does (`tests/layout.rs` checks).
//!
//! `driver` is the async loop that owns the sockets and performs the machine's actions;
//! `ask` puts the proxy's own questions to a held connection between units.

pub mod action;
pub mod ask;
pub mod conn;
pub mod driver;
pub mod machine;
pub mod node_pools;
pub mod owed;
pub mod running;
pub mod spares;
pub mod state;
pub mod statements;
pub mod unit;

pub use driver::{Driver, TxnClient};
pub use machine::carry;
