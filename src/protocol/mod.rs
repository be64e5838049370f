//! PostgreSQL wire protocol pieces the proxy needs by hand: backend messages it sends
//! to clients itself, startup packets, and a streaming framer for the relay.
//! Frontend messages towards servers come from `postgres-protocol`, which has no
//! server-side encoders; hence the small builders here.

pub mod framing;
pub mod messages;
pub mod startup;
pub mod views;

/// SQLSTATE codes Switchyard itself sends.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
}
