//! PostgreSQL wire protocol pieces the proxy needs by hand: backend messages it sends
//! to clients itself, startup packets, a streaming framer for the relay, and typed views
//! of the messages it looks inside. (SQLSTATEs live in `error`.)
//! Frontend messages towards servers come from `postgres-protocol`, which has no
//! server-side encoders; hence the small builders here.

pub mod framing;
pub mod messages;
pub mod startup;
pub mod tags;
pub mod views;
