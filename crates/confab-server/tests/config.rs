//! Configuration as an operator meets it: the file, the environment and
//! flags through the real binary, `config check`, and live reloads.

use std::process::{Command, Stdio};
use std::time::Duration;

use confab_testkit::confab_server::{Rate, RateLimits};
use confab_testkit::serde_json::json;
use confab_testkit::{TestServer, WsClient};
use tokio::io::{AsyncBufReadExt, BufReader};

fn confab() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_confab"));
    // The test runner's own environment must not leak settings in.
    for (k, _) in std::env::vars() {
        if k.starts_with("CONFAB_") {
            c.env_remove(k);
        }
    }
    c
}

fn check(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = confab()
        .args(["config", "check"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running confab");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn flags_override_the_environment_which_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("confab.toml");
    std::fs::write(
        &file,
        "[limits]\nmax_connections = 5\nlogin_timeout_ms = 1234\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let env = [("CONFAB_LIMITS_MAX_CONNECTIONS", "7")];

    let (ok, out, _) = check(&["--config", file], &[]);
    assert!(ok);
    assert!(out.contains("max_connections = 5\n"), "{out}");
    let (_, out, _) = check(&["--config", file], &env);
    assert!(out.contains("max_connections = 7\n"), "{out}");
    let (_, out, _) = check(&["--config", file, "--max-connections", "9"], &env);
    assert!(out.contains("max_connections = 9\n"), "{out}");
    assert!(
        out.contains("login_timeout_ms = 1234\n"),
        "the rest of the file stays"
    );
}

#[test]
fn config_check_names_unknown_keys_and_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[limits]\nmax_conections = 5\n").unwrap();
    let (ok, _, err) = check(&["--config", file.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("max_conections"), "{err}");

    let (ok, out, _) = check(&[], &[("CONFAB_ADMIN_TOKEN", "s3cret-token")]);
    assert!(ok);
    assert!(!out.contains("s3cret-token"), "{out}");
    assert!(out.contains("token = \"***\""), "{out}");

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/example.toml");
    let (ok, out, err) = check(&["--config", example], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("the configuration is valid"));
}

#[tokio::test]
async fn a_live_reload_changes_a_rate_limit_for_connected_clients() {
    let mut server = TestServer::with_config(|c| c.chat.rate_limits = RateLimits::off()).await;
    let mut c = server.client().await;
    c.guest("steady").await;
    c.join("r").await;
    for _ in 0..10 {
        c.send("r", "unlimited").await;
    }
    server
        .reload_with(|c| c.chat.rate_limits.messages = Some(Rate::new(0.01, 2)))
        .await
        .unwrap();
    c.send("r", "1").await;
    c.send("r", "2").await;
    assert_eq!(
        c.error(json!({"type":"send","room":"r","body":"3"})).await,
        "rate_limited",
        "the same connection, under the new limit"
    );
    server.reload_with(|c| c.max_connections = 1).await.unwrap();
    let refused = confab_testkit::tokio_tungstenite::connect_async(server.ws_url()).await;
    assert!(refused.is_err(), "the new connection limit applies");
    assert_eq!(
        c.request(json!({"type":"ping"})).await["type"],
        "pong",
        "nobody dropped"
    );
}

#[tokio::test]
async fn sighup_rereads_the_file_and_logs_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("confab.toml");
    let db = dir.path().join("confab.db");
    let write = |burst: u32| {
        std::fs::write(
            &file,
            format!(
                "http = \"127.0.0.1:0\"\nline = \"off\"\ndatabase = \"sqlite://{}\"\n\
                 [rate_limits]\nmessages = {{ per_second = 0.01, burst = {burst} }}\n",
                db.display()
            ),
        )
        .unwrap();
    };
    write(100);
    let mut child = tokio::process::Command::from(confab())
        .args(["serve", "--config", file.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next_log = async || {
        tokio::time::timeout(Duration::from_secs(30), logs.next_line())
            .await
            .expect("a log line")
            .unwrap()
            .expect("confab is running")
    };
    let addr = loop {
        let line = next_log().await;
        if line.contains("listening for HTTP") {
            break line
                .split("addr=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_owned();
        }
    };
    let mut c = WsClient::connect(&format!("ws://{addr}/ws")).await;
    c.guest("hupper").await;
    c.join("r").await;
    c.send("r", "1").await;
    c.send("r", "2").await;

    write(2);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGHUP) };
    loop {
        let line = next_log().await;
        if line.contains("configuration changed") {
            assert!(line.contains("rate_limits.messages"), "{line}");
            break;
        }
    }
    c.send("r", "3").await;
    c.send("r", "4").await;
    assert_eq!(
        c.error(json!({"type":"send","room":"r","body":"5"})).await,
        "rate_limited"
    );
    assert_eq!(c.request(json!({"type":"ping"})).await["type"], "pong");
}
