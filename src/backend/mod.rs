//! Towards servers: logging in (`server`), pools of server connections (`pool`), and the
//! one loop that turns a routing decision into a connection (`connector`).

pub mod connector;
pub mod pool;
pub mod scram;
pub mod server;
