//! The web client, end to end in headless Chromium (web/tests/e2e.test.mjs,
//! driven by Playwright). Needs node, Debian's chromium and
//! `npm install` in web/ (.ci/run does all three); without them it says so
//! and passes, except in CI, where it fails.

use std::path::Path;

use confab_testkit::TestServer;

#[tokio::test]
async fn the_web_client_in_a_real_browser() {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing: Vec<&str> = [
        ("node", which("node")),
        ("chromium", Path::new(&chromium).exists()),
        (
            "web/node_modules/playwright-core",
            web.join("node_modules/playwright-core").exists(),
        ),
    ]
    .into_iter()
    .filter(|(_, there)| !there)
    .map(|(what, _)| what)
    .collect();
    if !missing.is_empty() {
        let reason = format!("browser tests need {}", missing.join(", "));
        assert!(std::env::var_os("CI").is_none(), "{reason}");
        eprintln!("skipped: {reason} (see .ci/run)");
        return;
    }
    let server = TestServer::spawn().await;
    let out = tokio::process::Command::new("node")
        .args(["--test", "--test-concurrency=1", "tests/"])
        .current_dir(&web)
        .env("CONFAB_URL", format!("http://{}", server.addr))
        .env("CHROMIUM", &chromium)
        .output()
        .await
        .expect("running node");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser tests failed");
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
