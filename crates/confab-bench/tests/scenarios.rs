//! A tiny run of every scenario against a test server; each checks its own
//! counts. The NATS and Redis fan-outs run when CONFAB_TEST_NATS and
//! CONFAB_TEST_REDIS name a server (`nats://127.0.0.1:4222`,
//! `redis://127.0.0.1:6379`), and say why they are skipped otherwise.

use std::net::SocketAddr;
use std::time::Duration;

use confab_bench::scenarios::{connect, fanout, idle, persist};
use confab_testkit::confab_server::RateLimits;
use confab_testkit::TestServer;

async fn server() -> TestServer {
    TestServer::with_config(|c| c.chat.rate_limits = RateLimits::off()).await
}

fn tiny_fanout(system: fanout::System, server: SocketAddr) -> fanout::Options {
    fanout::Options {
        system,
        servers: vec![server],
        rooms: 2,
        members: 3,
        publishers: 3,
        rate: 300,
        body: 64,
        duration: Duration::from_millis(800),
        drain: Duration::from_secs(5),
        server_pids: Vec::new(),
    }
}

fn assert_complete(o: &fanout::Outcome) {
    assert!(o.published > 50, "{o:?}");
    assert_eq!(o.refused, 0, "{o:?}");
    assert_eq!(o.expected, o.published * 3, "{o:?}");
    assert_eq!(o.delivered, o.expected, "nothing lost: {o:?}");
    assert_eq!((o.lost, o.duplicated, o.out_of_order), (0, 0, 0), "{o:?}");
    assert_eq!(o.latency.count, o.delivered);
}

#[tokio::test]
async fn fanout_counts_every_delivery() {
    let server = server().await;
    let o = fanout::run(fanout::Options {
        // The test server runs in this process.
        server_pids: vec![std::process::id()],
        ..tiny_fanout(fanout::System::Confab, server.addr)
    })
    .await
    .unwrap();
    assert_complete(&o);
    let cpu = o.server_cpu.expect("the server's CPU, its process given");
    assert!(cpu.user_us >= 0.0 && cpu.kernel_us >= 0.0, "{cpu:?}");
}

fn peer(var: &str) -> Option<SocketAddr> {
    match std::env::var(var) {
        Ok(url) => {
            let hostport = url
                .split("://")
                .nth(1)
                .unwrap_or(&url)
                .trim_end_matches('/');
            Some(hostport.parse().expect("HOST:PORT in the URL"))
        }
        Err(_) => {
            eprintln!("skipped: {var} is not set");
            None
        }
    }
}

#[tokio::test]
async fn fanout_against_nats() {
    if let Some(addr) = peer("CONFAB_TEST_NATS") {
        assert_complete(
            &fanout::run(tiny_fanout(fanout::System::Nats, addr))
                .await
                .unwrap(),
        );
    }
}

#[tokio::test]
async fn fanout_against_redis() {
    if let Some(addr) = peer("CONFAB_TEST_REDIS") {
        assert_complete(
            &fanout::run(tiny_fanout(fanout::System::Redis, addr))
                .await
                .unwrap(),
        );
    }
}

#[tokio::test]
async fn persist_acknowledges_in_order() {
    let server = server().await;
    for (one_room, window) in [(false, 1), (true, 1), (false, 16), (true, 16)] {
        let o = persist::run(persist::Options {
            server: server.addr,
            senders: 3,
            duration: Duration::from_millis(600),
            body: 40,
            one_room,
            window,
        })
        .await
        .unwrap();
        assert!(o.acked > 10, "{o:?}");
        assert_eq!((o.refused, o.out_of_order), (0, 0), "{o:?}");
        assert_eq!(o.ack_latency.count, o.acked);
    }
}

#[tokio::test]
async fn connect_as_guests_and_with_resume() {
    let server = server().await;
    for mode in [connect::Mode::Guest, connect::Mode::Resume] {
        let o = connect::run(connect::Options {
            server: server.addr,
            connections: 24,
            concurrency: 4,
            mode,
        })
        .await
        .unwrap();
        assert_eq!((o.logged_in, o.failed), (24, 0), "{o:?}");
        assert_eq!(o.latency.count, 24);
    }
}

#[tokio::test]
async fn idle_holds_and_measures() {
    let server = server().await;
    let o = idle::run(idle::Options {
        server: server.addr,
        server_pid: std::process::id(),
        connections: 30,
        concurrency: 8,
        hold: Duration::from_millis(300),
    })
    .await
    .unwrap();
    assert_eq!(o.connected, 30);
    assert!(o.rss_before_kib > 0 && o.rss_after_kib > 0, "{o:?}");
    assert!(o.idle_cpu_percent >= 0.0);
}
