//! `confab db copy`: a SQLite deployment moved to PostgreSQL, whole. Users
//! keep their password hashes, tokens and operator flags, rooms their
//! topics, counters, hubs, bans, mutes and invites, members their read
//! markers and roles,
//! messages their seqs, times, nonces, edits and deletions, so
//! that clients resume and sync afterwards as if nothing happened. The copy
//! is checked (every count, and every room's last seq) before it is done.

use std::path::Path;
use std::time::Instant;

use confab_core::store::transfer::Census;
use confab_core::StoreError;
use confab_store_postgres::PgStore;
use confab_store_sqlite::SqliteExport;

use crate::config::Database;

/// Messages read and written per round trip.
const CHUNK: u32 = 5000;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("copy goes from a sqlite:// database to a postgres:// one")]
    Direction,
    #[error(
        "the target already holds users or rooms: copy into an empty database, or pass \
         --replace to wipe the target first"
    )]
    NotEmpty,
    #[error("the copy does not match its source: {0}")]
    Mismatch(String),
}

/// How far a copy is: messages copied, of how many.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub messages: u64,
    pub of: u64,
    pub started: Instant,
}

/// Copy everything from `from` (SQLite) into `to` (PostgreSQL, migrated
/// first); `replace` wipes a target that is not empty. Returns what was
/// copied, checked against the source. Stop the server on `from` first: a
/// message written during the copy may be missed (the check then fails).
pub async fn copy(
    from: &Database,
    to: &Database,
    replace: bool,
    mut progress: impl FnMut(Progress),
) -> Result<Census, CopyError> {
    let (Database::Sqlite { path, .. }, Database::Postgres { url, pool_size }) = (from, to) else {
        return Err(CopyError::Direction);
    };
    let source = SqliteExport::open(Path::new(path)).await?;
    let target = PgStore::open(url, *pool_size).await?;
    if !target.is_empty().await? {
        if !replace {
            return Err(CopyError::NotEmpty);
        }
        target.wipe().await?;
    }
    let census = source.census().await?;
    let started = Instant::now();

    let users = source.users().await?;
    for chunk in users.chunks(CHUNK as usize) {
        target.import_users(chunk).await?;
    }
    let tokens = source.tokens().await?;
    for chunk in tokens.chunks(CHUNK as usize) {
        target.import_tokens(chunk).await?;
    }
    let rooms = source.rooms().await?;
    // Hubs' own rooms before the channels that name them.
    let (channels, others): (Vec<_>, Vec<_>) = rooms.iter().cloned().partition(|r| r.hub.is_some());
    for part in [others, channels] {
        for chunk in part.chunks(CHUNK as usize) {
            target.import_rooms(chunk).await?;
        }
    }
    let members = source.members().await?;
    for chunk in members.chunks(CHUNK as usize) {
        target.import_members(chunk).await?;
    }
    let sanctions = source.sanctions().await?;
    for chunk in sanctions.chunks(CHUNK as usize) {
        target.import_sanctions(chunk).await?;
    }
    let invites = source.invites().await?;
    for chunk in invites.chunks(CHUNK as usize) {
        target.import_invites(chunk).await?;
    }
    let mut copied = 0;
    for room in &rooms {
        let mut after = 0;
        loop {
            let messages = source.messages(&room.name, after, CHUNK).await?;
            let Some(last) = messages.last() else { break };
            after = last.seq;
            target.import_messages(&room.name, &messages).await?;
            copied += messages.len() as u64;
            progress(Progress {
                messages: copied,
                of: census.messages,
                started,
            });
        }
    }

    let copy = target.census().await?;
    let differences = differences(&census, &copy);
    if !differences.is_empty() {
        return Err(CopyError::Mismatch(differences.join("; ")));
    }
    Ok(copy)
}

/// What differs between a source's census and its copy's, in words.
fn differences(source: &Census, copy: &Census) -> Vec<String> {
    let mut out = Vec::new();
    for (what, a, b) in [
        ("users", source.users, copy.users),
        ("tokens", source.tokens, copy.tokens),
        ("rooms", source.rooms, copy.rooms),
        ("memberships", source.members, copy.members),
        ("messages", source.messages, copy.messages),
        ("bans and mutes", source.sanctions, copy.sanctions),
        ("invites", source.invites, copy.invites),
    ] {
        if a != b {
            out.push(format!("{what}: {a} in the source, {b} in the copy"));
        }
    }
    for (a, b) in source.last_seqs.iter().zip(&copy.last_seqs) {
        if a != b {
            out.push(format!(
                "room {}: last seq {} (highest stored {}) in the source, {} in the copy \
                 (highest {})",
                a.0, a.1, a.2, b.1, b.2
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_named() {
        let source = Census {
            users: 2,
            messages: 10,
            last_seqs: vec![("a".into(), 10, 10)],
            ..Census::default()
        };
        assert!(differences(&source, &source.clone()).is_empty());
        let copy = Census {
            messages: 9,
            last_seqs: vec![("a".into(), 10, 9)],
            ..source.clone()
        };
        let d = differences(&source, &copy);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("messages: 10 in the source, 9 in the copy"));
        assert!(d[1].contains("room a"));
    }
}
