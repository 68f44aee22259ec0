//! The configuration as an operator writes it: a TOML file, `CONFAB_*`
//! environment variables and flags, in rising precedence. [`Settings`] is
//! the file's shape, every option with its default; [`Settings::load`]
//! merges the sources, [`Settings::validate`] checks the result, and
//! [`Settings::to_config`] turns it into the server's [`Config`].
//!
//! Environment: `CONFAB_<KEY>` sets a top-level key (`CONFAB_HTTP`),
//! `CONFAB_<SECTION>_<KEY>` a key of a section (`CONFAB_LIMITS_MAX_CONNECTIONS`,
//! `CONFAB_ADMIN_TOKEN`). Values are read as TOML (`500`, `true`,
//! `{ per_second = 5, burst = 10 }`), or as text when they are not.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use confab_core::{ChatConfig, ContentFilter, FilterRule, Rate, RateLimits};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Database, Networks};
use crate::TlsFiles;

/// A secret: shown as `***` by `Debug` and when the configuration is printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The HTTP and WebSocket listener.
    pub http: SocketAddr,
    /// The line-protocol listener, or "off".
    pub line: String,
    /// `sqlite://PATH`, optionally `?synchronous=normal`.
    pub database: String,
    /// `redis://HOST:PORT[/DB][?prefix=P]`: join a cluster; empty for a
    /// single node.
    pub broker: String,
    /// This node's name; empty for the host name and a random suffix.
    pub node: String,
    pub log: LogSettings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
    pub limits: LimitSettings,
    pub rate_limits: RateSettings,
    pub guests: GuestSettings,
    pub admin: AdminSettings,
    /// Content filter rules: `[[filter]]` tables of `pattern` and `reason`.
    pub filter: Vec<FilterSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A tracing filter: `info`, `debug`, `confab_server=debug,info`, …
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// CIDR blocks with no per-address limits.
    pub exempt_networks: Vec<String>,
    /// CIDR blocks of proxies whose word on the client's address is believed.
    pub trusted_proxies: Vec<String>,
    pub handshake_timeout_ms: u64,
    pub login_timeout_ms: u64,
    /// A line connection silent this long is closed; 0: never.
    pub line_idle_ms: u64,
    pub heartbeat_ms: u64,
    pub max_frame_bytes: usize,
    pub max_line_bytes: usize,
    pub max_body_bytes: usize,
    pub max_topic_chars: usize,
    /// Public rooms one user may be in at once.
    pub max_rooms_per_user: u32,
    /// Rooms one user may create in an hour (0: no limit).
    pub rooms_created_per_hour: u32,
    /// Messages in one `sync` reply, over all its rooms.
    pub max_sync_messages: u32,
    pub outbound_queue: usize,
    /// A write to a client's socket that waits this long closes it as a
    /// slow consumer.
    pub write_stall_ms: u64,
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSetting {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateSettings {
    pub requests: RateSetting,
    pub messages: RateSetting,
    pub user_messages: RateSetting,
    pub auth_per_ip: RateSetting,
    pub auth_per_account: RateSetting,
    pub abuse_refusals: u32,
    pub abuse_window_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestSettings {
    pub allowed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// The bearer token of the admin API; no token, no admin API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSettings {
    pub pattern: String,
    pub reason: String,
}

impl Default for Settings {
    fn default() -> Self {
        let config = Config::default();
        let chat = &config.chat;
        let ms = |d: Duration| d.as_millis() as u64;
        let rate = |r: Option<Rate>| {
            let r = r.unwrap_or(Rate::new(0.0, 0));
            RateSetting {
                per_second: r.per_second,
                burst: r.burst,
            }
        };
        let limits = &chat.rate_limits;
        Settings {
            http: "127.0.0.1:8080".parse().expect("an address"),
            line: "127.0.0.1:7777".into(),
            database: "sqlite://data/confab.db".into(),
            broker: String::new(),
            node: String::new(),
            log: LogSettings {
                level: "info".into(),
                format: LogFormat::Text,
            },
            tls: None,
            limits: LimitSettings {
                max_connections: config.max_connections,
                max_connections_per_ip: config.max_connections_per_ip,
                exempt_networks: config.exempt_networks.blocks().collect(),
                trusted_proxies: config.trusted_proxies.blocks().collect(),
                handshake_timeout_ms: ms(config.handshake_timeout),
                login_timeout_ms: ms(config.login_timeout),
                line_idle_ms: config.line_idle.map_or(0, ms),
                heartbeat_ms: ms(config.heartbeat),
                max_frame_bytes: config.max_frame_bytes,
                max_line_bytes: config.max_line_bytes,
                max_body_bytes: chat.max_body_bytes,
                max_topic_chars: chat.max_topic_chars,
                max_rooms_per_user: chat.max_rooms_per_user,
                rooms_created_per_hour: limits.room_creations.map_or(0, |r| r.burst),
                max_sync_messages: chat.max_sync_messages,
                outbound_queue: chat.outbound_queue,
                write_stall_ms: ms(config.write_stall),
                shutdown_grace_ms: ms(config.shutdown_grace),
            },
            rate_limits: RateSettings {
                requests: rate(limits.requests),
                messages: rate(limits.messages),
                user_messages: rate(limits.user_messages),
                auth_per_ip: rate(limits.auth_per_ip),
                auth_per_account: rate(limits.auth_per_account),
                abuse_refusals: limits.abuse_refusals,
                abuse_window_ms: ms(limits.abuse_window),
            },
            guests: GuestSettings {
                allowed: chat.allow_guests,
            },
            admin: AdminSettings::default(),
            filter: Vec::new(),
        }
    }
}

macro_rules! defaults_from_settings {
    ($($ty:ident . $field:ident),*) => {
        $(impl Default for $ty {
            fn default() -> Self {
                Settings::default().$field
            }
        })*
    };
}
defaults_from_settings!(
    LogSettings.log,
    LimitSettings.limits,
    RateSettings.rate_limits,
    GuestSettings.guests
);

/// A configuration that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Top-level keys the environment can set.
const TOP_LEVEL: &[&str] = &["http", "line", "database", "broker", "node", "filter"];
/// Sections whose keys the environment can set.
const SECTIONS: &[&str] = &["log", "tls", "limits", "rate_limits", "guests", "admin"];
/// Keys whose environment value is always text.
const TEXT_KEYS: &[&str] = &[
    "http",
    "line",
    "database",
    "broker",
    "node",
    "log.level",
    "log.format",
    "tls.cert",
    "tls.key",
    "admin.token",
];

impl Settings {
    /// Merge the file (if any) and the environment over the defaults.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("reading {}: {e}", path.display())))?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        let mut from_env = Vec::new();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix("CONFAB_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let (section, key) = if TOP_LEVEL.contains(&rest.as_str()) {
                (None, rest)
            } else if let Some(section) = SECTIONS
                .iter()
                .filter(|s| rest.starts_with(&format!("{s}_")))
                .max_by_key(|s| s.len())
            {
                (Some(*section), rest[section.len() + 1..].to_owned())
            } else {
                continue;
            };
            let dotted = section.map_or(key.clone(), |s| format!("{s}.{key}"));
            let value = if TEXT_KEYS.contains(&dotted.as_str()) {
                toml::Value::String(raw)
            } else {
                env_value(&raw)
            };
            let target = match section {
                None => &mut table,
                Some(s) => table
                    .entry(s)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| ConfigError(format!("`{s}` must be a table")))?,
            };
            target.insert(key, value);
            from_env.push(name);
        }
        let source = match (file, from_env.is_empty()) {
            (Some(path), true) => path.display().to_string(),
            (Some(path), false) => format!("{} and {}", path.display(), from_env.join(", ")),
            (None, _) => from_env.join(", "),
        };
        Settings::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError(format!("{source}: {}", e.to_string().trim())))
    }

    /// Check what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.to_config().map(|_| ())
    }

    /// The line listener's address, or `None` when it is off.
    pub fn line_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match self.line.as_str() {
            "off" | "" => Ok(None),
            addr => addr
                .parse()
                .map(Some)
                .map_err(|_| ConfigError(format!("line: {addr:?} is not an address or \"off\""))),
        }
    }

    /// The server configuration these settings describe.
    pub fn to_config(&self) -> Result<Config, ConfigError> {
        let bad = |what: &str| ConfigError(what.to_owned());
        self.line_addr()?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError(format!("log.level: {e}")))?;
        let l = &self.limits;
        let positive = [
            ("limits.max_connections", l.max_connections as u64),
            (
                "limits.max_connections_per_ip",
                l.max_connections_per_ip as u64,
            ),
            ("limits.handshake_timeout_ms", l.handshake_timeout_ms),
            ("limits.login_timeout_ms", l.login_timeout_ms),
            ("limits.heartbeat_ms", l.heartbeat_ms),
            ("limits.max_frame_bytes", l.max_frame_bytes as u64),
            ("limits.max_line_bytes", l.max_line_bytes as u64),
            ("limits.max_body_bytes", l.max_body_bytes as u64),
            ("limits.outbound_queue", l.outbound_queue as u64),
            ("limits.max_rooms_per_user", u64::from(l.max_rooms_per_user)),
            ("limits.max_sync_messages", u64::from(l.max_sync_messages)),
            ("limits.write_stall_ms", l.write_stall_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError(format!("{name} must be more than 0")));
        }
        if l.max_body_bytes >= l.max_frame_bytes || l.max_body_bytes >= l.max_line_bytes {
            return Err(bad(
                "limits.max_body_bytes must be less than max_frame_bytes and max_line_bytes",
            ));
        }
        let rules: Vec<FilterRule> = self
            .filter
            .iter()
            .map(|f| FilterRule {
                pattern: f.pattern.clone(),
                reason: f.reason.clone(),
            })
            .collect();
        let filter = ContentFilter::new(&rules).map_err(ConfigError)?;
        let r = &self.rate_limits;
        let rate = |s: RateSetting| Some(Rate::new(s.per_second, s.burst));
        let ms = Duration::from_millis;
        let defaults = Config::default();
        let database = Database::parse(&self.database).map_err(ConfigError)?;
        let broker = match self.broker.as_str() {
            "" => None,
            url => Some(
                confab_broker_redis::BrokerUrl::parse(url)
                    .map_err(|e| ConfigError(format!("broker: {e}")))?,
            ),
        };
        if broker.is_some() && matches!(database, Database::Sqlite { .. }) {
            return Err(ConfigError(
                "a cluster (broker) needs a database every node shares: database = \
                 postgres://…; two nodes cannot share one SQLite file"
                    .into(),
            ));
        }
        let node = match self.node.as_str() {
            "" => crate::config::default_node_name(),
            name => {
                crate::config::check_node_name(name).map_err(ConfigError)?;
                name.to_owned()
            }
        };
        Ok(Config {
            database,
            node,
            broker,
            heartbeat: ms(l.heartbeat_ms),
            max_frame_bytes: l.max_frame_bytes,
            max_line_bytes: l.max_line_bytes,
            max_connections: l.max_connections,
            max_connections_per_ip: l.max_connections_per_ip,
            exempt_networks: Networks::parse(&l.exempt_networks)
                .map_err(|e| ConfigError(format!("limits.exempt_networks: {e}")))?,
            trusted_proxies: Networks::parse(&l.trusted_proxies)
                .map_err(|e| ConfigError(format!("limits.trusted_proxies: {e}")))?,
            handshake_timeout: ms(l.handshake_timeout_ms),
            login_timeout: ms(l.login_timeout_ms),
            line_idle: (l.line_idle_ms > 0).then(|| ms(l.line_idle_ms)),
            write_stall: ms(l.write_stall_ms),
            shutdown_grace: ms(l.shutdown_grace_ms),
            reconnect_ms: defaults.reconnect_ms,
            chat: ChatConfig {
                max_body_bytes: l.max_body_bytes,
                max_topic_chars: l.max_topic_chars,
                max_rooms_per_user: l.max_rooms_per_user,
                max_sync_messages: l.max_sync_messages,
                outbound_queue: l.outbound_queue,
                allow_guests: self.guests.allowed,
                rate_limits: RateLimits {
                    requests: rate(r.requests),
                    messages: rate(r.messages),
                    user_messages: rate(r.user_messages),
                    auth_per_ip: rate(r.auth_per_ip),
                    auth_per_account: rate(r.auth_per_account),
                    room_creations: Some(Rate::per_hour(l.rooms_created_per_hour)),
                    abuse_refusals: r.abuse_refusals,
                    abuse_window: ms(r.abuse_window_ms),
                },
                filter,
                ..defaults.chat
            },
            tls: self.tls.as_ref().map(|t| TlsFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
            }),
            admin_token: self.admin.token.clone(),
        })
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_toml(&self) -> String {
        let shown = Settings {
            database: crate::config::mask_password(&self.database),
            broker: confab_broker_redis::mask(&self.broker),
            ..self.clone()
        };
        toml::to_string_pretty(&shown).expect("settings serialise")
    }

    /// `key: old -> new` for every setting that differs, secrets masked.
    pub fn changes(&self, new: &Settings) -> Vec<String> {
        fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
            match value {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flatten(&key, v, out);
                    }
                }
                other => out.push((prefix.to_owned(), other.to_string())),
            }
        }
        let flat = |s: &Settings| {
            let mut out = Vec::new();
            let shown = Settings {
                database: crate::config::mask_password(&s.database),
                ..s.clone()
            };
            flatten(
                "",
                &toml::Value::try_from(&shown).expect("settings serialise"),
                &mut out,
            );
            out.into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let (old, new) = (flat(self), flat(new));
        let keys: std::collections::BTreeSet<_> = old.keys().chain(new.keys()).collect();
        keys.into_iter()
            .filter(|k| old.get(*k) != new.get(*k))
            .map(|k| {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
                format!("{k}: {} -> {}", show(old.get(k)), show(new.get(k)))
            })
            .collect()
    }
}

/// An environment value: TOML when it parses as a value, else text.
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn defaults_are_the_servers_defaults() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert_eq!(s, Settings::default());
        let config = s.to_config().unwrap();
        let defaults = Config::default();
        assert_eq!(config.max_connections, defaults.max_connections);
        assert_eq!(config.chat.rate_limits, defaults.chat.rate_limits);
        assert_eq!(config.database, defaults.database);
    }

    #[test]
    fn the_example_file_holds_every_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/example.toml");
        let example = Settings::load(Some(&path), env(&[])).unwrap();
        // The example shows one filter rule, commented as an example.
        let expected = Settings {
            filter: example.filter.clone(),
            ..Settings::default()
        };
        assert_eq!(
            example, expected,
            "config/example.toml drifted from the defaults"
        );
    }

    #[test]
    fn file_then_environment() {
        let f = file(
            r#"
            http = "127.0.0.1:9000"
            [limits]
            max_connections = 50
            max_connections_per_ip = 5
            [rate_limits]
            messages = { per_second = 1.5, burst = 3 }
            [[filter]]
            pattern = "spam"
            reason = "no spam"
            "#,
        );
        let s = Settings::load(
            Some(f.path()),
            env(&[
                ("CONFAB_LIMITS_MAX_CONNECTIONS", "70"),
                (
                    "CONFAB_RATE_LIMITS_AUTH_PER_IP",
                    "{ per_second = 2, burst = 4 }",
                ),
                ("CONFAB_ADMIN_TOKEN", "12345"),
                ("CONFAB_LOG_LEVEL", "debug"),
                ("CONFAB_TEST_POSTGRES", "ignored: not a setting"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(s.http.port(), 9000, "from the file");
        assert_eq!(s.limits.max_connections, 70, "the environment wins");
        assert_eq!(s.limits.max_connections_per_ip, 5, "from the file");
        assert_eq!(s.rate_limits.messages.burst, 3);
        assert_eq!(s.rate_limits.auth_per_ip.burst, 4);
        assert_eq!(s.admin.token.as_ref().unwrap().expose(), "12345");
        assert_eq!(s.log.level, "debug");
        let config = s.to_config().unwrap();
        assert!(config.chat.filter.check("SPAM").is_err());
    }

    #[test]
    fn unknown_keys_are_named() {
        let f = file("[limits]\nmax_conections = 5\n");
        let e = Settings::load(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_conections"), "{e}");
        let f = file("colour = \"blue\"\n");
        let e = Settings::load(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let e = Settings::load(None, env(&[("CONFAB_LIMITS_BOGUS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bogus") && e.contains("CONFAB_LIMITS_BOGUS"),
            "{e}"
        );
    }

    #[test]
    fn invalid_values_are_refused() {
        let bad = |text: &str| {
            let f = file(text);
            Settings::load(Some(f.path()), env(&[]))
                .and_then(|s| s.validate())
                .unwrap_err()
                .to_string()
        };
        assert!(bad("[limits]\nmax_connections = 0\n").contains("max_connections"));
        assert!(bad("database = \"mysql://x\"\n").contains("unsupported"));
        assert!(bad("line = \"nowhere\"\n").contains("line"));
        assert!(bad("[[filter]]\npattern = \"(\"\nreason = \"x\"\n").contains("filter"));
        assert!(bad("[log]\nlevel = \"=bogus=\"\n").contains("log.level"));
        assert!(bad("[limits]\nmax_connections = \"many\"\n").contains("max_connections"));
        assert!(bad("broker = \"redis://127.0.0.1:6379\"\n").contains("SQLite"));
        let pg = "database = \"postgres://u@h/db\"\n";
        assert!(bad(&format!("{pg}broker = \"nats://h:4222\"\n")).contains("Redis"));
        assert!(bad(&format!("{pg}node = \"a b\"\n")).contains("node name"));
    }

    #[test]
    fn a_cluster_node_is_configured_from_the_environment() {
        let s = Settings::load(
            None,
            env(&[
                ("CONFAB_DATABASE", "postgres://u@h/db"),
                ("CONFAB_BROKER", "redis://:secret@h:6379/2?prefix=chat"),
                ("CONFAB_NODE", "web-1"),
            ]),
        )
        .unwrap();
        let config = s.to_config().unwrap();
        assert_eq!(config.node, "web-1");
        assert_eq!(config.broker.unwrap().prefix, "chat");
        assert!(
            !s.to_toml().contains("secret"),
            "the Redis password is masked"
        );
        let single = Settings::default().to_config().unwrap();
        assert!(single.broker.is_none());
        assert!(!single.node.is_empty(), "a default name");
    }

    #[test]
    fn secrets_are_masked() {
        let mut s = Settings::default();
        s.admin.token = Some(Secret::new("hunter2"));
        assert!(!s.to_toml().contains("hunter2"));
        assert!(s.to_toml().contains("***"));
        assert!(!format!("{s:?}").contains("hunter2"));
        s.database = "postgres://app:pg-secret@db/chat".into();
        assert!(!s.to_toml().contains("pg-secret"), "{}", s.to_toml());
        let mut t = s.clone();
        t.admin.token = Some(Secret::new("other"));
        t.limits.max_connections = 5;
        let changes = s.changes(&t);
        assert_eq!(
            changes,
            ["limits.max_connections: 10000 -> 5"],
            "{changes:?}"
        );
    }
}
