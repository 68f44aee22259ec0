//! The `confab-bench` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use confab_bench::report::svg;
use confab_bench::scenarios::{connect, fanout, idle, persist};
use confab_bench::{check_loopback, raise_fd_limit};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(
    name = "confab-bench",
    about = "Load scenarios for Confab (and NATS and Redis as peers), on loopback"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Write the result as JSON to this file.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Draw the latency by percentile as SVG to this file.
    #[arg(long, global = true)]
    svg: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N logged-in connections; report the server's memory and CPU.
    Idle {
        #[arg(long, default_value = "127.0.0.1:8080")]
        server: SocketAddr,
        #[arg(long)]
        server_pid: u32,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        hold_secs: u64,
    },
    /// Rooms × members, publishers at a fixed total rate; deliveries and latency.
    Fanout {
        #[arg(long, value_enum, default_value = "confab")]
        system: fanout::System,
        /// The server's process (several, comma-separated, for a cluster's
        /// nodes): its CPU per message, in user space and in the kernel,
        /// is reported.
        #[arg(long, value_delimiter = ',')]
        server_pid: Vec<u32>,
        #[command(flatten)]
        shape: Shape,
    },
    /// Senders sending as fast as acknowledgements come back.
    Persist {
        #[arg(long, default_value = "127.0.0.1:8080")]
        server: SocketAddr,
        #[arg(long, default_value_t = 50)]
        senders: usize,
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
        #[arg(long, default_value_t = 100)]
        body: usize,
        /// All senders into one room, instead of a room each.
        #[arg(long)]
        one_room: bool,
        /// Messages each sender keeps unacknowledged (pipelined sends);
        /// 1 waits for each ack before the next send.
        #[arg(long, default_value_t = 1)]
        window: usize,
    },
    /// Connections plus logins per second.
    Connect {
        #[arg(long, default_value = "127.0.0.1:8080")]
        server: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, value_enum, default_value = "guest")]
        mode: connect::Mode,
    },
    /// The same fan-out against Confab (fsync per commit, and at checkpoints
    /// only), nats-server and redis-server, started here and taking turns at
    /// each step of `--rates`, each raised until a rate does not hold.
    /// `--svg` draws p99 against deliveries/s.
    Compare {
        /// The confab binary (build it with --release).
        #[arg(long, default_value = "target/release/confab")]
        confab: PathBuf,
        /// Another confab binary (the build before a change, say), run like
        /// `--confab` (fsync per commit) in a row `confab-baseline` of the
        /// same sweep; the row is added when this is given.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// The rows of the sweep, in the order they take turns.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "confab,confab-sync-normal,nats,redis"
        )]
        systems: Vec<Row>,
        #[arg(long, default_value = "nats-server")]
        nats: PathBuf,
        #[arg(long, default_value = "redis-server")]
        redis: PathBuf,
        /// Messages per second to step through, ascending (all publishers
        /// together); a fresh server for each. A step holds when its p99 is
        /// at most 50 ms and nothing was lost (every delivery in time),
        /// duplicated, out of order or refused; a system stops at its first
        /// step that does not. Without it, `--rate` alone. Past the last,
        /// the sweep goes on by the last step's size while a system still
        /// holds (up to `--extra-steps` more), so that each finds its limit.
        #[arg(long, value_delimiter = ',')]
        rates: Vec<u64>,
        /// Most steps past `--rates` while a system still holds (0: none).
        /// One that holds even then is reported as holding at least its
        /// last rate, and a ratio against it as a bound.
        #[arg(long, default_value_t = 8)]
        extra_steps: usize,
        /// Runs per step (a fresh server each); the step is judged by the
        /// run with the median p99, and fails if any run lost, duplicated,
        /// reordered or was refused anything. On a shared two-core machine
        /// one run's p99 swings by 2x; the median of three is steadier.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[command(flatten)]
        shape: Shape,
    },
}

#[derive(clap::Args, Clone)]
struct Shape {
    /// The server (for `fanout`; `compare` starts its own); several,
    /// comma-separated, spread the clients over a cluster's nodes.
    #[arg(long, default_value = "127.0.0.1:8080", value_delimiter = ',')]
    server: Vec<SocketAddr>,
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    #[arg(long, default_value_t = 1000)]
    members: usize,
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Messages per second, all publishers together.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    #[arg(long, default_value_t = 100)]
    body: usize,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
}

impl Shape {
    fn options(
        &self,
        system: fanout::System,
        servers: Vec<SocketAddr>,
        server_pids: Vec<u32>,
    ) -> fanout::Options {
        fanout::Options {
            system,
            servers,
            rooms: self.rooms,
            members: self.members,
            publishers: self.publishers,
            rate: self.rate,
            body: self.body,
            duration: Duration::from_secs(self.duration_secs),
            drain: Duration::from_secs(5),
            server_pids,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let limit = raise_fd_limit();
    eprintln!("open files limit: {limit}");
    let (result, plots) = match cli.scenario {
        Scenario::Idle {
            server,
            server_pid,
            connections,
            concurrency,
            hold_secs,
        } => {
            check_loopback(server)?;
            let o = idle::run(idle::Options {
                server,
                server_pid,
                connections,
                concurrency,
                hold: Duration::from_secs(hold_secs),
            })
            .await?;
            println!(
                "idle: {} of {} connections; server RSS +{:.0} bytes/connection, kernel {:.0} bytes/connection, \
                 idle CPU {:.2}%; 1,000,000 connections ≈ {:.1} GiB",
                o.connected, o.connections, o.rss_per_connection_bytes, o.kernel_per_connection_bytes,
                o.idle_cpu_percent, o.projected_gib_per_million
            );
            (json!(o), vec![])
        }
        Scenario::Fanout {
            system,
            server_pid,
            shape,
        } => {
            for server in &shape.server {
                check_loopback(*server)?;
            }
            for &pid in &server_pid {
                if confab_bench::cpu::Cpu::of(pid).is_none() {
                    anyhow::bail!("--server-pid {pid}: no such process to measure here");
                }
            }
            let o = fanout::run(shape.options(system, shape.server.clone(), server_pid)).await?;
            print_fanout(&o);
            let plot = (
                format!("{:?}", o.system).to_lowercase(),
                o.histogram.clone(),
            );
            (json!(o), vec![plot])
        }
        Scenario::Persist {
            server,
            senders,
            duration_secs,
            body,
            one_room,
            window,
        } => {
            check_loopback(server)?;
            let o = persist::run(persist::Options {
                server,
                senders,
                duration: Duration::from_secs(duration_secs),
                body,
                one_room,
                window,
            })
            .await?;
            println!(
                "persist: {} senders × {} in flight, {:.0} acknowledged messages/s ({} acked, {} refused, {} out of order); ack {}",
                o.senders, o.window, o.acks_per_s, o.acked, o.refused, o.out_of_order, o.ack_latency
            );
            let plot = ("ack".to_owned(), o.latency.clone());
            (json!(o), vec![plot])
        }
        Scenario::Connect {
            server,
            connections,
            concurrency,
            mode,
        } => {
            check_loopback(server)?;
            let o = connect::run(connect::Options {
                server,
                connections,
                concurrency,
                mode,
            })
            .await?;
            println!(
                "connect ({:?}): {:.0} connections+logins/s ({} ok, {} failed); {}",
                o.mode, o.per_s, o.logged_in, o.failed, o.latency
            );
            (json!(o), vec![])
        }
        Scenario::Compare {
            confab,
            baseline,
            systems,
            nats,
            redis,
            rates,
            extra_steps,
            repeat,
            shape,
        } => {
            let rates = if rates.is_empty() {
                vec![shape.rate]
            } else {
                rates
            };
            let steps = Steps {
                rates,
                extra: extra_steps,
            };
            let rows = rows(systems, baseline.is_some())?;
            let binaries = Binaries {
                confab,
                baseline,
                nats,
                redis,
            };
            let (result, plot) = compare(&binaries, &rows, steps, repeat, shape).await?;
            if let Some(path) = &cli.svg {
                std::fs::write(path, plot)?;
                eprintln!("wrote {}", path.display());
            }
            (result, Vec::new())
        }
    };
    if let Some(path) = cli.out {
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
        eprintln!("wrote {}", path.display());
    }
    if let (Some(path), false) = (cli.svg, plots.is_empty()) {
        std::fs::write(&path, svg("delivery latency by percentile", &plots))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn print_fanout(o: &fanout::Outcome) {
    println!(
        "fanout {:?}: {} rooms × {} members, {} publishers at {}/s, {} B: {:.0} deliveries/s; \
         {} published, {} delivered of {} expected, {} lost, {} duplicated, {} out of order, {} refused; latency {}",
        o.system, o.rooms, o.members, o.publishers, o.rate, o.body_bytes, o.deliveries_per_s, o.published,
        o.delivered, o.expected, o.lost, o.duplicated, o.out_of_order, o.refused, o.latency
    );
    if let Some(cpu) = o.server_cpu {
        println!("  the server's CPU per message: {cpu}");
    }
}

/// A free loopback port (bound and released; the child binds it next).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The highest p99 a sweep step may have and hold.
const HOLDS_P99_MS: f64 = 50.0;

/// Whether a step held, or why not.
fn verdict(o: &fanout::Outcome) -> Result<(), String> {
    let mut why = Vec::new();
    if o.latency.p99_ms > HOLDS_P99_MS {
        why.push(format!("p99 {:.0} ms", o.latency.p99_ms));
    }
    for (n, what) in [
        (o.lost, "not delivered in time"),
        (o.duplicated, "duplicated"),
        (o.out_of_order, "out of order"),
        (o.refused, "refused"),
    ] {
        if n > 0 {
            why.push(format!("{n} {what}"));
        }
    }
    match why.is_empty() {
        true => Ok(()),
        false => Err(why.join(", ")),
    }
}

/// The run with the median p99, unless a run lost, duplicated, reordered
/// or was refused anything: then that run, which fails the step whatever
/// its latency.
fn median_run(mut runs: Vec<fanout::Outcome>) -> fanout::Outcome {
    let faulty = |o: &fanout::Outcome| o.lost + o.duplicated + o.out_of_order + o.refused > 0;
    if let Some(i) = runs.iter().position(faulty) {
        return runs.swap_remove(i);
    }
    runs.sort_by(|a, b| a.latency.p99_ms.total_cmp(&b.latency.p99_ms));
    runs.swap_remove(runs.len() / 2)
}

/// A row of a `compare` sweep: a system and how it is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Row {
    /// `--confab`, an fsync per commit.
    Confab,
    /// `--confab`, fsync at checkpoints only.
    ConfabSyncNormal,
    /// `--baseline`, an fsync per commit.
    ConfabBaseline,
    Nats,
    Redis,
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Confab => "confab",
            Row::ConfabSyncNormal => "confab-sync-normal",
            Row::ConfabBaseline => "confab-baseline",
            Row::Nats => "nats",
            Row::Redis => "redis",
        }
    }

    fn system(self) -> fanout::System {
        match self {
            Row::Confab | Row::ConfabSyncNormal | Row::ConfabBaseline => fanout::System::Confab,
            Row::Nats => fanout::System::Nats,
            Row::Redis => fanout::System::Redis,
        }
    }
}

/// The rows asked for, each once, with `confab-baseline` after `confab`
/// (or first) when a baseline binary is given and the row was not asked
/// for; a baseline row without a binary is an error.
fn rows(mut asked: Vec<Row>, baseline: bool) -> anyhow::Result<Vec<Row>> {
    let mut seen = Vec::new();
    asked.retain(|r| {
        let first = !seen.contains(r);
        seen.push(*r);
        first
    });
    match (baseline, asked.contains(&Row::ConfabBaseline)) {
        (false, true) => anyhow::bail!("the row confab-baseline needs --baseline BINARY"),
        (true, false) => {
            let at = asked
                .iter()
                .position(|r| *r == Row::Confab)
                .map_or(0, |i| i + 1);
            asked.insert(at, Row::ConfabBaseline);
        }
        _ => {}
    }
    if asked.is_empty() {
        anyhow::bail!("--systems names no row");
    }
    Ok(asked)
}

/// The binaries `compare` starts.
struct Binaries {
    confab: PathBuf,
    baseline: Option<PathBuf>,
    nats: PathBuf,
    redis: PathBuf,
}

/// Start one of the compared systems on a free port.
async fn start_system(
    row: Row,
    binaries: &Binaries,
    dir: &std::path::Path,
) -> anyhow::Result<(tokio::process::Child, SocketAddr)> {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/confab.toml");
    let port = free_port()?;
    let name = row.name();
    let mut command = match row {
        Row::Nats => {
            let mut c = tokio::process::Command::new(&binaries.nats);
            c.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
            c
        }
        Row::Redis => {
            let mut c = tokio::process::Command::new(&binaries.redis);
            c.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"]);
            c
        }
        Row::Confab | Row::ConfabSyncNormal | Row::ConfabBaseline => {
            let (binary, sync) = match (row, &binaries.baseline) {
                (Row::ConfabBaseline, Some(baseline)) => (baseline, "full"),
                (Row::ConfabBaseline, None) => anyhow::bail!("no --baseline binary"),
                (Row::ConfabSyncNormal, _) => (&binaries.confab, "normal"),
                _ => (&binaries.confab, "full"),
            };
            let db = dir.join(format!("{name}-{port}.db"));
            let mut c = tokio::process::Command::new(binary);
            c.args(["serve", "--config", config])
                .args(["--http", &format!("127.0.0.1:{port}")])
                .args([
                    "--database",
                    &format!("sqlite://{}?synchronous={sync}", db.display()),
                ]);
            c
        }
    };
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let server: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_for(server, &mut child)
        .await
        .with_context(|| format!("{name} did not start"))?;
    Ok((child, server))
}

/// The rates a sweep steps through: the ones given, then up to `extra`
/// more, each the last step's size past the one before.
struct Steps {
    rates: Vec<u64>,
    extra: usize,
}

impl Steps {
    /// The rate after `rates` (not empty): by the last step's size, or by
    /// a quarter when only one rate was given.
    fn next(rates: &[u64]) -> u64 {
        let last = rates[rates.len() - 1];
        let step = match rates {
            [.., before, last] if last > before => last - before,
            _ => (last / 4).max(1),
        };
        last + step
    }
}

/// A system's steps as the table reads them: the highest it held and the
/// first it did not.
#[derive(Clone, Copy)]
struct Sweep<'a> {
    held: Option<&'a fanout::Outcome>,
    failed: Option<&'a fanout::Outcome>,
}

impl<'a> Sweep<'a> {
    fn of(steps: &'a [fanout::Outcome]) -> Self {
        Sweep {
            held: steps.iter().rfind(|o| verdict(o).is_ok()),
            failed: steps.iter().find(|o| verdict(o).is_err()),
        }
    }

    /// The deliveries/s of the highest step held, and whether a step
    /// failed (the limit was found), for [`ratio_to`].
    fn best(&self) -> Option<(f64, bool)> {
        self.held
            .map(|o| (o.deliveries_per_s, self.failed.is_some()))
    }
}

/// How a system's highest held rate compares with redis-server's, as a
/// ratio of deliveries/s. Each is `(deliveries/s, whether a step failed)`:
/// one that never failed only shows that its limit is higher, so the ratio
/// is then a bound.
fn ratio_to(this: Option<(f64, bool)>, redis: Option<(f64, bool)>) -> String {
    match (this, redis) {
        (Some((a, a_found)), Some((r, r_found))) if r > 0.0 => {
            let bound = match (a_found, r_found) {
                (true, true) => "",
                (true, false) => "≤ ",
                (false, true) => "≥ ",
                (false, false) => return "–".to_owned(),
            };
            format!("{bound}{:.2}×", a / r)
        }
        _ => "–".to_owned(),
    }
}

/// Each system up the rates until one does not hold; the table of the
/// highest rate each held, side by side, and the plot of p99 by rate.
async fn compare(
    binaries: &Binaries,
    runs: &[Row],
    steps: Steps,
    repeat: usize,
    shape: Shape,
) -> anyhow::Result<(serde_json::Value, String)> {
    let dir = std::env::temp_dir().join(format!("confab-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Step by step, the systems take turns (and, with --repeat, runs take
    // turns too): a busy spell of the machine falls on all of them rather
    // than on whichever system ran then. A system leaves at its first step
    // that does not hold.
    let mut sweeps: Vec<(&str, Vec<fanout::Outcome>)> =
        runs.iter().map(|row| (row.name(), Vec::new())).collect();
    let mut going: Vec<bool> = vec![true; runs.len()];
    let Steps { mut rates, extra } = steps;
    let given = rates.len();
    let mut step = 0;
    while step < rates.len() {
        let rate = rates[step];
        let shape = Shape {
            rate,
            ..shape.clone()
        };
        let mut tries: Vec<Vec<fanout::Outcome>> = runs.iter().map(|_| Vec::new()).collect();
        for _ in 0..repeat.max(1) {
            for (i, row) in runs.iter().enumerate() {
                if !going[i] {
                    continue;
                }
                let (mut child, server) = start_system(*row, binaries, &dir).await?;
                eprintln!("== {} on {server} at {rate}/s", row.name());
                let pids = child.id().into_iter().collect();
                let o = fanout::run(shape.options(row.system(), vec![server], pids)).await?;
                let _ = child.kill().await;
                print_fanout(&o);
                tries[i].push(o);
            }
        }
        for (i, attempts) in tries.into_iter().enumerate() {
            if attempts.is_empty() {
                continue;
            }
            let o = median_run(attempts);
            if let Err(why) = verdict(&o) {
                eprintln!("   {} does not hold {rate}/s: {why}", sweeps[i].0);
                going[i] = false;
            }
            sweeps[i].1.push(o);
        }
        step += 1;
        if step == rates.len() && going.contains(&true) && rates.len() - given < extra {
            rates.push(Steps::next(&rates));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let redis_best = sweeps
        .iter()
        .find(|(n, _)| *n == "redis")
        .and_then(|(_, s)| Sweep::of(s).best());
    println!(
        "\n{} rooms × {} members, {} publishers, {} B; steps of {:?} messages/s\n",
        shape.rooms, shape.members, shape.publishers, shape.body, rates
    );
    println!("| system | highest rate held (msg/s) | deliveries/s | p50 ms | p99 ms | server CPU per message | the next step | vs redis |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut table = serde_json::Map::new();
    for (name, steps) in &sweeps {
        let sweep = Sweep::of(steps);
        let Sweep { held, failed } = sweep;
        let next = match failed {
            Some(o) => format!("{}/s: {}", o.rate, verdict(o).err().unwrap_or_default()),
            None => "held every step: its limit is higher".to_owned(),
        };
        let cell = |f: &dyn Fn(&fanout::Outcome) -> String| held.map_or("–".to_owned(), f);
        let at_least = if failed.is_none() { "≥ " } else { "" };
        let ratio = ratio_to(sweep.best(), redis_best);
        println!(
            "| {name} | {} | {} | {} | {} | {} | {next} | {ratio} |",
            cell(&|o| format!("{at_least}{}", o.rate)),
            cell(&|o| format!("{:.0}", o.deliveries_per_s)),
            cell(&|o| format!("{:.1}", o.latency.p50_ms)),
            cell(&|o| format!("{:.1}", o.latency.p99_ms)),
            cell(&|o| o.server_cpu.map_or("–".to_owned(), |c| c.to_string())),
        );
        table.insert(
            name.to_string(),
            json!({
                "limit_found": failed.is_some(),
                "vs_redis": ratio,
                "highest_held": held.map(|o| json!({
                    "rate": o.rate,
                    "deliveries_per_s": o.deliveries_per_s,
                    "p99_ms": o.latency.p99_ms,
                    "server_cpu": o.server_cpu,
                })),
                "steps": steps,
            }),
        );
    }
    // Points of p99 by rate; a step far over the line is drawn at 4× it,
    // so that the others stay readable.
    let cap = HOLDS_P99_MS * 4.0;
    let lines: Vec<(String, Vec<(f64, f64)>)> = sweeps
        .iter()
        .map(|(name, steps)| {
            let pts = steps
                .iter()
                .map(|o| (o.deliveries_per_s, o.latency.p99_ms.min(cap)))
                .collect();
            (name.to_string(), pts)
        })
        .collect();
    let title = format!(
        "p99 by delivery rate, {} × {} (50 ms dashed; capped at {cap:.0} ms)",
        shape.rooms, shape.members
    );
    let plot = confab_bench::report::sweep_svg(&title, &lines);
    Ok((
        json!({ "rates": rates, "shape": {"rooms": shape.rooms, "members": shape.members,
                "publishers": shape.publishers, "body": shape.body,
                "duration_secs": shape.duration_secs}, "systems": table }),
        plot,
    ))
}

/// Until `addr` accepts connections (the child was just started).
async fn wait_for(addr: SocketAddr, child: &mut tokio::process::Child) -> anyhow::Result<()> {
    let stderr = child.stderr.take();
    if let Some(stderr) = stderr {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(_)) = lines.next_line().await {}
        });
    }
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("exited with {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("not listening after 10 s")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p99_ms: f64, lost: u64) -> fanout::Outcome {
        fanout::Outcome {
            system: fanout::System::Confab,
            rooms: 1,
            members: 1,
            publishers: 1,
            rate: 1,
            body_bytes: 1,
            duration_s: 1.0,
            published: 1,
            refused: 0,
            expected: 1,
            delivered: 1 - lost,
            lost,
            duplicated: 0,
            out_of_order: 0,
            deliveries_per_s: 1.0,
            latency: confab_bench::report::Percentiles {
                count: 1,
                mean_ms: p99_ms,
                p50_ms: p99_ms,
                p90_ms: p99_ms,
                p99_ms,
                p999_ms: p99_ms,
                max_ms: p99_ms,
            },
            server_cpu: None,
            histogram: Default::default(),
        }
    }

    #[test]
    fn a_step_is_judged_by_its_median_run_unless_one_lost_anything() {
        let median = median_run(vec![run(70.0, 0), run(20.0, 0), run(40.0, 0)]);
        assert_eq!(median.latency.p99_ms, 40.0);
        let faulty = median_run(vec![run(20.0, 0), run(10.0, 1), run(30.0, 0)]);
        assert_eq!(
            faulty.lost, 1,
            "a loss fails the step whatever the latencies"
        );
        assert!(verdict(&faulty).is_err());
    }

    #[test]
    fn a_sweep_goes_on_by_its_last_step_past_the_rates_given() {
        assert_eq!(Steps::next(&[16_000, 24_000, 32_000]), 40_000);
        assert_eq!(Steps::next(&[8_000, 12_000, 20_000]), 28_000);
        assert_eq!(
            Steps::next(&[1_000]),
            1_250,
            "a quarter on from a lone rate"
        );
        assert_eq!(Steps::next(&[2]), 3, "never a step of nothing");
        assert_eq!(Steps::next(&[500, 500]), 625);
    }

    #[test]
    fn a_baseline_gets_a_row_after_confab_and_only_with_its_binary() {
        use Row::*;
        let default = vec![Confab, ConfabSyncNormal, Nats, Redis];
        assert_eq!(rows(default.clone(), false).unwrap(), default);
        assert_eq!(
            rows(default, true).unwrap(),
            [Confab, ConfabBaseline, ConfabSyncNormal, Nats, Redis]
        );
        assert_eq!(
            rows(vec![Redis, ConfabBaseline, Confab, Redis], true).unwrap(),
            [Redis, ConfabBaseline, Confab],
            "as asked, each once"
        );
        assert_eq!(rows(vec![Nats], true).unwrap(), [ConfabBaseline, Nats]);
        let err = rows(vec![ConfabBaseline, Redis], false).unwrap_err();
        assert!(err.to_string().contains("--baseline"), "{err}");
    }

    #[test]
    fn a_ratio_against_a_limit_not_found_is_a_bound() {
        let found = |d: f64| Some((d, true));
        let not_found = |d: f64| Some((d, false));
        assert_eq!(ratio_to(found(400.0), found(640.0)), "0.62×");
        assert_eq!(
            ratio_to(found(400.0), not_found(640.0)),
            "≤ 0.62×",
            "redis-server held every step: its limit, and so the gap, may be larger"
        );
        assert_eq!(ratio_to(not_found(800.0), found(640.0)), "≥ 1.25×");
        assert_eq!(ratio_to(not_found(800.0), not_found(640.0)), "–");
        assert_eq!(ratio_to(None, found(640.0)), "–", "held no step");
        assert_eq!(ratio_to(found(400.0), None), "–");
    }
}
