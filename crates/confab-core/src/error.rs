//! The errors of the core. [`ChatError`] is what a client sees (a stable
//! code and a human sentence); [`StoreError`] is what a storage backend
//! reports, mapped to a `ChatError` in one place.

use confab_proto::{ErrorBody, ErrorCode};

/// A refused request, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ChatError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl ChatError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ChatError {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
    }
}

impl From<ChatError> for ErrorBody {
    fn from(e: ChatError) -> Self {
        ErrorBody {
            code: e.code,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }
    }
}

/// What a storage backend can report. The domain cases (`NoSuchRoom`,
/// `NotMember`, `Conflict`, `Invalid`) are checked inside the backend's own
/// transaction, so they hold even with several servers on one database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("no such room")]
    NoSuchRoom,
    #[error("not a member of the room")]
    NotMember,
    #[error("{0} is already taken")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The room has no message with this seq (or it was deleted).
    #[error("no message {0} in the room")]
    NoSuchMessage(u64),
    /// Not allowed: banned, muted, someone else's message, the last owner.
    #[error("{0}")]
    Refused(String),
    /// A configured cap (rooms per user) would be passed.
    #[error("{0}")]
    Limit(String),
    /// The backend cannot be reached or is shutting down.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A bug or a corrupt database.
    #[error("storage failure: {0}")]
    Internal(String),
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::NoSuchRoom => ErrorCode::NotFound,
            StoreError::NotMember => ErrorCode::Forbidden,
            StoreError::Conflict(_) => ErrorCode::Conflict,
            StoreError::Invalid(_) => ErrorCode::BadRequest,
            StoreError::NoSuchMessage(_) => ErrorCode::NotFound,
            StoreError::Refused(_) => ErrorCode::Forbidden,
            StoreError::Limit(_) => ErrorCode::Forbidden,
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Internal(_) => ErrorCode::Internal,
        };
        if code == ErrorCode::Internal {
            tracing::error!(error = %e, "storage failure");
        }
        ChatError::new(code, e.to_string())
    }
}
