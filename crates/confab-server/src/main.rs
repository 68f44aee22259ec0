//! The `confab` command line. Everything it runs lives in the library.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use confab_server::{Config, Database};

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
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
    let http = bind(args.http).await?;
    let line = match args.no_line {
        true => None,
        false => Some(bind(args.line).await?),
    };
    let listeners = confab_server::Listeners { http, line };
    confab_server::run(config, listeners, shutdown_signal()).await?;
    Ok(())
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
