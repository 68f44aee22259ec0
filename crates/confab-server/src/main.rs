//! The `confab` command line. Everything it runs lives in the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use confab_server::{Config, Database};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(name = "confab", version, about = "A real-time chat server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Serve),
}

#[derive(clap::Args)]
struct Serve {
    /// Address of the HTTP and WebSocket listener (WebSocket at /ws).
    #[arg(long, default_value = "127.0.0.1:8080", env = "CONFAB_HTTP")]
    http: SocketAddr,
    /// Address of the line-protocol listener (for nc and telnet).
    #[arg(long, default_value = "127.0.0.1:7777", env = "CONFAB_LINE")]
    line: SocketAddr,
    /// Do not open the line-protocol listener.
    #[arg(long)]
    no_line: bool,
    /// Storage: sqlite://PATH (relative) or sqlite:///ABSOLUTE/PATH,
    /// optionally with ?synchronous=normal (survives a process crash, not
    /// a power cut; faster).
    #[arg(
        long,
        default_value = "sqlite://data/confab.db",
        env = "CONFAB_DATABASE"
    )]
    database: String,
    /// WebSocket ping interval in milliseconds; silent for two is dead.
    #[arg(long, default_value_t = 30_000)]
    heartbeat_ms: u64,
    /// Refuse `guest` logins.
    #[arg(long)]
    no_guests: bool,
    /// Serve both listeners over TLS with this certificate chain (PEM);
    /// needs --tls-key. SIGHUP reloads both files.
    #[arg(long, requires = "tls_key", env = "CONFAB_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert", env = "CONFAB_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Most chat connections at once.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Most chat connections from one IP address.
    #[arg(long, default_value_t = 256)]
    max_connections_per_ip: usize,
    /// How long a graceful shutdown may take, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    shutdown_grace_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
    }
}

async fn serve(args: Serve) -> anyhow::Result<()> {
    let mut config = Config {
        database: Database::parse(&args.database).map_err(anyhow::Error::msg)?,
        heartbeat: Duration::from_millis(args.heartbeat_ms.max(1)),
        ..Config::default()
    };
    config.chat.allow_guests = !args.no_guests;
    config.max_connections = args.max_connections;
    config.max_connections_per_ip = args.max_connections_per_ip;
    config.shutdown_grace = Duration::from_millis(args.shutdown_grace_ms);
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(confab_server::TlsFiles { cert, key });
    }
    let http = bind(args.http).await?;
    let line = match args.no_line {
        true => None,
        false => Some(bind(args.line).await?),
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
                if let Err(e) = server.reload().await {
                    tracing::error!(error = %e, "reload failed; keeping the running configuration");
                }
            }
            _ = stops.next() => break,
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
