//! Towards clients: authentication (`auth`), CancelRequest routing (`cancel`), the
//! client session from startup to goodbye (`session`: session mode relays bytes) and
//! transaction pooling (`txn`: an I/O-free machine and its driver); a client's fresh-read floor (`fresh`).

pub mod auth;
pub mod auth_query;
pub mod cancel;
pub mod fresh;
mod login;
pub mod session;
pub mod shared;
pub mod tls;
pub mod txn;
