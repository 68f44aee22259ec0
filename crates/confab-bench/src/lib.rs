//! confab-bench: load scenarios against a Confab server (and, for fan-out,
//! NATS and Redis pub/sub), each bounded by a count or a duration, on
//! loopback only.
//!
//! - [`client`]: a lean WebSocket client for Confab (no JSON parsing on the
//!   hot path).
//! - [`peers`]: minimal NATS core and Redis pub/sub clients.
//! - [`scenarios`]: `idle`, `fanout`, `persist`, `connect`.
//! - [`report`]: latency histograms, the JSON result, the summary and an
//!   SVG latency plot.

pub mod client;
pub mod cpu;
pub mod peers;
pub mod report;
pub mod scenarios;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The `i`-th loopback source address: 127.0.0.1 and up, spread over
/// 127.0.0.0/8 so that per-address limits and ephemeral ports last.
pub fn source_addr(i: usize) -> IpAddr {
    let n = (i % (250 * 250)) as u32;
    IpAddr::V4(Ipv4Addr::new(127, 0, (n / 250) as u8, (n % 250 + 1) as u8))
}

/// Refuse anything but loopback: the tool loads only this machine.
pub fn check_loopback(addr: SocketAddr) -> anyhow::Result<()> {
    anyhow::ensure!(addr.ip().is_loopback(), "{addr} is not a loopback address");
    Ok(())
}

pub use confab_server::raise_fd_limit;

/// A simple progress line on stderr, redrawn in place on a terminal.
pub struct Progress {
    label: String,
    tty: bool,
    last: std::time::Instant,
    /// Off a terminal: print at each quarter.
    next_quarter: u64,
}

impl Progress {
    pub fn new(label: &str) -> Progress {
        use std::io::IsTerminal;
        Progress {
            label: label.to_owned(),
            tty: std::io::stderr().is_terminal(),
            last: std::time::Instant::now(),
            next_quarter: 1,
        }
    }

    /// `done` of `total`, with a note; at most a few times a second.
    pub fn show(&mut self, done: u64, total: u64, note: &str) {
        let total = total.max(1);
        if self.tty {
            if self.last.elapsed().as_millis() < 250 && done < total {
                return;
            }
            self.last = std::time::Instant::now();
            let width = 30u64;
            let filled = (done.min(total) * width / total) as usize;
            let bar = format!(
                "{}{}",
                "#".repeat(filled),
                "-".repeat(width as usize - filled)
            );
            eprint!("\r[{}] {bar} {done}/{total} {note}   ", self.label);
        } else if done * 4 >= self.next_quarter * total {
            eprintln!("[{}] {done}/{total} {note}", self.label);
            self.next_quarter = done * 4 / total + 1;
        }
    }

    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
