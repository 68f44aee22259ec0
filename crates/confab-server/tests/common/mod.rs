//! The real `confab` binary, started by a test.

// Each test binary uses a part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub struct Confab {
    child: Child,
    pub http: SocketAddr,
    /// Log lines, as they come.
    logs: mpsc::UnboundedReceiver<String>,
}

impl Confab {
    /// Start the binary on the database at `url`, on ports of its
    /// choosing; returns once it listens.
    pub async fn start(url: &str) -> Confab {
        Self::start_with(url, &[]).await
    }

    /// [`Confab::start`] with more arguments (`--http ADDR` among them
    /// replaces port 0).
    pub async fn start_with(url: &str, args: &[&str]) -> Confab {
        let http: &[&str] = if args.contains(&"--http") {
            &[]
        } else {
            &["--http", "127.0.0.1:0"]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
            .args(["serve", "--line", "127.0.0.1:0"])
            .args(http)
            .args(["--database", url])
            .args(args)
            .args(["--shutdown-grace-ms", "5000"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting confab");
        let (tx, mut logs) = mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        let mut said = Vec::new();
        let http = loop {
            let line = tokio::time::timeout(Duration::from_secs(30), logs.recv())
                .await
                .unwrap_or_else(|_| panic!("confab did not start:\n{}", said.join("\n")))
                .unwrap_or_else(|| panic!("confab exited at start:\n{}", said.join("\n")));
            said.push(line.clone());
            if line.contains("listening for HTTP and WebSocket") {
                let addr = line
                    .split("addr=")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap();
                break addr.parse().unwrap();
            }
        };
        Confab { child, http, logs }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Wait for a log line containing `text`.
    pub async fn log(&mut self, text: &str) {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), self.logs.recv())
                .await
                .expect("waiting for a log line")
                .expect("confab exited");
            if line.contains(text) {
                return;
            }
        }
    }

    pub async fn exit(mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("confab did not exit")
            .expect("waiting for confab")
    }
}

/// History (seq to body) is one gapless order from 1 and holds every
/// acknowledged (seq, body).
pub fn assert_holds_every_ack(
    stored: &std::collections::BTreeMap<u64, String>,
    acks: &[(u64, String)],
) {
    let last = *stored.keys().last().expect("messages stored");
    assert_eq!(
        stored.keys().copied().collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "no gaps"
    );
    for (seq, body) in acks {
        assert_eq!(
            stored.get(seq),
            Some(body),
            "acknowledged seq {seq} is in history with its body"
        );
    }
}
