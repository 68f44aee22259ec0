//! PostgreSQL storage for Confab: the backend for a team that runs
//! PostgreSQL already, and for several Confab nodes on one database.
//!
//! - [`PgStore`]: the [`Store`] implementation, on a pool of connections.
//! - `batch`: group commit of room messages, one transaction (and one
//!   round trip) per batch.
//! - `import`: bulk writes, a census and a wipe, for `confab db copy`.
//! - `schema_*.sql` and [`MIGRATIONS`]: the schema, embedded in the binary,
//!   applied on open under an advisory lock (several nodes may start at
//!   once), its version kept in `confab_schema`.
//!
//! Why tokio-postgres with deadpool, not sqlx: tokio-postgres pipelines the
//! statements of concurrent callers on one connection and gives direct
//! control over transactions and prepared statements, with no macro-time
//! database; deadpool is a small, well-kept pool for it with timeouts, so
//! that a database that went away answers `unavailable` instead of making
//! clients wait.
//!
//! Every operation that must be atomic (allocating a `seq`, deduplicating a
//! nonce, checking membership before a write) runs in one transaction here,
//! never with a counter in a process: several nodes can write to one room.

mod batch;
mod import;
mod pool;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_core::names::HubName;
use confab_core::store::{
    check_amend, check_invite, in_force, last_owner, no_user, not_in_hub, now_ms, private_place,
    sanctioned, stored_role, stored_user_name as user_name, too_many_rooms, Amend, AmendTarget,
    Appended, ChannelView, DirectPeers, HistoryPage, HubDetail, HubJoined, HubView, InviteRow,
    JoinRules, Joined, NewHub, NewInvite, NewMessage, NewSanction, Page, Queued, RemovedUsers,
    RoomView, ServerBan, StoreResult, TokenHash, UserRecord, FIRST_CHANNEL, REMOVED_USERS_KEPT_MS,
};
use confab_core::{RoomName, Store, StoreError, UserName};
use confab_proto::{Message, Role, Sanction, SanctionKind, Seq};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The schema, one entry per version; `confab_schema.version` says how many
/// have been applied.
pub const MIGRATIONS: &[&str] = &[
    include_str!("schema_1.sql"),
    include_str!("schema_2.sql"),
    include_str!("schema_3.sql"),
    include_str!("schema_4.sql"),
];

/// The advisory lock migrations hold, so that nodes starting together
/// apply them once ("confab" in ASCII).
const MIGRATION_LOCK: i64 = 0x636f_6e66_6162;

/// How long making a connection (or checking a pooled one) may take
/// before it is answered `unavailable`: a database that went away must not
/// leave clients hanging. Waiting for a busy pool: `pool`.
const POOL_TIMEOUT: Duration = pool::WINDOW;

/// How a connection to a database that stops answering without closing
/// it (packets dropped: a network cut, a host gone) is found dead, unless
/// the URL says otherwise. The kernel's own defaults take about 15 min
/// for a request already sent (retransmissions) and over 2 h for a
/// connection waiting on a reply (keepalive), and every request on such a
/// connection waits that long. Sent data unacknowledged this long ends the
/// connection (`tcp_user_timeout`, in milliseconds as in libpq)...
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// ...and so does a connection silent this long (`keepalives_idle`, in
/// seconds) that then leaves `KEEPALIVES_RETRIES` probes, one every
/// `KEEPALIVES_INTERVAL`, unanswered: a waiting request learns in about
/// 25 s. A live server's kernel answers the probes during a long query.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVES_RETRIES: u32 = 3;

/// Connections kept at most, by default.
pub const DEFAULT_POOL_SIZE: usize = 16;

pub use batch::CommitObserver;

pub struct PgStore {
    pool: pool::Connections,
    batcher: batch::Batcher,
}

/// Where a database URL points, as parsed: for error messages and tools.
pub fn describe(url: &str) -> Result<String, StoreError> {
    let (config, _) = parse(url)?;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Ok(format!(
        "{}@{}:{port}/{}",
        config.get_user().unwrap_or("?"),
        hosts.join(","),
        config.get_dbname().unwrap_or("?")
    ))
}

/// Take a parameter of Confab's own (one the driver does not know) out of
/// a URL: the URL without it, and its value (the last one, if repeated).
pub fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut value = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
        {
            Some(v) => value = Some(v.to_owned()),
            None => kept.push(pair),
        }
    }
    match kept.is_empty() {
        true => (base.to_owned(), value),
        false => (format!("{base}?{}", kept.join("&")), value),
    }
}

/// Parse a `postgres://` or `postgresql://` URL; the password may come
/// from `PGPASSWORD`. Our own parameter `sslrootcert` is taken out (the
/// driver does not know it) and returned beside the configuration;
/// `tcp_user_timeout` too, which the driver reads in seconds where libpq
/// (and so every PostgreSQL URL) means milliseconds. A dead connection is
/// found within about half a minute unless the URL says otherwise
/// ([`TCP_USER_TIMEOUT`], [`KEEPALIVES_IDLE`]).
fn parse(url: &str) -> Result<(tokio_postgres::Config, Option<PathBuf>), StoreError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::Invalid(format!(
            "{url:?} is not a PostgreSQL URL (postgres://USER@HOST:PORT/DB)"
        )));
    }
    let (url, root_cert) = take_param(url, "sslrootcert");
    let root_cert = root_cert.map(PathBuf::from);
    let (url, user_timeout) = take_param(&url, "tcp_user_timeout");
    let user_timeout = match user_timeout {
        None => Some(TCP_USER_TIMEOUT),
        Some(ms) => match ms.parse::<u64>() {
            // 0: the system's default, as in libpq.
            Ok(0) => None,
            Ok(ms) => Some(Duration::from_millis(ms)),
            Err(_) => {
                return Err(StoreError::Invalid(format!(
                    "tcp_user_timeout={ms}: milliseconds, a whole number"
                )))
            }
        },
    };
    let mut config = tokio_postgres::Config::from_str(&url)
        .map_err(|e| StoreError::Invalid(format!("malformed PostgreSQL URL: {e}")))?;
    if config.get_user().is_none() {
        return Err(StoreError::Invalid(
            "the PostgreSQL URL names no user (postgres://USER@HOST/DB)".into(),
        ));
    }
    if config.get_dbname().is_none() {
        return Err(StoreError::Invalid(
            "the PostgreSQL URL names no database (postgres://USER@HOST/DB)".into(),
        ));
    }
    if config.get_password().is_none() {
        if let Ok(password) = std::env::var("PGPASSWORD") {
            config.password(password);
        }
    }
    if root_cert.is_some() && config.get_ssl_mode() == SslMode::Disable {
        return Err(StoreError::Invalid(
            "sslrootcert with sslmode=disable: a certificate to check, and no TLS".into(),
        ));
    }
    config.connect_timeout(POOL_TIMEOUT);
    if let Some(timeout) = user_timeout {
        config.tcp_user_timeout(timeout);
    }
    // The driver's default idle time (2 h) cannot be told from one the
    // URL set: look in the URL.
    if take_param(&url, "keepalives_idle").1.is_none() {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVES_RETRIES);
    }
    if config.get_application_name().is_none() {
        config.application_name("confab");
    }
    Ok((config, root_cert))
}

/// TLS as `sslmode` asks, with libpq's meanings: `disable`, none; `prefer`
/// (the default), when the server offers it; `require`, or no connection.
/// Without `sslrootcert` the server's certificate is not checked
/// (encryption against eavesdropping, as libpq does); with
/// `sslrootcert=PATH`, a PEM file of CA certificates, the chain and the
/// host name are verified.
fn tls(root_cert: Option<&Path>) -> Result<MakeRustlsConnect, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Internal(format!("TLS: {e}")))?;
    let config = match root_cert {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let bad = |e: &dyn std::fmt::Display| {
                StoreError::Invalid(format!("sslrootcert={}: {e}", path.display()))
            };
            let mut roots = rustls::RootCertStore::empty();
            let certs =
                rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))?;
            for cert in certs {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            if roots.is_empty() {
                return Err(bad(&"no certificate in the file"));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// Accepts the server's certificate unchecked (but not a forged handshake
/// signature): what libpq does for `prefer` and `require` without a root
/// certificate.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl PgStore {
    /// Connect to the database at `url`, check what is there and apply
    /// pending migrations. A clear error, before anything is served, for a
    /// malformed URL, an unreachable host, wrong credentials, a database of
    /// another application or one newer than this binary.
    pub async fn open(url: &str, pool_size: usize) -> StoreResult<PgStore> {
        let store = PgStore::connect(url, pool_size)?;
        let mut client = store.client().await?;
        migrate(&mut client).await?;
        drop(client);
        Ok(store)
    }

    /// A store on `url` without touching the schema (for `db status`).
    pub fn connect(url: &str, pool_size: usize) -> StoreResult<PgStore> {
        let (config, root_cert) = parse(url)?;
        let manager = Manager::from_config(
            config,
            tls(root_cert.as_deref())?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Invalid(format!("PostgreSQL pool: {e}")))?;
        let pool = pool::Connections::new(pool);
        let batcher = batch::Batcher::start(pool.clone());
        Ok(PgStore { pool, batcher })
    }

    /// Be told of every batch of messages committed (once; later calls
    /// are ignored).
    pub fn observe_commits(&self, observer: CommitObserver) {
        self.batcher.observe(observer);
    }

    /// (batches committed, messages in them) so far.
    pub fn batch_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        let c = &self.batcher.counters;
        (
            c.batches.load(Ordering::Relaxed),
            c.messages.load(Ordering::Relaxed),
        )
    }

    /// The schema version of the database, and this binary's.
    pub async fn schema_version(&self) -> StoreResult<(u32, u32)> {
        let client = self.client().await?;
        let version = current_version(&client).await?.unwrap_or(0);
        Ok((version, MIGRATIONS.len() as u32))
    }

    /// Connections in use and the pool's size.
    pub fn pool_status(&self) -> (usize, usize) {
        let status = self.pool.pool().status();
        (status.size - status.available, status.max_size)
    }

    async fn client(&self) -> StoreResult<Object> {
        self.pool.get().await
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) => pg_error(e),
        PoolError::Timeout(_) => StoreError::Unavailable("PostgreSQL does not answer".into()),
        other => StoreError::Unavailable(format!("PostgreSQL: {other}")),
    }
}

/// Connection trouble and a server that is going away are `Unavailable`
/// (the client may retry); everything else is a bug or a corrupt database.
fn pg_error(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        // The driver's words, then their causes: "error performing TLS
        // handshake: invalid peer certificate: UnknownIssuer".
        let mut text = format!("PostgreSQL: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        return StoreError::Unavailable(text);
    };
    let code = db.code().code();
    let text = format!("PostgreSQL: {}", db.message());
    match &code[..2] {
        // connection exception, insufficient resources, operator
        // intervention (shutdown), system error
        "08" | "53" | "57" | "58" => StoreError::Unavailable(text),
        // invalid authorization, invalid catalog name (no such database)
        "28" | "3D" => StoreError::Unavailable(text),
        _ => StoreError::Internal(text),
    }
}

async fn current_version(client: &impl GenericClient) -> StoreResult<Option<u32>> {
    let exists: bool = client
        .query_one("SELECT to_regclass('confab_schema') IS NOT NULL", &[])
        .await
        .map_err(pg_error)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let version: i32 = client
        .query_one("SELECT version FROM confab_schema", &[])
        .await
        .map_err(pg_error)?
        .get(0);
    Ok(Some(version as u32))
}

/// Apply pending migrations, under the advisory lock. Refuses a database
/// that holds other tables and no Confab schema, and one newer than us.
async fn migrate(client: &mut Object) -> StoreResult<()> {
    client
        .query_one("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_error)?;
    let outcome = migrate_locked(client).await;
    let unlocked = client
        .query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    outcome?;
    unlocked.map_err(pg_error)?;
    Ok(())
}

async fn migrate_locked(client: &mut Object) -> StoreResult<()> {
    let applied = match current_version(&*client).await? {
        Some(v) => v as usize,
        None => {
            let tables: i64 = client
                .query_one(
                    "SELECT count(*) FROM information_schema.tables
                     WHERE table_schema = current_schema()",
                    &[],
                )
                .await
                .map_err(pg_error)?
                .get(0);
            if tables > 0 {
                return Err(StoreError::Unavailable(format!(
                    "the database holds {tables} tables and no Confab schema: it belongs to \
                     something else; give Confab a database (or schema) of its own"
                )));
            }
            0
        }
    };
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "the database has schema version {applied}, newer than this server's {}: \
             upgrade Confab",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = client.transaction().await.map_err(pg_error)?;
        if i == 0 {
            tx.batch_execute(
                "CREATE TABLE confab_schema (version INTEGER NOT NULL);
                 INSERT INTO confab_schema VALUES (0);",
            )
            .await
            .map_err(pg_error)?;
        }
        tx.batch_execute(sql).await.map_err(pg_error)?;
        tx.execute(
            "UPDATE confab_schema SET version = $1",
            &[&((i + 1) as i32)],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        tracing::info!(version = i + 1, "applied migration");
    }
    Ok(())
}

fn seq(v: i64) -> Seq {
    v as Seq
}

/// A LIMIT: `u32::MAX` means everything.
fn limit(n: u32) -> i64 {
    i64::from(n)
}

/// The room's id and last seq.
async fn room_row(c: &impl GenericClient, room: &str) -> StoreResult<Option<(i64, i64)>> {
    let stmt = c
        .prepare_cached("SELECT id, last_seq FROM rooms WHERE name = $1")
        .await
        .map_err(pg_error)?;
    Ok(c.query_opt(&stmt, &[&room])
        .await
        .map_err(pg_error)?
        .map(|r| (r.get(0), r.get(1))))
}

/// The room's id and last seq, if `user` is a member.
async fn member_room(
    c: &impl GenericClient,
    room: &RoomName,
    user: &UserName,
) -> StoreResult<(i64, i64)> {
    let (id, last) = room_row(c, room.as_str())
        .await?
        .ok_or(StoreError::NoSuchRoom)?;
    if !is_member(c, id, user).await? {
        return Err(StoreError::NotMember);
    }
    Ok((id, last))
}

async fn is_member(c: &impl GenericClient, room_id: i64, user: &UserName) -> StoreResult<bool> {
    let stmt = c
        .prepare_cached("SELECT 1 FROM members WHERE room_id = $1 AND user_key = $2")
        .await
        .map_err(pg_error)?;
    Ok(c.query_opt(&stmt, &[&room_id, &user.key()])
        .await
        .map_err(pg_error)?
        .is_some())
}

/// Insert a membership if absent; returns whether it is new.
async fn add_member(
    c: &impl GenericClient,
    room_id: i64,
    user: &UserName,
    guest: bool,
    role: Role,
) -> StoreResult<bool> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO members (room_id, user_key, user_name, guest, joined_at, role)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .await
        .map_err(pg_error)?;
    let n = c
        .execute(
            &stmt,
            &[
                &room_id,
                &user.key(),
                &user.as_str(),
                &guest,
                &now_ms(),
                &role.rank(),
            ],
        )
        .await
        .map_err(pg_error)?;
    Ok(n == 1)
}

fn sanction_kind(kind: SanctionKind) -> i16 {
    match kind {
        SanctionKind::Ban => 0,
        SanctionKind::Mute => 1,
    }
}

/// Refuse a user with a ban or mute of `kind` in force in the room, or in
/// its hub.
async fn refuse_sanctioned(
    c: &impl GenericClient,
    room_id: i64,
    room: &RoomName,
    user: &UserName,
    kind: SanctionKind,
) -> StoreResult<()> {
    let stmt = c
        .prepare_cached(
            "SELECT s.until_ts FROM sanctions s
             WHERE s.room_id IN (SELECT id FROM rooms WHERE id = $1
                                 UNION SELECT hub_id FROM rooms WHERE id = $1)
               AND s.user_key = $2 AND s.kind = $3",
        )
        .await
        .map_err(pg_error)?;
    let rows = c
        .query(&stmt, &[&room_id, &user.key(), &sanction_kind(kind)])
        .await
        .map_err(pg_error)?;
    let now = now_ms();
    for until in rows.iter().map(|r| r.get::<_, Option<i64>>(0)) {
        if in_force(until, now) {
            return Err(sanctioned(kind, room, until));
        }
    }
    Ok(())
}

/// A room's hub (the id of the hub's own room), for a channel, and whether
/// the room is private.
async fn hub_of(c: &impl GenericClient, room_id: i64) -> StoreResult<(Option<i64>, bool)> {
    let stmt = c
        .prepare_cached("SELECT hub_id, private FROM rooms WHERE id = $1")
        .await
        .map_err(pg_error)?;
    let row = c.query_one(&stmt, &[&room_id]).await.map_err(pg_error)?;
    Ok((row.get(0), row.get(1)))
}

/// The room whose roles count in `room_id` too: its hub's.
async fn authority(c: &impl GenericClient, room_id: i64) -> StoreResult<i64> {
    Ok(hub_of(c, room_id).await?.0.unwrap_or(room_id))
}

/// Let `user` into `place` with the invite `code`, spending it if it is a
/// single user's.
async fn redeem(
    c: &impl GenericClient,
    code: Option<&str>,
    place: &RoomName,
    user: &UserName,
) -> StoreResult<()> {
    let code = code.ok_or_else(|| private_place(place))?;
    let row = c
        .query_opt(
            "SELECT r.name, i.user_key, i.expires_ts FROM invites i
             JOIN rooms r ON r.id = i.room_id WHERE i.code = $1 FOR UPDATE OF i",
            &[&code],
        )
        .await
        .map_err(pg_error)?
        .map(|r| InviteRow {
            room: RoomName::from_trusted(r.get(0)),
            user_key: r.get(1),
            expires_ts: r.get(2),
        });
    if check_invite(row.as_ref(), place, user, now_ms())? {
        c.execute("DELETE FROM invites WHERE code = $1", &[&code])
            .await
            .map_err(pg_error)?;
    }
    Ok(())
}

/// Remove `user` from the room `room_id` and, for a hub's room, from its
/// channels; returns the rooms left, the hub's own first.
async fn remove_member(
    c: &impl GenericClient,
    room_id: i64,
    user: &UserName,
) -> StoreResult<Vec<RoomName>> {
    let rows = c
        .query(
            "DELETE FROM members m USING rooms r
             WHERE r.id = m.room_id AND (r.id = $1 OR r.hub_id = $1) AND m.user_key = $2
             RETURNING r.name",
            &[&room_id, &user.key()],
        )
        .await
        .map_err(pg_error)?;
    let mut rooms: Vec<RoomName> = rows
        .into_iter()
        .map(|r| RoomName::from_trusted(r.get(0)))
        .collect();
    rooms.sort_by(|a, b| (!a.is_hub_room(), a).cmp(&(!b.is_hub_room(), b)));
    Ok(rooms)
}

/// Refuse to take the owner role from a room's only owner (the owners'
/// rows locked, so that two demotions at once cannot both pass).
async fn keep_an_owner(
    c: &impl GenericClient,
    room_id: i64,
    room: &RoomName,
    user: &UserName,
) -> StoreResult<()> {
    let owners: Vec<String> = c
        .query(
            "SELECT user_key FROM members WHERE room_id = $1 AND role = $2 FOR UPDATE",
            &[&room_id, &Role::Owner.rank()],
        )
        .await
        .map_err(pg_error)?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    if owners == [user.key()] {
        return Err(last_owner(user, room));
    }
    Ok(())
}

/// The columns [`user_record`] reads, of `users u`.
const USER_COLUMNS: &str = "u.name, u.password_hash, u.banned, u.ban_reason, u.ban_until";

/// The one user a query of [`USER_COLUMNS`] finds.
async fn user_record(
    c: &impl GenericClient,
    sql: &str,
    key: &(dyn ToSql + Sync),
) -> StoreResult<Option<UserRecord>> {
    let stmt = c.prepare_cached(sql).await.map_err(pg_error)?;
    let row = c.query_opt(&stmt, &[key]).await.map_err(pg_error)?;
    row.map(|r| {
        Ok(UserRecord {
            name: user_name(r.get(0))?,
            password_hash: r.get(1),
            banned: r.get::<_, bool>(2).then(|| ServerBan {
                reason: r.get::<_, Option<String>>(3).unwrap_or_default(),
                until_ts: r.get(4),
            }),
        })
    })
    .transpose()
}

/// A hub's name from its room's name (`hub/`), as stored.
fn stored_hub(room: &str) -> StoreResult<HubName> {
    room.strip_suffix('/')
        .and_then(|hub| HubName::parse(hub).ok())
        .ok_or_else(|| StoreError::Internal(format!("stored hub room {room:?}")))
}

/// Check an edit or deletion of the room's message and apply it to the
/// message (and, for a deletion, its edit entries).
async fn apply_amend(
    c: &impl GenericClient,
    room_id: i64,
    m: &NewMessage,
    amend: Amend,
) -> StoreResult<()> {
    let seq = amend.target() as i64;
    let target = c
        .query_opt(
            "SELECT sender_key, edit_of IS NOT NULL OR delete_of IS NOT NULL, deleted
             FROM messages WHERE room_id = $1 AND seq = $2",
            &[&room_id, &seq],
        )
        .await
        .map_err(pg_error)?
        .map(|r| AmendTarget {
            sender_key: r.get(0),
            is_amend: r.get(1),
            deleted: r.get(2),
        });
    check_amend(amend, &m.sender, target.as_ref())?;
    let changed = match amend {
        Amend::Edit(_) => {
            c.execute(
                "UPDATE messages SET body = $3, edited_ts = $4 WHERE room_id = $1 AND seq = $2",
                &[&room_id, &seq, &m.body, &m.ts],
            )
            .await
        }
        Amend::Delete { .. } => {
            c.execute(
                "UPDATE messages SET body = '', deleted = (seq = $2)
                 WHERE room_id = $1 AND (seq = $2 OR edit_of = $2)",
                &[&room_id, &seq],
            )
            .await
        }
    };
    changed.map_err(pg_error)?;
    Ok(())
}

/// The room's id, creating it if needed (another node may create it at the
/// same moment: then theirs is used).
async fn create_room(c: &impl GenericClient, room: &RoomName, by_guest: bool) -> StoreResult<i64> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO rooms (name, direct, guest_created, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO NOTHING RETURNING id",
        )
        .await
        .map_err(pg_error)?;
    let created = c
        .query_opt(
            &stmt,
            &[&room.as_str(), &room.is_direct(), &by_guest, &now_ms()],
        )
        .await
        .map_err(pg_error)?;
    match created {
        Some(row) => Ok(row.get(0)),
        None => room_row(c, room.as_str())
            .await?
            .map(|(id, _)| id)
            .ok_or_else(|| StoreError::Internal("a room vanished as it was created".into())),
    }
}

/// Remove guest-created rooms that nobody is in any more (their messages
/// go with them, by the foreign key): the one room `id`, or every such room.
async fn sweep_guest_rooms(c: &impl GenericClient, id: Option<i64>) -> StoreResult<()> {
    c.execute(
        "DELETE FROM rooms r WHERE r.guest_created AND ($1::BIGINT IS NULL OR r.id = $1)
         AND NOT EXISTS (SELECT 1 FROM members m WHERE m.room_id = r.id)",
        &[&id],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

const MESSAGE_COLUMNS: &str =
    "seq, sender, body, ts, nonce, edit_of, delete_of, edited_ts, deleted";

fn message_row(room: &str, r: &Row) -> Message {
    Message {
        room: room.to_owned(),
        seq: seq(r.get(0)),
        user: r.get(1),
        body: r.get(2),
        ts: r.get(3),
        nonce: r.get(4),
        edit: r.get::<_, Option<i64>>(5).map(seq),
        delete: r.get::<_, Option<i64>>(6).map(seq),
        edited_ts: r.get(7),
        deleted: r.get(8),
    }
}

async fn query_messages(
    c: &impl GenericClient,
    room: &str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> StoreResult<Vec<Message>> {
    let stmt = c.prepare_cached(sql).await.map_err(pg_error)?;
    let rows = c.query(&stmt, params).await.map_err(pg_error)?;
    Ok(rows.iter().map(|r| message_row(room, r)).collect())
}

/// A message stored on its own, not in a batch: a direct message (opening
/// the conversation if needed), or an edit or deletion. (Room messages go
/// through `batch`.)
async fn append_one(c: &impl GenericClient, m: NewMessage) -> StoreResult<Appended> {
    let mut new_members = Vec::new();
    let room_id = match &m.direct {
        Some(DirectPeers {
            sender_guest,
            peer,
            peer_guest,
        }) => {
            let room_id = create_room(c, &m.room, *sender_guest).await?;
            if add_member(c, room_id, &m.sender, *sender_guest, Role::Member).await? {
                new_members.push(m.sender.clone());
            }
            if add_member(c, room_id, peer, *peer_guest, Role::Member).await? {
                new_members.push(peer.clone());
            }
            room_id
        }
        None if Amend::by_moderator(m.amend) => {
            room_row(c, m.room.as_str())
                .await?
                .ok_or(StoreError::NoSuchRoom)?
                .0
        }
        None => member_room(c, &m.room, &m.sender).await?.0,
    };
    // The room's row lock orders its appends, on every node: the nonce
    // check and the next seq are then decided by one transaction at a time.
    let last_seq: i64 = c
        .query_one(
            "SELECT last_seq FROM rooms WHERE id = $1 FOR UPDATE",
            &[&room_id],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    if let Some(nonce) = &m.nonce {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE room_id = $1 AND sender_key = $2 AND nonce = $3"
        );
        let original = query_messages(
            c,
            m.room.as_str(),
            &sql,
            &[&room_id, &m.sender.key(), nonce],
        )
        .await?;
        if let Some(message) = original.into_iter().next() {
            return Ok(Appended {
                message,
                duplicate: true,
                new_members,
            });
        }
    }
    if !matches!(m.amend, Some(Amend::Delete { .. })) {
        refuse_sanctioned(c, room_id, &m.room, &m.sender, SanctionKind::Mute).await?;
    }
    if let Some(amend) = m.amend {
        apply_amend(c, room_id, &m, amend).await?;
    }
    let next = last_seq + 1;
    c.execute(
        "UPDATE rooms SET last_seq = $1 WHERE id = $2",
        &[&next, &room_id],
    )
    .await
    .map_err(pg_error)?;
    let sender_key = m.sender.key().to_owned();
    let message = m.stored_as(seq(next));
    let stmt = c
        .prepare_cached(
            "INSERT INTO messages
             (room_id, seq, sender_key, sender, body, ts, nonce, edit_of, delete_of)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .await
        .map_err(pg_error)?;
    let as_i64 = |s: Option<Seq>| s.map(|s| s as i64);
    c.execute(
        &stmt,
        &[
            &room_id,
            &next,
            &sender_key,
            &message.user,
            &message.body,
            &message.ts,
            &message.nonce,
            &as_i64(message.edit),
            &as_i64(message.delete),
        ],
    )
    .await
    .map_err(pg_error)?;
    Ok(Appended {
        message,
        duplicate: false,
        new_members,
    })
}

/// Run `$body` (an async block using `$tx`) in a transaction, committed
/// when it returns `Ok`.
macro_rules! in_transaction {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut client = $store.client().await?;
        let $tx = client.transaction().await.map_err(pg_error)?;
        let value = $body.await?;
        $tx.commit().await.map_err(pg_error)?;
        Ok(value)
    }};
}

#[async_trait]
impl Store for PgStore {
    async fn create_user(&self, name: &UserName, password_hash: &str) -> StoreResult<()> {
        let c = self.client().await?;
        let n = c
            .execute(
                "INSERT INTO users (key, name, password_hash, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&name.key(), &name.as_str(), &password_hash, &now_ms()],
            )
            .await
            .map_err(pg_error)?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("user name {name}")));
        }
        Ok(())
    }

    async fn user(&self, name: &UserName) -> StoreResult<Option<UserRecord>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users u WHERE u.key = $1");
        user_record(&self.client().await?, &sql, &name.key()).await
    }

    async fn set_password(&self, name: &UserName, password_hash: &str) -> StoreResult<()> {
        in_transaction!(self, |tx| async {
            let n = tx
                .execute(
                    "UPDATE users SET password_hash = $1 WHERE key = $2",
                    &[&password_hash, &name.key()],
                )
                .await
                .map_err(pg_error)?;
            if n == 0 {
                return Err(no_user(name));
            }
            tx.execute("DELETE FROM tokens WHERE user_key = $1", &[&name.key()])
                .await
                .map_err(pg_error)?;
            Ok(())
        })
    }

    async fn list_users(&self) -> StoreResult<Vec<UserName>> {
        let c = self.client().await?;
        let rows = c
            .query("SELECT name FROM users ORDER BY key", &[])
            .await
            .map_err(pg_error)?;
        rows.into_iter().map(|r| user_name(r.get(0))).collect()
    }

    async fn delete_user(&self, name: &UserName) -> StoreResult<()> {
        in_transaction!(self, |tx| async {
            // Deletions commit one at a time, so the log's ids appear in
            // order and no poller's cursor passes an id still uncommitted.
            tx.batch_execute("LOCK TABLE removed_users IN EXCLUSIVE MODE")
                .await
                .map_err(pg_error)?;
            let shown: String = tx
                .query_opt(
                    "DELETE FROM users WHERE key = $1 RETURNING name",
                    &[&name.key()],
                )
                .await
                .map_err(pg_error)?
                .ok_or_else(|| no_user(name))?
                .get(0);
            for sql in [
                "DELETE FROM tokens WHERE user_key = $1",
                "DELETE FROM members WHERE user_key = $1",
            ] {
                tx.execute(sql, &[&name.key()]).await.map_err(pg_error)?;
            }
            let now = now_ms();
            tx.execute(
                "DELETE FROM removed_users WHERE removed_at < $1",
                &[&(now - REMOVED_USERS_KEPT_MS)],
            )
            .await
            .map_err(pg_error)?;
            tx.execute(
                "INSERT INTO removed_users (user_name, removed_at) VALUES ($1, $2)",
                &[&shown, &now],
            )
            .await
            .map_err(pg_error)?;
            Ok(())
        })
    }

    async fn removed_users(&self, after: Option<u64>) -> StoreResult<RemovedUsers> {
        let c = self.client().await?;
        let last: i64 = c
            .query_one("SELECT COALESCE(MAX(id), 0) FROM removed_users", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        let Some(after) = after else {
            return Ok(RemovedUsers {
                cursor: last as u64,
                users: Vec::new(),
            });
        };
        let rows = c
            .query(
                "SELECT id, user_name FROM removed_users WHERE id > $1 ORDER BY id",
                &[&(after as i64)],
            )
            .await
            .map_err(pg_error)?;
        let cursor = rows
            .last()
            .map_or(after.max(last as u64), |r| r.get::<_, i64>(0) as u64);
        Ok(RemovedUsers {
            cursor,
            users: rows
                .into_iter()
                .map(|r| user_name(r.get(1)))
                .collect::<StoreResult<_>>()?,
        })
    }

    async fn create_token(&self, user: &UserName, token: &TokenHash) -> StoreResult<()> {
        let c = self.client().await?;
        let stmt = c
            .prepare_cached("INSERT INTO tokens (hash, user_key, created_at) VALUES ($1, $2, $3)")
            .await
            .map_err(pg_error)?;
        c.execute(&stmt, &[&&token[..], &user.key(), &now_ms()])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn token_user(&self, token: &TokenHash) -> StoreResult<Option<UserRecord>> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM tokens t JOIN users u ON u.key = t.user_key
             WHERE t.hash = $1"
        );
        user_record(&self.client().await?, &sql, &&token[..]).await
    }

    async fn ban_user(&self, user: &UserName, ban: ServerBan) -> StoreResult<()> {
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE users SET banned = TRUE, ban_reason = $2, ban_until = $3 WHERE key = $1",
                &[&user.key(), &ban.reason, &ban.until_ts],
            )
            .await
            .map_err(pg_error)?;
        if n == 0 {
            return Err(no_user(user));
        }
        Ok(())
    }

    async fn unban_user(&self, user: &UserName) -> StoreResult<bool> {
        let c = self.client().await?;
        // The old row's ban_until, returned by the update.
        let row = c
            .query_opt(
                "UPDATE users u SET banned = FALSE, ban_reason = NULL, ban_until = NULL
                 FROM users old WHERE u.key = $1 AND old.key = u.key AND old.banned
                 RETURNING old.ban_until",
                &[&user.key()],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.is_some_and(|r| in_force(r.get(0), now_ms())))
    }

    async fn revoke_token(&self, token: &TokenHash) -> StoreResult<()> {
        let c = self.client().await?;
        c.execute("DELETE FROM tokens WHERE hash = $1", &[&&token[..]])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn join(
        &self,
        room: &RoomName,
        user: &UserName,
        rules: JoinRules,
    ) -> StoreResult<Joined> {
        in_transaction!(self, |tx| async {
            let id = match room_row(&tx, room.as_str()).await? {
                Some((id, _)) => Some(id),
                // Channels are made by create_channel only.
                None if rules.create && room.hub().is_none() => None,
                None => return Err(StoreError::NoSuchRoom),
            };
            let member = match id {
                Some(id) => is_member(&tx, id, user).await?,
                None => false,
            };
            if !member && rules.max_rooms != u32::MAX {
                let public: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM members m JOIN rooms r ON r.id = m.room_id
                         WHERE m.user_key = $1 AND NOT r.direct",
                        &[&user.key()],
                    )
                    .await
                    .map_err(pg_error)?
                    .get(0);
                if public >= i64::from(rules.max_rooms) {
                    return Err(too_many_rooms(rules.max_rooms));
                }
            }
            let (id, role) = match id {
                Some(id) => {
                    if !member {
                        refuse_sanctioned(&tx, id, room, user, SanctionKind::Ban).await?;
                        if let (Some(hub), private) = hub_of(&tx, id).await? {
                            if !is_member(&tx, hub, user).await? {
                                return Err(not_in_hub(&room.hub().expect("a channel")));
                            }
                            if private {
                                redeem(&tx, rules.invite.as_deref(), room, user).await?;
                            }
                        }
                    }
                    (id, Role::Member)
                }
                None => (create_room(&tx, room, rules.guest).await?, Role::Owner),
            };
            let newly_joined = add_member(&tx, id, user, rules.guest, role).await?;
            let row = tx
                .query_one("SELECT topic, last_seq FROM rooms WHERE id = $1", &[&id])
                .await
                .map_err(pg_error)?;
            Ok(Joined {
                topic: row.get(0),
                last_seq: seq(row.get(1)),
                newly_joined,
            })
        })
    }

    async fn leave(&self, room: &RoomName, user: &UserName) -> StoreResult<()> {
        in_transaction!(self, |tx| async {
            let (id, _) = member_room(&tx, room, user).await?;
            tx.execute(
                "DELETE FROM members WHERE room_id = $1 AND user_key = $2",
                &[&id, &user.key()],
            )
            .await
            .map_err(pg_error)?;
            sweep_guest_rooms(&tx, Some(id)).await
        })
    }

    async fn drop_guest(&self, user: &UserName) -> StoreResult<Vec<RoomName>> {
        in_transaction!(self, |tx| async {
            let rows = tx
                .query(
                    "DELETE FROM members m USING rooms r
                     WHERE m.user_key = $1 AND m.guest AND r.id = m.room_id
                     RETURNING r.id, r.name",
                    &[&user.key()],
                )
                .await
                .map_err(pg_error)?;
            for row in &rows {
                sweep_guest_rooms(&tx, Some(row.get(0))).await?;
            }
            Ok::<_, StoreError>(
                rows.into_iter()
                    .map(|r| RoomName::from_trusted(r.get(1)))
                    .collect(),
            )
        })
    }

    async fn drop_all_guests(&self) -> StoreResult<()> {
        in_transaction!(self, |tx| async {
            tx.execute("DELETE FROM members WHERE guest", &[])
                .await
                .map_err(pg_error)?;
            sweep_guest_rooms(&tx, None).await
        })
    }

    async fn members(
        &self,
        room: &RoomName,
        after: Option<&str>,
        limit_to: u32,
    ) -> StoreResult<Vec<(UserName, Role)>> {
        let c = self.client().await?;
        let (id, _) = room_row(&c, room.as_str())
            .await?
            .ok_or(StoreError::NoSuchRoom)?;
        // In a channel, the roles are the hub's.
        let roles = authority(&c, id).await?;
        let stmt = c
            .prepare_cached(
                "SELECT m.user_name, COALESCE(h.role, m.role) FROM members m
                 LEFT JOIN members h ON h.room_id = $4 AND h.user_key = m.user_key
                 WHERE m.room_id = $1 AND m.user_key > $2
                 ORDER BY m.user_key LIMIT $3",
            )
            .await
            .map_err(pg_error)?;
        let rows = c
            .query(
                &stmt,
                &[&id, &after.unwrap_or(""), &limit(limit_to), &roles],
            )
            .await
            .map_err(pg_error)?;
        rows.into_iter()
            .map(|r| {
                let role = stored_role(i64::from(r.get::<_, i16>(1)))?;
                Ok((user_name(r.get(0))?, role))
            })
            .collect()
    }

    async fn role(&self, room: &RoomName, user: &UserName) -> StoreResult<Option<Role>> {
        let c = self.client().await?;
        let (id, _) = room_row(&c, room.as_str())
            .await?
            .ok_or(StoreError::NoSuchRoom)?;
        let id = authority(&c, id).await?;
        let stmt = c
            .prepare_cached("SELECT role FROM members WHERE room_id = $1 AND user_key = $2")
            .await
            .map_err(pg_error)?;
        let row = c
            .query_opt(&stmt, &[&id, &user.key()])
            .await
            .map_err(pg_error)?;
        row.map(|r| stored_role(i64::from(r.get::<_, i16>(0))))
            .transpose()
    }

    async fn set_role(&self, room: &RoomName, user: &UserName, role: Role) -> StoreResult<()> {
        in_transaction!(self, |tx| async {
            let (id, _) = room_row(&tx, room.as_str())
                .await?
                .ok_or(StoreError::NoSuchRoom)?;
            let id = authority(&tx, id).await?;
            if !is_member(&tx, id, user).await? {
                return Err(StoreError::NotMember);
            }
            if role != Role::Owner {
                keep_an_owner(&tx, id, room, user).await?;
            }
            tx.execute(
                "UPDATE members SET role = $3 WHERE room_id = $1 AND user_key = $2",
                &[&id, &user.key(), &role.rank()],
            )
            .await
            .map_err(pg_error)?;
            Ok::<_, StoreError>(())
        })
    }

    async fn operator(&self, user: &UserName) -> StoreResult<bool> {
        let c = self.client().await?;
        let stmt = c
            .prepare_cached("SELECT operator FROM users WHERE key = $1")
            .await
            .map_err(pg_error)?;
        let row = c.query_opt(&stmt, &[&user.key()]).await.map_err(pg_error)?;
        Ok(row.is_some_and(|r| r.get(0)))
    }

    async fn set_operator(&self, user: &UserName, operator: bool) -> StoreResult<()> {
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE users SET operator = $1 WHERE key = $2",
                &[&operator, &user.key()],
            )
            .await
            .map_err(pg_error)?;
        if n == 0 {
            return Err(no_user(user));
        }
        Ok(())
    }

    async fn sanction(&self, room: &RoomName, sanction: NewSanction) -> StoreResult<Vec<RoomName>> {
        in_transaction!(self, |tx| async {
            let (id, _) = room_row(&tx, room.as_str())
                .await?
                .ok_or(StoreError::NoSuchRoom)?;
            let s = &sanction;
            tx.execute(
                "INSERT INTO sanctions
                 (room_id, user_key, kind, user_name, by_name, reason, until_ts, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (room_id, user_key, kind) DO UPDATE SET
                    user_name = EXCLUDED.user_name, by_name = EXCLUDED.by_name,
                    reason = EXCLUDED.reason, until_ts = EXCLUDED.until_ts,
                    created_at = EXCLUDED.created_at",
                &[
                    &id,
                    &s.user.key(),
                    &sanction_kind(s.kind),
                    &s.user.as_str(),
                    &s.by.as_str(),
                    &s.reason,
                    &s.until_ts,
                    &now_ms(),
                ],
            )
            .await
            .map_err(pg_error)?;
            if s.kind != SanctionKind::Ban {
                return Ok(Vec::new());
            }
            let ended = remove_member(&tx, id, &s.user).await?;
            sweep_guest_rooms(&tx, Some(id)).await?;
            Ok::<_, StoreError>(ended)
        })
    }

    async fn lift(
        &self,
        room: &RoomName,
        user: &UserName,
        kind: SanctionKind,
    ) -> StoreResult<bool> {
        let c = self.client().await?;
        let (id, _) = room_row(&c, room.as_str())
            .await?
            .ok_or(StoreError::NoSuchRoom)?;
        let row = c
            .query_opt(
                "DELETE FROM sanctions WHERE room_id = $1 AND user_key = $2 AND kind = $3
                 RETURNING until_ts",
                &[&id, &user.key(), &sanction_kind(kind)],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.is_some_and(|r| in_force(r.get(0), now_ms())))
    }

    async fn sanctions(&self, room: &RoomName, now: i64) -> StoreResult<Vec<Sanction>> {
        let c = self.client().await?;
        let (id, _) = room_row(&c, room.as_str())
            .await?
            .ok_or(StoreError::NoSuchRoom)?;
        let rows = c
            .query(
                "SELECT user_name, kind, by_name, reason, until_ts FROM sanctions
                 WHERE room_id = $1 AND (until_ts IS NULL OR until_ts > $2)
                 ORDER BY user_key, kind",
                &[&id, &now],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .into_iter()
            .map(|r| Sanction {
                user: r.get(0),
                kind: if r.get::<_, i16>(1) == 0 {
                    SanctionKind::Ban
                } else {
                    SanctionKind::Mute
                },
                by: r.get(2),
                reason: r.get(3),
                until_ts: r.get(4),
            })
            .collect())
    }

    async fn rooms(
        &self,
        user: &UserName,
        all: bool,
        after: Option<&RoomName>,
        limit_to: u32,
    ) -> StoreResult<Vec<RoomView>> {
        let c = self.client().await?;
        let sql = if all {
            "SELECT r.name, r.topic, r.last_seq, m.read_seq,
                    (SELECT count(*) FROM members x WHERE x.room_id = r.id)
             FROM rooms r LEFT JOIN members m ON m.room_id = r.id AND m.user_key = $1
             WHERE NOT r.direct AND NOT r.private AND r.name NOT LIKE '%/'
               AND NOT EXISTS (SELECT 1 FROM rooms h WHERE h.id = r.hub_id AND h.private)
               AND r.name > $2 ORDER BY r.name LIMIT $3"
        } else {
            "SELECT r.name, r.topic, r.last_seq, m.read_seq,
                    (SELECT count(*) FROM members x WHERE x.room_id = r.id)
             FROM members m JOIN rooms r ON r.id = m.room_id
             WHERE m.user_key = $1 AND r.name > $2 ORDER BY r.name LIMIT $3"
        };
        let stmt = c.prepare_cached(sql).await.map_err(pg_error)?;
        let after = after.map_or("", |a| a.as_str());
        let rows = c
            .query(&stmt, &[&user.key(), &after, &limit(limit_to)])
            .await
            .map_err(pg_error)?;
        Ok(rows
            .iter()
            .map(|r| RoomView {
                room: RoomName::from_trusted(r.get(0)),
                topic: r.get(1),
                last_seq: seq(r.get(2)),
                read_seq: r.get::<_, Option<i64>>(3).map(seq),
                member_count: r.get::<_, i64>(4) as u64,
            })
            .collect())
    }

    async fn set_topic(&self, room: &RoomName, user: &UserName, topic: &str) -> StoreResult<()> {
        in_transaction!(self, |tx| async {
            let (id, _) = member_room(&tx, room, user).await?;
            tx.execute("UPDATE rooms SET topic = $1 WHERE id = $2", &[&topic, &id])
                .await
                .map_err(pg_error)?;
            Ok(())
        })
    }

    async fn create_hub(&self, hub: NewHub) -> StoreResult<()> {
        in_transaction!(self, |tx| async {
            let room = RoomName::hub_room(&hub.hub);
            let now = now_ms();
            let created = tx
                .query_opt(
                    "INSERT INTO rooms (name, topic, direct, private, created_at)
                     VALUES ($1, $2, FALSE, $3, $4) ON CONFLICT (name) DO NOTHING RETURNING id",
                    &[&room.as_str(), &hub.title, &hub.private, &now],
                )
                .await
                .map_err(pg_error)?;
            let Some(id) = created.map(|r| r.get::<_, i64>(0)) else {
                return Err(StoreError::Conflict(format!("hub name {}", hub.hub)));
            };
            add_member(&tx, id, &hub.owner, false, Role::Owner).await?;
            let general = RoomName::channel(&hub.hub, FIRST_CHANNEL)
                .map_err(|e| StoreError::Internal(e.message))?;
            let channel: i64 = tx
                .query_one(
                    "INSERT INTO rooms (name, direct, hub_id, created_at)
                     VALUES ($1, FALSE, $2, $3) RETURNING id",
                    &[&general.as_str(), &id, &now],
                )
                .await
                .map_err(pg_error)?
                .get(0);
            add_member(&tx, channel, &hub.owner, false, Role::Member).await?;
            Ok::<_, StoreError>(())
        })
    }

    async fn join_hub(
        &self,
        hub: &HubName,
        user: &UserName,
        guest: bool,
        invite: Option<&str>,
    ) -> StoreResult<HubJoined> {
        let room = RoomName::hub_room(hub);
        in_transaction!(self, |tx| async {
            let (id, _) = room_row(&tx, room.as_str())
                .await?
                .ok_or(StoreError::NoSuchRoom)?;
            if is_member(&tx, id, user).await? {
                return Ok(HubJoined::default());
            }
            refuse_sanctioned(&tx, id, &room, user, SanctionKind::Ban).await?;
            if hub_of(&tx, id).await?.1 {
                redeem(&tx, invite, &room, user).await?;
            }
            add_member(&tx, id, user, guest, Role::Member).await?;
            // Every public channel, but those the user is banned from.
            let open = tx
                .query(
                    "SELECT r.id, r.name, r.last_seq FROM rooms r
                     WHERE r.hub_id = $1 AND NOT r.private
                       AND NOT EXISTS (SELECT 1 FROM sanctions s
                           WHERE s.room_id = r.id AND s.user_key = $2 AND s.kind = 0
                             AND (s.until_ts IS NULL OR s.until_ts > $3))
                     ORDER BY r.name",
                    &[&id, &user.key(), &now_ms()],
                )
                .await
                .map_err(pg_error)?;
            let mut channels = Vec::new();
            for row in open {
                if add_member(&tx, row.get(0), user, guest, Role::Member).await? {
                    channels.push((RoomName::from_trusted(row.get(1)), seq(row.get(2))));
                }
            }
            Ok::<_, StoreError>(HubJoined {
                newly_joined: true,
                channels,
            })
        })
    }

    async fn leave_hub(&self, hub: &HubName, user: &UserName) -> StoreResult<Vec<RoomName>> {
        let room = RoomName::hub_room(hub);
        in_transaction!(self, |tx| async {
            let (id, _) = member_room(&tx, &room, user).await?;
            keep_an_owner(&tx, id, &room, user).await?;
            let mut left = remove_member(&tx, id, user).await?;
            left.retain(|r| !r.is_hub_room());
            Ok::<_, StoreError>(left)
        })
    }

    async fn hubs(&self, user: Option<&UserName>, all: bool) -> StoreResult<Vec<HubView>> {
        let c = self.client().await?;
        let key = user.map_or("", |u| u.key());
        let sql = if user.is_none() {
            "SELECT r.name, r.topic, r.private, NULL::SMALLINT,
                    (SELECT count(*) FROM members x WHERE x.room_id = r.id)
             FROM rooms r WHERE r.name LIKE '%/' AND $1 = '' ORDER BY r.name"
        } else if all {
            "SELECT r.name, r.topic, r.private, m.role,
                    (SELECT count(*) FROM members x WHERE x.room_id = r.id)
             FROM rooms r LEFT JOIN members m ON m.room_id = r.id AND m.user_key = $1
             WHERE r.name LIKE '%/' AND NOT r.private ORDER BY r.name"
        } else {
            "SELECT r.name, r.topic, r.private, m.role,
                    (SELECT count(*) FROM members x WHERE x.room_id = r.id)
             FROM members m JOIN rooms r ON r.id = m.room_id
             WHERE m.user_key = $1 AND r.name LIKE '%/' ORDER BY r.name"
        };
        let rows = c.query(sql, &[&key]).await.map_err(pg_error)?;
        rows.into_iter()
            .map(|r| {
                let role: Option<i16> = r.get(3);
                Ok(HubView {
                    hub: stored_hub(r.get(0))?,
                    title: r.get(1),
                    private: r.get(2),
                    member_count: r.get::<_, i64>(4) as u64,
                    role: role.map(|n| stored_role(i64::from(n))).transpose()?,
                })
            })
            .collect()
    }

    async fn hub(&self, hub: &HubName, user: &UserName) -> StoreResult<HubDetail> {
        let room = RoomName::hub_room(hub);
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT id, topic, private FROM rooms WHERE name = $1",
                &[&room.as_str()],
            )
            .await
            .map_err(pg_error)?
            .ok_or(StoreError::NoSuchRoom)?;
        let (id, title, private): (i64, String, bool) = (row.get(0), row.get(1), row.get(2));
        let members = c
            .query(
                "SELECT user_name, role, user_key FROM members WHERE room_id = $1
                 ORDER BY user_key",
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        let role = members
            .iter()
            .find(|r| r.get::<_, &str>(2) == user.key())
            .map(|r| stored_role(i64::from(r.get::<_, i16>(1))))
            .transpose()?;
        if private && role.is_none() {
            return Err(private_place(&room));
        }
        let channels = c
            .query(
                "SELECT r.name, r.topic, r.private, r.last_seq, m.read_seq FROM rooms r
                 LEFT JOIN members m ON m.room_id = r.id AND m.user_key = $2
                 WHERE r.hub_id = $1 AND (NOT r.private OR m.user_key IS NOT NULL)
                 ORDER BY r.name",
                &[&id, &user.key()],
            )
            .await
            .map_err(pg_error)?;
        Ok(HubDetail {
            title,
            private,
            role,
            channels: channels
                .into_iter()
                .map(|r| ChannelView {
                    room: RoomName::from_trusted(r.get(0)),
                    topic: r.get(1),
                    private: r.get(2),
                    last_seq: seq(r.get(3)),
                    read_seq: r.get::<_, Option<i64>>(4).map(seq),
                })
                .collect(),
            members: members
                .into_iter()
                .map(|r| {
                    Ok((
                        user_name(r.get(0))?,
                        stored_role(i64::from(r.get::<_, i16>(1)))?,
                    ))
                })
                .collect::<StoreResult<_>>()?,
        })
    }

    async fn delete_hub(&self, hub: &HubName) -> StoreResult<Vec<(RoomName, Vec<UserName>)>> {
        let room = RoomName::hub_room(hub);
        in_transaction!(self, |tx| async {
            let (id, _) = room_row(&tx, room.as_str())
                .await?
                .ok_or(StoreError::NoSuchRoom)?;
            let rooms = tx
                .query(
                    "SELECT id, name FROM rooms WHERE id = $1 OR hub_id = $1 ORDER BY name",
                    &[&id],
                )
                .await
                .map_err(pg_error)?;
            let mut gone = Vec::new();
            for row in rooms {
                let members = tx
                    .query(
                        "SELECT user_name FROM members WHERE room_id = $1 ORDER BY user_key",
                        &[&row.get::<_, i64>(0)],
                    )
                    .await
                    .map_err(pg_error)?
                    .into_iter()
                    .map(|r| user_name(r.get(0)))
                    .collect::<StoreResult<Vec<_>>>()?;
                gone.push((RoomName::from_trusted(row.get(1)), members));
            }
            // Channels, memberships, messages, bans and invites go with the
            // hub's room (ON DELETE CASCADE).
            tx.execute("DELETE FROM rooms WHERE id = $1", &[&id])
                .await
                .map_err(pg_error)?;
            Ok::<_, StoreError>(gone)
        })
    }

    async fn create_channel(
        &self,
        channel: &RoomName,
        private: bool,
        topic: &str,
        by: &UserName,
    ) -> StoreResult<Vec<UserName>> {
        in_transaction!(self, |tx| async {
            let hub = channel.hub().ok_or(StoreError::NoSuchRoom)?;
            let (hub_id, _) = room_row(&tx, RoomName::hub_room(&hub).as_str())
                .await?
                .ok_or(StoreError::NoSuchRoom)?;
            let now = now_ms();
            let created = tx
                .query_opt(
                    "INSERT INTO rooms (name, topic, direct, hub_id, private, created_at)
                     VALUES ($1, $2, FALSE, $3, $4, $5) ON CONFLICT (name) DO NOTHING
                     RETURNING id",
                    &[&channel.as_str(), &topic, &hub_id, &private, &now],
                )
                .await
                .map_err(pg_error)?;
            let Some(id) = created.map(|r| r.get::<_, i64>(0)) else {
                return Err(StoreError::Conflict(format!("channel name {channel}")));
            };
            if private {
                add_member(&tx, id, by, false, Role::Member).await?;
                return Ok(vec![by.clone()]);
            }
            let rows = tx
                .query(
                    "INSERT INTO members (room_id, user_key, user_name, guest, joined_at, role)
                     SELECT $1, user_key, user_name, guest, $3, 0 FROM members
                     WHERE room_id = $2 RETURNING user_name",
                    &[&id, &hub_id, &now],
                )
                .await
                .map_err(pg_error)?;
            rows.into_iter()
                .map(|r| user_name(r.get(0)))
                .collect::<StoreResult<Vec<_>>>()
        })
    }

    async fn create_invite(&self, invite: NewInvite) -> StoreResult<()> {
        let c = self.client().await?;
        let (id, _) = room_row(&c, invite.place.as_str())
            .await?
            .ok_or(StoreError::NoSuchRoom)?;
        c.execute(
            "INSERT INTO invites (code, room_id, user_key, expires_ts, by_name, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &invite.code,
                &id,
                &invite.user.as_ref().map(|u| u.key()),
                &invite.expires_ts,
                &invite.by.as_str(),
                &now_ms(),
            ],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    async fn queue_append(&self, message: NewMessage) -> StoreResult<Queued> {
        if message.direct.is_none() && message.amend.is_none() {
            return self.batcher.queue(message).await;
        }
        // A direct message may open its conversation, an edit or deletion
        // changes another row: rare, and done in a transaction of its own,
        // committed before this returns (so it keeps its place in the
        // caller's order).
        let outcome = in_transaction!(self, |tx| append_one(&tx, message));
        Ok(Box::pin(std::future::ready(outcome)))
    }

    async fn history(
        &self,
        room: &RoomName,
        user: &UserName,
        page: Page,
        limit_to: u32,
    ) -> StoreResult<HistoryPage> {
        let c = self.client().await?;
        let (id, _) = member_room(&c, room, user).await?;
        // One row more than asked tells whether there are more.
        let probe = limit(limit_to) + 1;
        let (sql, bound, descending) = match page {
            Page::Latest => ("seq <= $2 ORDER BY seq DESC", i64::MAX, true),
            Page::Before(b) => ("seq < $2 ORDER BY seq DESC", b as i64, true),
            Page::After(a) => ("seq > $2 ORDER BY seq ASC", a as i64, false),
        };
        let sql =
            format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = $1 AND {sql} LIMIT $3");
        let mut messages = query_messages(&c, room.as_str(), &sql, &[&id, &bound, &probe]).await?;
        let more = messages.len() > limit_to as usize;
        messages.truncate(limit_to as usize);
        if descending {
            messages.reverse();
        }
        Ok(HistoryPage { messages, more })
    }

    async fn messages_after(
        &self,
        room: &RoomName,
        after: Seq,
        limit_to: u32,
    ) -> StoreResult<Vec<Message>> {
        let c = self.client().await?;
        let Some((id, _)) = room_row(&c, room.as_str()).await? else {
            return Ok(Vec::new());
        };
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE room_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        );
        query_messages(
            &c,
            room.as_str(),
            &sql,
            &[&id, &(after as i64), &limit(limit_to)],
        )
        .await
    }

    async fn last_seqs(&self, rooms: &[RoomName]) -> StoreResult<Vec<Seq>> {
        let c = self.client().await?;
        let names: Vec<&str> = rooms.iter().map(RoomName::as_str).collect();
        let stmt = c
            .prepare_cached("SELECT name, last_seq FROM rooms WHERE name = ANY($1)")
            .await
            .map_err(pg_error)?;
        let found: std::collections::HashMap<String, i64> = c
            .query(&stmt, &[&names])
            .await
            .map_err(pg_error)?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(names
            .iter()
            .map(|n| found.get(*n).map_or(0, |s| *s as Seq))
            .collect())
    }

    async fn mark_read(&self, room: &RoomName, user: &UserName, seq_to: Seq) -> StoreResult<Seq> {
        in_transaction!(self, |tx| async {
            let (id, last_seq) = member_room(&tx, room, user).await?;
            if seq_to as i64 > last_seq {
                return Err(StoreError::Invalid(format!(
                    "seq {seq_to} is past the room's last message ({last_seq})"
                )));
            }
            let marker: i64 = tx
                .query_one(
                    "UPDATE members SET read_seq = GREATEST(read_seq, $1)
                     WHERE room_id = $2 AND user_key = $3 RETURNING read_seq",
                    &[&(seq_to as i64), &id, &user.key()],
                )
                .await
                .map_err(pg_error)?
                .get(0);
            Ok(seq(marker))
        })
    }

    async fn ping(&self) -> StoreResult<()> {
        let c = self.client().await?;
        // A server in recovery (a standby, or a primary demoted by a
        // failover) answers reads and refuses every write.
        let writable: bool = c
            .query_one("SELECT NOT pg_is_in_recovery()", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        if !writable {
            return Err(StoreError::Unavailable(
                "PostgreSQL is read-only (in recovery)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod testing {
    //! A schema of its own for each test, on the server that
    //! `CONFAB_TEST_POSTGRES` names, so tests run in parallel and leave
    //! nothing behind.

    use tokio_postgres::NoTls;

    /// The variable that names the test server.
    pub const VAR: &str = "CONFAB_TEST_POSTGRES";

    /// A fresh, empty schema; dropped (with everything in it) with this.
    pub struct TestSchema {
        /// A URL whose connections use only this schema.
        pub url: String,
        base: String,
        name: String,
    }

    impl TestSchema {
        /// `None`, having said why, when `CONFAB_TEST_POSTGRES` is unset.
        pub async fn create() -> Option<TestSchema> {
            let Ok(base) = std::env::var(VAR) else {
                eprintln!(
                    "skipped: set {VAR}=postgres://postgres@127.0.0.1:5432/postgres \
                     to run the PostgreSQL tests"
                );
                return None;
            };
            let name = format!(
                "confab_test_{:016x}",
                getrandom::u64().expect("random bytes")
            );
            let (client, conn) = tokio_postgres::connect(&base, NoTls)
                .await
                .unwrap_or_else(|e| panic!("{VAR}={base}: {e}"));
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE SCHEMA {name}"))
                .await
                .expect("creating a test schema");
            let sep = if base.contains('?') { '&' } else { '?' };
            // The application name marks this test's connections, so that
            // dropping the schema can end them first.
            let url =
                format!("{base}{sep}options=-c%20search_path%3D{name}&application_name={name}");
            Some(TestSchema { url, base, name })
        }
    }

    impl Drop for TestSchema {
        fn drop(&mut self) {
            let (base, name) = (self.base.clone(), self.name.clone());
            // Drop runs outside async code: a thread with a runtime of its own.
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async {
                    let (client, conn) = tokio_postgres::connect(&base, NoTls).await?;
                    tokio::spawn(conn);
                    // The test's own connections may still hold locks (a
                    // transaction its panic abandoned, on a runtime this
                    // drop now blocks): end them, then drop.
                    client
                        .execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                             WHERE application_name = $1 AND pid <> pg_backend_pid()",
                            &[&name],
                        )
                        .await?;
                    client
                        .batch_execute(&format!("DROP SCHEMA {name} CASCADE"))
                        .await
                })
            })
            .join();
            if !matches!(dropped, Ok(Ok(()))) {
                eprintln!("could not drop the test schema {}", self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestSchema;
    use super::*;
    use confab_core::DynStore;
    use std::sync::Arc;

    async fn fresh() -> Option<(DynStore, TestSchema)> {
        let schema = TestSchema::create().await?;
        let store = PgStore::open(&schema.url, 8)
            .await
            .expect("opening the store");
        Some((Arc::new(store) as DynStore, schema))
    }

    confab_core::store_contract_tests!(optional fresh());

    #[test]
    fn a_dead_connection_is_found_in_seconds_unless_the_url_says_otherwise() {
        let (c, _) = parse("postgres://u@db/chat").unwrap();
        assert_eq!(c.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(c.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(c.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
        // The URL's own, with libpq's units: milliseconds for the user
        // timeout (the driver alone would read seconds), seconds for the
        // keepalives.
        let (c, _) = parse(
            "postgres://u@db/chat?tcp_user_timeout=1500&keepalives_idle=7200\
             &keepalives_interval=30&keepalives_retries=9&application_name=x",
        )
        .unwrap();
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_millis(1500)));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(7200));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(30)));
        assert_eq!(c.get_keepalives_retries(), Some(9));
        assert_eq!(c.get_application_name(), Some("x"));
        let (c, _) = parse("postgres://u@db/chat?tcp_user_timeout=0&keepalives=0").unwrap();
        assert_eq!(c.get_tcp_user_timeout(), None, "0: the system's default");
        assert!(!c.get_keepalives());
        let e = parse("postgres://u@db/chat?tcp_user_timeout=20s").unwrap_err();
        assert!(e.to_string().contains("milliseconds"), "{e}");
    }

    /// A store of one connection whose `pool::WINDOW` is `window`.
    async fn one_connection(schema: &TestSchema, window: Duration) -> PgStore {
        let mut store = PgStore::open(&schema.url, 1).await.unwrap();
        store.pool.set_window(window);
        store
    }

    #[tokio::test]
    async fn a_burst_waits_for_the_pool_while_the_database_answers() {
        let Some(schema) = TestSchema::create().await else {
            return;
        };
        // 20 requests of 30 ms each on one connection: the last waits
        // about 600 ms, many windows, but connections are handed out all
        // the while.
        let store = Arc::new(one_connection(&schema, Duration::from_millis(100)).await);
        let requests: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let client = store.client().await?;
                    client
                        .batch_execute("SELECT pg_sleep(0.03)")
                        .await
                        .map_err(pg_error)
                })
            })
            .collect();
        for request in requests {
            request
                .await
                .unwrap()
                .expect("served, however long the queue");
        }
    }

    #[tokio::test]
    async fn a_pool_that_hands_out_nothing_answers_unavailable() {
        let Some(schema) = TestSchema::create().await else {
            return;
        };
        let window = Duration::from_millis(100);
        let store = one_connection(&schema, window).await;
        let held = store.client().await.unwrap();
        let asked = std::time::Instant::now();
        match store.client().await {
            Err(StoreError::Unavailable(m)) => assert_eq!(m, "PostgreSQL does not answer"),
            other => panic!("expected unavailable, got {:?}", other.map(|_| ())),
        }
        assert!(asked.elapsed() >= window, "after a window");
        drop(held);
        let _back = store.client().await.expect("once the connection is back");
    }

    #[tokio::test]
    async fn a_database_from_before_roles_keeps_everything() {
        let Some(schema) = TestSchema::create().await else {
            return;
        };
        // A database as version 3 left it: a room, two members, a message.
        let (client, conn) = tokio_postgres::connect(&schema.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("CREATE TABLE confab_schema (version INTEGER NOT NULL);")
            .await
            .unwrap();
        for sql in &MIGRATIONS[..3] {
            client.batch_execute(sql).await.unwrap();
        }
        client
            .batch_execute(
                "INSERT INTO confab_schema VALUES (3);
                 INSERT INTO users VALUES ('ann', 'Ann', 'h', 1);
                 INSERT INTO rooms (id, name, topic, last_seq, direct, created_at)
                     VALUES (7, 'old', 'from before', 1, FALSE, 1);
                 INSERT INTO members VALUES (7, 'ann', 'Ann', FALSE, 1, 1),
                                            (7, 'bob', 'bob', FALSE, 0, 1);
                 INSERT INTO messages VALUES (7, 1, 'ann', 'Ann', 'still here', 5, 'n-1');",
            )
            .await
            .unwrap();
        let store = PgStore::open(&schema.url, 2).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), (4, 4));
        confab_core::store::contract::keeps_a_database_from_before_roles(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn migrations_run_once_and_a_newer_schema_is_refused() {
        let Some(schema) = TestSchema::create().await else {
            return;
        };
        // Several nodes starting at once: the advisory lock lets one apply.
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = schema.url.clone();
                tokio::spawn(async move { PgStore::open(&url, 2).await.map(|_| ()) })
            })
            .collect();
        for open in opens {
            open.await.unwrap().expect("every node opens");
        }
        let store = PgStore::open(&schema.url, 2).await.unwrap();
        assert_eq!(
            store.schema_version().await.unwrap(),
            (MIGRATIONS.len() as u32, MIGRATIONS.len() as u32)
        );
        let c = store.client().await.unwrap();
        c.execute("UPDATE confab_schema SET version = 99", &[])
            .await
            .unwrap();
        match PgStore::open(&schema.url, 2).await {
            Err(StoreError::Unavailable(m)) => assert!(m.contains("newer"), "{m}"),
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn concurrent_appends_to_one_room_share_commits() {
        let Some(schema) = TestSchema::create().await else {
            return;
        };
        let store = Arc::new(PgStore::open(&schema.url, 8).await.unwrap());
        let room = RoomName::parse("busy").unwrap();
        let name = |i: usize| UserName::parse(&format!("u{i}")).unwrap();
        for i in 0..50 {
            store
                .join(&room, &name(i), JoinRules::open(false))
                .await
                .unwrap();
        }
        let before = store.batch_stats();
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let (store, room) = (store.clone(), room.clone());
                tokio::spawn(async move {
                    for j in 0..10 {
                        let m = NewMessage {
                            room: room.clone(),
                            sender: name(i),
                            body: format!("{i}-{j}"),
                            nonce: Some(format!("{i}-{j}")),
                            ts: 0,
                            direct: None,
                            amend: None,
                        };
                        store.append(m).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let after = store.batch_stats();
        let (batches, messages) = (after.0 - before.0, after.1 - before.1);
        assert_eq!(messages, 500);
        assert!(
            batches < messages,
            "500 concurrent appends to one room took {batches} commits: no group commit"
        );
        let page = store
            .history(&room, &name(0), Page::After(0), 500)
            .await
            .unwrap();
        let seqs: Vec<Seq> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=500).collect::<Vec<Seq>>(), "gapless");
    }

    #[tokio::test]
    async fn one_batch_answers_each_message_in_order() {
        let Some(schema) = TestSchema::create().await else {
            return;
        };
        let store = PgStore::open(&schema.url, 2).await.unwrap();
        let user = |n: &str| UserName::parse(n).unwrap();
        let room = RoomName::parse("r").unwrap();
        store
            .join(&room, &user("ann"), JoinRules::open(false))
            .await
            .unwrap();
        store
            .join(&room, &user("bo"), JoinRules::open(false))
            .await
            .unwrap();
        let old = NewMessage {
            room: room.clone(),
            sender: user("ann"),
            body: "stored before".into(),
            nonce: Some("old".into()),
            ts: 1,
            direct: None,
            amend: None,
        };
        store.append(old).await.unwrap();
        // Straight to the function, so that these are one batch for sure.
        let c = store.client().await.unwrap();
        let rows = c
            .query(
                "SELECT * FROM confab_append_batch($1, $2, $3, $4, $5, $6)",
                &[
                    &vec!["r", "r", "nowhere", "r", "r", "r", "r"],
                    &vec!["ann", "ann", "ann", "eve", "bo", "ann", "ann"],
                    &vec!["ann", "ann", "ann", "eve", "bo", "ann", "ann"],
                    &vec!["a", "b", "c", "d", "e", "again", "old again"],
                    &vec![2i64, 3, 4, 5, 6, 7, 8],
                    &vec![
                        Some("x"),
                        None,
                        None,
                        None,
                        Some("x"),
                        Some("x"),
                        Some("old"),
                    ],
                ],
            )
            .await
            .unwrap();
        let got: Vec<(i16, Option<i64>, Option<String>)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(3)))
            .collect();
        let s = |t: &str| Some(t.to_owned());
        assert_eq!(
            got,
            [
                (0, Some(2), s("a")),
                (0, Some(3), s("b")),
                (2, None, None),
                (3, None, None),
                (0, Some(4), s("e")),
                (1, Some(2), s("a")),
                (1, Some(1), s("stored before")),
            ],
            "stored in order; no room; not a member; a nonce of another sender is \
             its own; a repeat within the batch and of an earlier message"
        );
        let last: i64 = c
            .query_one("SELECT last_seq FROM rooms WHERE name = 'r'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(last, 4);
    }

    /// Whether the store's connections are encrypted.
    async fn encrypted(store: &PgStore) -> bool {
        store
            .client()
            .await
            .unwrap()
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test]
    async fn tls_as_sslmode_asks() {
        let Some(schema) = TestSchema::create().await else {
            return;
        };
        let server_has_tls: bool = {
            let store = PgStore::connect(&format!("{}&sslmode=disable", schema.url), 1).unwrap();
            assert!(!encrypted(&store).await, "sslmode=disable: plain");
            let c = store.client().await.unwrap();
            let on: String = c.query_one("SHOW ssl", &[]).await.unwrap().get(0);
            on == "on"
        };
        if !server_has_tls {
            eprintln!("skipped the TLS half: the test server has ssl = off");
            return;
        }
        for mode in ["require", "prefer"] {
            let url = format!("{}&sslmode={mode}", schema.url);
            let store = PgStore::open(&url, 1).await.expect(mode);
            assert!(encrypted(&store).await, "sslmode={mode}: encrypted");
        }
        // With a root certificate that did not sign the server's: refused.
        let dir = std::env::temp_dir().join(format!("confab-ca-{:x}", getrandom::u64().unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["elsewhere".into()]).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, ca.cert.pem()).unwrap();
        let url = format!(
            "{}&sslmode=require&sslrootcert={}",
            schema.url,
            pem.display()
        );
        let refused = PgStore::open(&url, 1)
            .await
            .err()
            .expect("an unknown issuer");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(refused.to_string().contains("certificate"), "{refused}");
    }

    #[tokio::test]
    async fn bad_databases_are_named_before_anything_is_served() {
        let Some(schema) = TestSchema::create().await else {
            return;
        };
        // A database of another application.
        let c = PgStore::connect(&schema.url, 1).unwrap();
        c.client()
            .await
            .unwrap()
            .batch_execute("CREATE TABLE invoices (id INT)")
            .await
            .unwrap();
        let refusal = |r: StoreResult<PgStore>| match r {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected a refusal"),
        };
        let e = refusal(PgStore::open(&schema.url, 1).await);
        assert!(e.contains("something else"), "{e}");
        // Malformed, incomplete, or unreachable.
        for (url, says) in [
            ("mysql://x", "not a PostgreSQL URL"),
            ("postgres://", "no user"),
            ("postgres://u@h:notaport/db", "malformed"),
            (
                "postgres://u@127.0.0.1/db?sslmode=disable&sslrootcert=/x.pem",
                "no TLS",
            ),
            (
                "postgres://u@127.0.0.1/db?sslrootcert=/no/such/ca.pem",
                "sslrootcert=/no/such/ca.pem",
            ),
        ] {
            let e = refusal(PgStore::open(url, 1).await);
            assert!(e.contains(says), "{url}: {e}");
        }
        let e = refusal(PgStore::open("postgres://u@127.0.0.1:1/db", 1).await);
        assert!(e.contains("unavailable"), "{e}");
        // Wrong credentials: a role the server does not know.
        let (_, rest) = schema.url.split_once('@').unwrap();
        let stranger = format!("postgres://no_such_role_here@{rest}");
        let e = refusal(PgStore::open(&stranger, 1).await);
        assert!(e.contains("no_such_role_here"), "{e}");
        let base = std::env::var(super::testing::VAR).unwrap();
        let wrong_db = format!("{}/no_such_database_here", base.rsplit_once('/').unwrap().0);
        let e = refusal(PgStore::open(&wrong_db, 1).await);
        assert!(e.contains("no_such_database_here"), "{e}");
    }
}
