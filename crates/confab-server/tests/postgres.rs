//! Confab on PostgreSQL, over the wire: the schema tools, the guarantees
//! across a restart, and a deletion seen through the database. Each test
//! gets a schema of its own on the server `CONFAB_TEST_POSTGRES` names, and
//! skips (saying so) without it.

use std::process::Stdio;

use confab_store_postgres::testing::TestSchema;
use confab_testkit::confab_server::Database;
use confab_testkit::serde_json::json;
use confab_testkit::TestServer;

async fn on_postgres(schema: &TestSchema) -> TestServer {
    let url = schema.url.clone();
    TestServer::with_config(move |c| c.database = Database::parse(&url).unwrap()).await
}

async fn confab(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(args)
        .env_remove("CONFAB_DATABASE")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn db_migrate_and_status() {
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let url = schema.url.as_str();
    let (ok, text) = confab(&["db", "status", "--database", url]).await;
    assert!(ok && text.contains("no Confab schema yet"), "{text}");
    let current = format!(
        "schema version {}, up to date",
        confab_store_postgres::MIGRATIONS.len()
    );
    let (ok, text) = confab(&["db", "migrate", "--database", url]).await;
    assert!(ok && text.contains(&current), "{text}");
    let (ok, text) = confab(&["db", "status", "--database", url]).await;
    assert!(ok && text.contains(&current), "{text}");
    let (ok, text) = confab(&[
        "db",
        "status",
        "--database",
        "postgres://nobody@127.0.0.1:1/x",
    ])
    .await;
    assert!(!ok && text.contains("unavailable"), "{text}");
}

#[tokio::test]
async fn chat_survives_a_restart_on_postgres() {
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let server = on_postgres(&schema).await;
    let mut alice = server.client().await;
    let token = alice.register("alice").await;
    alice.join("pg").await;
    let first = alice
        .ok(json!({"type":"send","room":"pg","body":"stored in postgres","nonce":"n-1"}))
        .await;
    let retry = alice
        .ok(json!({"type":"send","room":"pg","body":"stored in postgres","nonce":"n-1"}))
        .await;
    assert_eq!(first["seq"], retry["seq"], "exactly once with a nonce");
    let mut bob = server.client().await;
    bob.register("bob").await;
    bob.join("pg").await;
    alice.send("pg", "second").await;

    let server = server.restart().await;
    let mut again = server.client().await;
    again.ok(json!({"type":"resume","token":token})).await;
    let history = again.ok(json!({"type":"history","room":"pg"})).await;
    let bodies: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["stored in postgres", "second"]);
    let mut bob = server.client().await;
    bob.login("bob").await;
    let sync = bob.ok(json!({"type":"sync"})).await;
    assert_eq!(sync["rooms"][0]["messages"][0]["seq"], 1);
    assert_eq!(
        sync["rooms"][0]["messages"].as_array().unwrap().len(),
        2,
        "offline delivery from the read marker"
    );
}
