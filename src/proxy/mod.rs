//! What sessions of every engine share: the process's state (`shared`), the client
//! stream and its goodbye (`stream`), buffers lent only while busy (`buffers`), and
//! the one loop that turns a routing decision into a server connection (`connector`). Nothing here speaks an engine's protocol.

pub mod budget;
pub mod buffers;
pub mod cancel;
pub mod connector;
pub mod handover;
pub mod limits;
pub mod pool;
pub mod shared;
pub mod stream;
pub mod timeouts;
