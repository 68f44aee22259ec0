//! The `confab` command line. Everything it runs lives in the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use confab_server::settings::{LogFormat, Settings};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// mimalloc rather than glibc's malloc: under fan-out, memory is allocated
/// on one thread and freed on another (an event on the publisher's, its
/// last reference dropped on a member's; a job on a worker, done on the
/// storage writer), which glibc serves from locked arenas. At 100 x 10,
/// 32,000 msg/s, it took the server's user CPU per message from 17.1-20.4
/// to 15.2-18.5 us, lower in every interleaved pair, and p99 in 11 pairs of
/// 14; jemalloc did as well but held as much or more per idle connection
/// (3,978-4,109 B against 3,825-3,974; glibc 3,839-3,931). Transparent
/// huge pages stay off for it (`no_thp`): with them its arenas took
/// 4,886 B per idle connection. BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "confab", version, about = "A real-time chat server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Overrides),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The database's schema: apply it without serving, or say its version.
    Db {
        #[command(subcommand)]
        action: DbCommand,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Manage accounts in the configured database (passwords are read from
    /// a prompt or standard input, never from the command line).
    User {
        #[command(subcommand)]
        action: UserCommand,
        #[command(flatten)]
        overrides: Overrides,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account.
    Add { name: String },
    /// Set an account's password; its tokens are revoked.
    Passwd { name: String },
    /// List the accounts.
    List,
    /// Delete an account, its tokens and memberships (its messages stay).
    Delete { name: String },
    /// Make an account a server operator: an owner of every room, who may
    /// give rooms without an owner one.
    Op { name: String },
    /// Make an operator an ordinary account again.
    Deop { name: String },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create or upgrade the schema of the configured database (safe while
    /// other nodes start: they wait for one another).
    Migrate,
    /// Say which schema version the database is at, and this binary's.
    Status,
    /// Copy a SQLite deployment into PostgreSQL: users (passwords and tokens
    /// stay valid), rooms, memberships and read markers, every message with
    /// its seq, time and nonce; checked before it says done. Stop the
    /// server first.
    Copy {
        /// The SQLite database: sqlite://PATH.
        #[arg(long)]
        from: String,
        /// The PostgreSQL database: postgres://USER@HOST:PORT/DB.
        #[arg(long)]
        to: String,
        /// Wipe the target first when it is not empty.
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration (file, environment, flags) and print the
    /// effective result, secrets masked.
    Check(Overrides),
}

/// Where the configuration comes from, and the flags that override it.
/// Every option is in config/example.toml; these are the common ones.
#[derive(clap::Args, Clone)]
struct Overrides {
    /// A TOML configuration file (see config/example.toml).
    #[arg(long, env = "CONFAB_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address of the HTTP and WebSocket listener (WebSocket at /ws).
    #[arg(long, global = true)]
    http: Option<SocketAddr>,
    /// Address of the line-protocol listener, or "off".
    #[arg(long, global = true)]
    line: Option<String>,
    /// Storage: sqlite://PATH (relative) or sqlite:///ABSOLUTE/PATH,
    /// optionally with ?synchronous=normal; or postgres://USER@HOST:PORT/DB
    /// (the password in the URL or PGPASSWORD; ?pool_size=N, sslmode,
    /// sslrootcert).
    #[arg(long, global = true)]
    database: Option<String>,
    /// Join a cluster through this Redis: redis://HOST:PORT[/DB], with
    /// ?prefix=P to share one Redis between clusters. Needs PostgreSQL.
    #[arg(long, global = true)]
    broker: Option<String>,
    /// This node's name in the cluster (default: the host name and a
    /// short random suffix).
    #[arg(long, global = true)]
    node: Option<String>,
    /// Log filter: error, warn, info, debug, trace, or per module.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
    /// Serve both listeners over TLS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key", global = true)]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert", global = true)]
    tls_key: Option<PathBuf>,
    /// WebSocket ping interval in milliseconds.
    #[arg(long, global = true)]
    heartbeat_ms: Option<u64>,
    /// Most chat connections at once.
    #[arg(long, global = true)]
    max_connections: Option<usize>,
    /// Most chat connections from one IP address.
    #[arg(long, global = true)]
    max_connections_per_ip: Option<usize>,
    /// How long a graceful shutdown may take, in milliseconds.
    #[arg(long, global = true)]
    shutdown_grace_ms: Option<u64>,
    /// Refuse `guest` logins.
    #[arg(long, global = true)]
    no_guests: bool,
}

impl Overrides {
    /// The file, then the environment, then these flags; validated.
    fn settings(&self) -> anyhow::Result<Settings> {
        let mut s = Settings::load(self.config.as_deref(), std::env::vars())?;
        if let Some(v) = self.http {
            s.http = v;
        }
        if let Some(v) = &self.line {
            s.line = v.clone();
        }
        if let Some(v) = &self.database {
            s.database = v.clone();
        }
        if let Some(v) = &self.broker {
            s.broker = v.clone();
        }
        if let Some(v) = &self.node {
            s.node = v.clone();
        }
        if let Some(v) = &self.log_level {
            s.log.level = v.clone();
        }
        if let Some(v) = self.log_format {
            s.log.format = v;
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            s.tls = Some(confab_server::settings::TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        if let Some(v) = self.heartbeat_ms {
            s.limits.heartbeat_ms = v;
        }
        if let Some(v) = self.max_connections {
            s.limits.max_connections = v;
        }
        if let Some(v) = self.max_connections_per_ip {
            s.limits.max_connections_per_ip = v;
        }
        if let Some(v) = self.shutdown_grace_ms {
            s.limits.shutdown_grace_ms = v;
        }
        if self.no_guests {
            s.guests.allowed = false;
        }
        s.validate()?;
        Ok(s)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(overrides) => serve(overrides).await,
        Command::User { action, overrides } => user(action, &overrides).await,
        Command::Db { action, overrides } => db(action, &overrides).await,
        Command::Config(ConfigCommand::Check(overrides)) => {
            let settings = overrides.settings()?;
            println!("# the configuration is valid; in effect:\n");
            print!("{}", settings.to_toml());
            Ok(())
        }
    }
}

async fn db(action: DbCommand, overrides: &Overrides) -> anyhow::Result<()> {
    // Migrate and status work on the configured database; copy names both.
    let configured = || -> anyhow::Result<_> {
        let settings = overrides.settings()?;
        let at = confab_server::config::mask_password(&settings.database);
        Ok((settings.to_config()?, at))
    };
    match action {
        DbCommand::Copy { from, to, replace } => copy(&from, &to, replace).await?,
        DbCommand::Migrate => {
            let (config, at) = configured()?;
            confab_server::open_store(&config).await?;
            let (version, _) = confab_server::schema_version(&config)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{at}: no schema after migrating"))?;
            println!("{at}: schema version {version}, up to date");
        }
        DbCommand::Status => {
            let (config, at) = configured()?;
            match confab_server::schema_version(&config).await? {
                None => println!("{at}: no Confab schema yet (confab db migrate creates it)"),
                Some((current, ours)) if current == ours => {
                    println!("{at}: schema version {current}, up to date")
                }
                Some((current, ours)) if current < ours => println!(
                    "{at}: schema version {current}; this binary's is {ours}: \
                 confab db migrate (or serve) upgrades it"
                ),
                Some((current, ours)) => println!(
                "{at}: schema version {current}, newer than this binary's {ours}: upgrade Confab"
            ),
            }
        }
    }
    Ok(())
}

async fn copy(from: &str, to: &str, replace: bool) -> anyhow::Result<()> {
    use confab_server::config::{mask_password, Database};
    let source = Database::parse(from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
    let target = Database::parse(to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    let mut shown = std::time::Instant::now();
    let census = confab_server::copy::copy(&source, &target, replace, |p| {
        if shown.elapsed().as_secs() >= 1 || p.messages == p.of {
            shown = std::time::Instant::now();
            let rate = p.messages as f64 / p.started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "copied {} of {} messages ({:.0}%), {rate:.0}/s",
                p.messages,
                p.of,
                100.0 * p.messages as f64 / p.of.max(1) as f64
            );
        }
    })
    .await?;
    println!(
        "copied {} users, {} tokens, {} rooms, {} memberships, {} bans and mutes and {} messages \
         from {} to {}; counts and every room's last seq checked",
        census.users,
        census.tokens,
        census.rooms,
        census.members,
        census.sanctions,
        census.messages,
        mask_password(from),
        mask_password(to)
    );
    Ok(())
}

async fn user(action: UserCommand, overrides: &Overrides) -> anyhow::Result<()> {
    use confab_core::auth::{check_password, Passwords};
    use confab_core::UserName;
    let config = overrides.settings()?.to_config()?;
    let store = confab_server::open_store(&config).await?;
    let name = |raw: &str| UserName::parse(raw).map_err(|e| anyhow::anyhow!(e.message));
    let new_password = |user: &UserName| -> anyhow::Result<String> {
        let password = read_password(user)?;
        check_password(&password).map_err(|e| anyhow::anyhow!(e.message))?;
        Ok(password)
    };
    match action {
        UserCommand::Add { name: raw } => {
            let user = name(&raw)?;
            let hash = Passwords::new(1).hash(new_password(&user)?).await?;
            store.create_user(&user, &hash).await?;
            println!("added {user}");
        }
        UserCommand::Passwd { name: raw } => {
            let user = name(&raw)?;
            let record = store
                .user(&user)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no user named {user}"))?;
            let hash = Passwords::new(1).hash(new_password(&record.name)?).await?;
            store.set_password(&record.name, &hash).await?;
            println!(
                "changed the password of {}; its sessions were logged out",
                record.name
            );
        }
        UserCommand::List => {
            for user in store.list_users().await? {
                println!("{user}");
            }
        }
        UserCommand::Delete { name: raw } => {
            let user = name(&raw)?;
            store.delete_user(&user).await?;
            println!("deleted {user}");
        }
        UserCommand::Op { name: ref raw } | UserCommand::Deop { name: ref raw } => {
            let user = name(raw)?;
            let op = matches!(action, UserCommand::Op { .. });
            store.set_operator(&user, op).await?;
            let now = if op { "an operator" } else { "no operator" };
            println!("{user} is {now} now");
        }
    }
    Ok(())
}

/// A password from a prompt without echo (asked twice) when standard input
/// is a terminal, else the first line of standard input.
fn read_password(user: &confab_core::UserName) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("password for {user}: "))?;
        let again = rpassword::prompt_password("again: ")?;
        anyhow::ensure!(first == again, "the passwords differ");
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// Logs to stderr: text (plain when not a terminal) or JSON lines. The
/// filter can be changed later through the handle.
fn init_logging(settings: &Settings) -> anyhow::Result<FilterHandle> {
    let filter = EnvFilter::try_new(&settings.log.level).context("log.level")?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match settings.log.format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    Ok(handle)
}

async fn serve(overrides: Overrides) -> anyhow::Result<()> {
    let mut settings = overrides.settings()?;
    let logs = init_logging(&settings)?;
    let files = confab_server::raise_fd_limit();
    tracing::info!(open_files = files, "open files limit");
    let config = settings.to_config()?;
    let http = bind(settings.http).await?;
    let line = match settings.line_addr()? {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let listeners = confab_server::Listeners { http, line };
    // Listen before serving, and keep the same listeners throughout, so
    // that no signal falls between two registrations.
    let mut hangup = signal(SignalKind::hangup())?;
    let mut stops = Stops::new()?;
    let server = confab_server::start(config, listeners).await?;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                match reload(&overrides, &settings, &server, &logs).await {
                    Ok(fresh) => settings = fresh,
                    Err(e) => tracing::error!(error = %e, "reload failed; nothing changed"),
                }
            }
            _ = stops.next() => break,
            // Stopped by itself: its storage failed (wait() says why).
            _ = server.stopping() => break,
        }
    }
    server.begin_shutdown();
    tokio::spawn(async move {
        stops.next().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
    server.wait().await?;
    Ok(())
}

/// SIGHUP: read the configuration again and apply what can change live.
async fn reload(
    overrides: &Overrides,
    current: &Settings,
    server: &confab_server::Server,
    logs: &FilterHandle,
) -> anyhow::Result<Settings> {
    let fresh = overrides.settings()?;
    server.reload(fresh.to_config()?).await?;
    logs.reload(EnvFilter::try_new(&fresh.log.level)?)?;
    let changes = current.changes(&fresh);
    if changes.is_empty() {
        tracing::info!("reloaded the configuration: nothing changed");
    }
    for change in changes {
        let restart = ["http:", "line:", "database:", "log.format:"]
            .iter()
            .any(|k| change.starts_with(k));
        if restart {
            tracing::warn!(%change, "this change needs a restart");
        } else {
            tracing::info!(%change, "configuration changed");
        }
    }
    Ok(fresh)
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// SIGINT and SIGTERM.
struct Stops {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Stops {
    fn new() -> std::io::Result<Stops> {
        Ok(Stops {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
