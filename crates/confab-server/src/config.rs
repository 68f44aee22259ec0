//! The server's settings, with the defaults in one place ([`Config::default`]).

use std::path::PathBuf;
use std::time::Duration;

use confab_core::ChatConfig;
pub use confab_store_sqlite::Durability;

pub use crate::proxy::Networks;

#[derive(Debug, Clone)]
pub struct Config {
    pub database: Database,
    /// WebSocket ping interval; a connection silent for two is closed.
    pub heartbeat: Duration,
    /// Largest WebSocket frame (and message) a client may send.
    pub max_frame_bytes: usize,
    /// Longest line the line transport accepts, in bytes.
    pub max_line_bytes: usize,
    /// Most chat connections (WebSocket and line) at once.
    pub max_connections: usize,
    /// Most chat connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Addresses with no per-address limits (connections, logins).
    pub exempt_networks: Networks,
    /// Proxies whose word on the client's address is believed: their
    /// `Forwarded` / `X-Forwarded-For` headers on WebSocket, their PROXY
    /// protocol header (required from them) on the line listener.
    pub trusted_proxies: Networks,
    /// How long a client may take to send its HTTP request (the WebSocket
    /// upgrade), counted from connecting.
    pub handshake_timeout: Duration,
    /// How long a connection may stay without logging in.
    pub login_timeout: Duration,
    /// How long a line connection may send nothing before it is closed
    /// (warned a twelfth of it before); `None`: never. Vanished peers are
    /// found sooner by TCP keepalive.
    pub line_idle: Option<Duration>,
    /// How long a graceful shutdown waits for connections to finish.
    pub shutdown_grace: Duration,
    /// What the `shutdown` event advises clients to wait before reconnecting.
    pub reconnect_ms: u64,
    pub chat: ChatConfig,
    /// Serve both listeners over TLS with this certificate.
    pub tls: Option<crate::TlsFiles>,
    /// The bearer token of the admin API; `None` turns the API off.
    pub admin_token: Option<crate::settings::Secret>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database: Database::Sqlite {
                path: PathBuf::from("data/confab.db"),
                durability: Durability::Full,
            },
            heartbeat: Duration::from_secs(30),
            max_frame_bytes: 64 * 1024,
            // A 4096-byte body plus `/msg NAME `, with room to spare.
            max_line_bytes: 8 * 1024,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            // A developer's own scripts, tests and tools run from here.
            exempt_networks: Networks::loopback(),
            trusted_proxies: Networks::default(),
            handshake_timeout: Duration::from_secs(10),
            login_timeout: Duration::from_secs(30),
            // People at a terminal read far more than they type: an hour.
            line_idle: Some(Duration::from_secs(3600)),
            shutdown_grace: Duration::from_secs(10),
            reconnect_ms: 2000,
            chat: ChatConfig::default(),
            tls: None,
            admin_token: None,
        }
    }
}

/// Where the data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite {
        path: PathBuf,
        durability: Durability,
    },
}

impl Database {
    /// Set how durable commits are.
    pub fn set_durability(&mut self, to: Durability) {
        match self {
            Database::Sqlite { durability, .. } => *durability = to,
        }
    }

    /// Parse a database URL: `sqlite://PATH` (relative) or
    /// `sqlite:///ABSOLUTE/PATH`, optionally `?synchronous=normal`.
    pub fn parse(url: &str) -> Result<Database, String> {
        let Some(rest) = url.strip_prefix("sqlite://") else {
            return Err(format!(
                "unsupported database URL {url:?}: expected sqlite://PATH"
            ));
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(format!("database URL {url:?} has no path"));
        }
        let durability = match query {
            "" | "synchronous=full" => Durability::Full,
            "synchronous=normal" => Durability::Normal,
            other => {
                return Err(format!(
                    "unknown database option {other:?}: expected synchronous=full or synchronous=normal"
                ))
            }
        };
        Ok(Database::Sqlite {
            path: PathBuf::from(path),
            durability,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sqlite_urls() {
        assert_eq!(
            Database::parse("sqlite://data/x.db").unwrap(),
            Database::Sqlite {
                path: "data/x.db".into(),
                durability: Durability::Full
            }
        );
        assert_eq!(
            Database::parse("sqlite:///tmp/x.db?synchronous=normal").unwrap(),
            Database::Sqlite {
                path: "/tmp/x.db".into(),
                durability: Durability::Normal
            }
        );
        assert!(Database::parse("postgres://x").is_err());
        assert!(Database::parse("sqlite://").is_err());
        assert!(Database::parse("sqlite://x.db?fast=yes").is_err());
    }
}
