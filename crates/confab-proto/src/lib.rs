//! Confab's wire protocols: bytes to typed [`Request`]s, typed [`Reply`]s and
//! [`Event`]s back to bytes. No I/O and no async: the transports own sockets,
//! the core owns behaviour; this crate only knows what goes on the wire.
//!
//! - [`types`]: the protocol's vocabulary, shared by every codec: requests,
//!   replies with their stable error codes, events and the message object.
//! - [`json`]: the WebSocket codec (one JSON object per text frame).
//! - [`line`]: the terminal codec (framing, commands, formatting).

pub mod json;
pub mod line;
pub mod types;

pub use types::*;

/// Server identification sent in `hello`.
pub const SERVER_NAME: &str = "confab";
/// The protocol/server version sent in `hello`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
