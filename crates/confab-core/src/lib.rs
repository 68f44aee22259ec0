//! The Confab chat engine. It knows no socket, no HTTP and no SQL: a
//! transport turns bytes into [`confab_proto::Request`]s, hands them to a
//! [`Session`], and writes what comes out of the connection's queue.
//!
//! - [`names`]: validated user and room names.
//! - [`error`]: client-facing errors ([`ChatError`]) and storage errors.
//! - [`store`]: the [`Store`] trait, an in-memory backend, the contract suite.
//! - [`broker`]: the [`Broker`] trait that carries events between nodes.
//! - [`hub`]: local fan-out, in seq order, encoded once.
//! - [`limits`]: rate limits (token buckets) and the content filter.
//! - [`conn`]: a connection's bounded outbound queue and its close signal.
//! - [`session`]: one connection's state machine and the command table.
//! - [`auth`]: argon2id password hashing and tokens.
//! - [`chat`]: [`Chat`], the engine that ties them together.

pub mod auth;
pub mod broker;
pub mod chat;
pub mod conn;
pub mod error;
pub mod hub;
pub mod limits;
pub mod names;
pub mod session;
pub mod store;

pub use broker::{Broker, BrokerEvent, MemoryBroker};
pub use chat::{Chat, ChatConfig, Observer, Peer};
pub use conn::{CloseReason, ConnReceiver, Outbound};
pub use error::{ChatError, StoreError};
pub use limits::{ContentFilter, FilterRule, Rate, RateLimits};
pub use names::{RoomName, UserName};
pub use session::Session;
pub use store::{DynStore, Store};
