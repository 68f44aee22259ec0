//! For tests: a key prefix of one's own on a shared Redis, a
//! `redis-server` of one's own to stop and start, and a TCP proxy to cut
//! a connection to any server (Redis, PostgreSQL) and restore it.

use std::sync::atomic::{AtomicU32, Ordering};

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::BrokerUrl;

/// The shared test Redis (`CONFAB_TEST_REDIS`), or `None` after saying
/// the test is skipped.
pub fn shared_redis() -> Option<String> {
    match std::env::var("CONFAB_TEST_REDIS") {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!("skipped: set CONFAB_TEST_REDIS=redis://127.0.0.1:6379 to run this on Redis");
            None
        }
    }
}

/// A key prefix of its own, deleted with everything under it on drop.
pub struct Prefix {
    url: String,
    pub prefix: String,
}

impl Prefix {
    pub fn new(url: &str) -> Prefix {
        static N: AtomicU32 = AtomicU32::new(0);
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).unwrap();
        let prefix = format!(
            "test-{}-{}-{:02x}{:02x}{:02x}{:02x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            r[0],
            r[1],
            r[2],
            r[3]
        );
        Prefix {
            url: url.to_owned(),
            prefix,
        }
    }

    /// The broker URL of this prefix.
    pub fn broker_url(&self) -> BrokerUrl {
        BrokerUrl::parse(&format!("{}?prefix={}", self.url, self.prefix)).unwrap()
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

/// A `redis-server` of the test's own, on a free port.
pub struct OwnRedis {
    port: u16,
    child: Option<tokio::process::Child>,
}

impl OwnRedis {
    pub async fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut own = OwnRedis { port, child: None };
        own.restart().await;
        own
    }

    /// Start it again on the same port (empty: it keeps nothing).
    pub async fn restart(&mut self) {
        let mut child = tokio::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed (apt install redis-server)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Ready to accept connections") {
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A TCP proxy to `target` that a test cuts and restores: cut, it drops
/// its connections and every new one, as a network partition does;
/// stalled, it forwards nothing either way and closes nothing, as a path
/// that drops every packet in silence does (though the kernel acknowledges
/// what is sent).
pub struct CutProxy {
    pub addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    stalled: tokio::sync::watch::Sender<bool>,
}

impl CutProxy {
    /// A proxy to `target` (HOST:PORT).
    pub async fn start(target: String) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding port 0");
        let addr = listener.local_addr().expect("local address");
        let (cut, is_cut) = tokio::sync::watch::channel(false);
        let (stalled, is_stalled) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut is_cut = is_cut.clone();
                if *is_cut.borrow() {
                    continue; // dropped: closed at once
                }
                let (target, is_stalled) = (target.clone(), is_stalled.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let ((in_r, in_w), (out_r, out_w)) =
                        (inbound.into_split(), outbound.into_split());
                    tokio::select! {
                        _ = pipe(in_r, out_w, is_stalled.clone()) => {}
                        _ = pipe(out_r, in_w, is_stalled) => {}
                        _ = is_cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        CutProxy { addr, cut, stalled }
    }

    /// Cut (`true`) or restore the path.
    pub fn cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// Stall (`true`) or resume the path: what was held goes on.
    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

/// Copy one way, holding what was read while the path is stalled.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
