//! Passwords and tokens. Hashing is argon2id, run on the blocking pool under
//! a semaphore (each hash holds ~19 MiB, so a burst of logins must not
//! start hundreds at once). Tokens are 256 random bits, given to the client
//! as hex and stored only as their SHA-256.

use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::error::ChatError;
use crate::store::TokenHash;

#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// A hash to verify against when the user does not exist, so that an
    /// unknown name costs as much time as a wrong password.
    decoy: Arc<OnceLock<String>>,
}

impl Passwords {
    /// `concurrency`: how many hashes may run at once.
    pub fn new(concurrency: usize) -> Self {
        Passwords {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            decoy: Arc::default(),
        }
    }

    /// Hash a password (argon2id, default parameters: 19 MiB, 2 passes).
    pub async fn hash(&self, password: String) -> Result<String, ChatError> {
        self.blocking(move || hash_now(&password)).await?
    }

    /// Check a password against a stored hash, or against the decoy when
    /// there is none (and then always fail).
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, ChatError> {
        let decoy = self.decoy.clone();
        self.blocking(move || {
            let (phc, real) = match &hash {
                Some(h) => (h.as_str(), true),
                None => (
                    decoy
                        .get_or_init(|| hash_now("decoy password").expect("hashing works"))
                        .as_str(),
                    false,
                ),
            };
            let ok = PasswordHash::new(phc)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false);
            ok && real
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ChatError> {
        let _permit = self.permits.acquire().await.expect("never closed");
        tokio::task::spawn_blocking(f).await.map_err(|e| {
            tracing::error!(error = %e, "password hashing task failed");
            ChatError::new(confab_proto::ErrorCode::Internal, "password hashing failed")
        })
    }
}

fn hash_now(password: &str) -> Result<String, ChatError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("the OS random source works");
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ChatError::new(confab_proto::ErrorCode::Internal, format!("hashing: {e}")))
}

/// Password length bounds, in characters.
const PASSWORD_CHARS: std::ops::RangeInclusive<usize> = 8..=256;

/// The rules a new password follows.
pub fn check_password(password: &str) -> Result<(), ChatError> {
    let n = password.chars().count();
    if n > *PASSWORD_CHARS.end() {
        return Err(ChatError::too_large(
            "a password has at most 256 characters",
        ));
    }
    if n < *PASSWORD_CHARS.start() {
        return Err(ChatError::bad_request(
            "a password has at least 8 characters",
        ));
    }
    Ok(())
}

/// A fresh token: what the client gets, and what the store keeps.
pub fn new_token() -> (String, TokenHash) {
    let token = random_hex(32);
    let hash = token_hash(&token);
    (token, hash)
}

/// `bytes` random bytes from the OS, in hex: tokens, invite codes.
pub fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).expect("the OS random source works");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_decoys_never_do() {
        let p = Passwords::new(2);
        let h = p.hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(p
            .verify("correct horse".into(), Some(h.clone()))
            .await
            .unwrap());
        assert!(!p.verify("wrong".into(), Some(h)).await.unwrap());
        assert!(!p.verify("decoy password".into(), None).await.unwrap());
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, ha) = new_token();
        let (b, _) = new_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(token_hash(&a), ha);
    }
}
