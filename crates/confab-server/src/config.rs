//! The server's settings, with the defaults in one place ([`Config::default`]).

use std::path::PathBuf;
use std::time::Duration;

use confab_core::ChatConfig;
pub use confab_store_sqlite::Durability;

pub use crate::proxy::Networks;

#[derive(Debug, Clone)]
pub struct Config {
    pub database: Database,
    /// This node's name in its cluster (also on a single node: `hello`
    /// names it).
    pub node: String,
    /// The broker that joins this node to a cluster; `None`: one node.
    pub broker: Option<confab_broker_redis::BrokerUrl>,
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
    /// How long one write to a client's socket may wait for room before
    /// the client is closed as a slow consumer.
    pub write_stall: Duration,
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
            node: default_node_name(),
            broker: None,
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
            write_stall: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            reconnect_ms: 2000,
            chat: ChatConfig::default(),
            tls: None,
            admin_token: None,
        }
    }
}

/// Where the data lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite {
        path: PathBuf,
        durability: Durability,
    },
    Postgres {
        /// The URL as tokio-postgres reads it (our own `pool_size` taken
        /// out); it may hold a password.
        url: String,
        pool_size: usize,
    },
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite { path, durability } => f
                .debug_struct("Sqlite")
                .field("path", path)
                .field("durability", durability)
                .finish(),
            Database::Postgres { url, pool_size } => f
                .debug_struct("Postgres")
                .field("url", &mask_password(url))
                .field("pool_size", pool_size)
                .finish(),
        }
    }
}

/// A database URL fit to print: its password, if any, as `***`.
pub fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_owned(),
    }
}

impl Database {
    /// Set how durable commits are (SQLite; PostgreSQL's is the server's
    /// `synchronous_commit`).
    pub fn set_durability(&mut self, to: Durability) {
        match self {
            Database::Sqlite { durability, .. } => *durability = to,
            Database::Postgres { .. } => {}
        }
    }

    /// Parse a database URL: `sqlite://PATH` (relative) or
    /// `sqlite:///ABSOLUTE/PATH`, optionally `?synchronous=normal`; or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (`postgresql://` too),
    /// optionally with `pool_size=N` among its parameters.
    pub fn parse(url: &str) -> Result<Database, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Database::parse_postgres(url);
        }
        let Some(rest) = url.strip_prefix("sqlite://") else {
            return Err(format!(
                "unsupported database URL {:?}: expected sqlite://PATH or postgres://USER@HOST/DB",
                mask_password(url)
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

/// The host name and a short random suffix: unique without configuration,
/// recognisable in logs.
pub fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                .take(48)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "confab".into());
    let mut suffix = [0u8; 2];
    getrandom::fill(&mut suffix).expect("the OS has randomness");
    format!("{host}-{:02x}{:02x}", suffix[0], suffix[1])
}

/// Check a node name: 1 to 64 letters, digits, '-', '_' or '.'.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid node name {name:?}: 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

impl Database {
    fn parse_postgres(url: &str) -> Result<Database, String> {
        let (url, pool_size) = confab_store_postgres::take_param(url, "pool_size");
        let pool_size = match pool_size {
            None => confab_store_postgres::DEFAULT_POOL_SIZE,
            Some(n) => n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("pool_size={n}: expected a positive number"))?,
        };
        confab_store_postgres::describe(&url).map_err(|e| e.to_string())?;
        Ok(Database::Postgres { url, pool_size })
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
        assert_eq!(
            Database::parse("postgresql://app:s3cret@db:5433/chat?pool_size=32&sslmode=disable")
                .unwrap(),
            Database::Postgres {
                url: "postgresql://app:s3cret@db:5433/chat?sslmode=disable".into(),
                pool_size: 32
            }
        );
        let pg = Database::parse("postgres://app:s3cret@db/chat").unwrap();
        assert!(!format!("{pg:?}").contains("s3cret"), "{pg:?}");
        assert!(Database::parse("postgres://db/chat")
            .unwrap_err()
            .contains("no user"));
        assert!(Database::parse("postgres://a@db/c?pool_size=0").is_err());
        assert_eq!(
            mask_password("postgres://app:s3cret@db:5432/chat?x=1"),
            "postgres://app:***@db:5432/chat?x=1"
        );
        assert!(Database::parse("mysql://x").is_err());
        assert!(Database::parse("sqlite://").is_err());
        assert!(Database::parse("sqlite://x.db?fast=yes").is_err());
    }
}
