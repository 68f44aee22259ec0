//! Operations endpoints: `/readyz`, `/metrics`, and the admin API under
//! `/admin/` (JSON; `Authorization: Bearer <token>`, with the token from
//! the configuration; no token configured, no admin API: 404).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use confab_core::names::HubName;
use confab_core::session::MAX_SANCTION_MS;
use confab_core::store::{now_ms, ServerBan};
use confab_core::{RoomName, StoreError, UserName};
use confab_proto::ErrorCode;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::metrics::Transport;
use crate::App;

/// How long `/readyz` waits for storage to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest admin notice, in bytes.
const MAX_NOTICE_BYTES: usize = 4096;

/// Ready: storage answers and the server is not draining.
pub(crate) async fn ready(State(app): State<Arc<App>>) -> Response {
    if app.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    // Without its broker a node still serves its own clients (and fills
    // what it missed once back): still ready, or a Redis outage would take
    // every node out of the balancer. It says so.
    let broker = if app.chat.broker_status().0 {
        ""
    } else {
        "broker: not connected (serving this node's clients only)\n"
    };
    match tokio::time::timeout(READY_TIMEOUT, app.chat.store().ping()).await {
        Ok(Ok(())) => (StatusCode::OK, format!("ready\n{broker}")).into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("storage: {e}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage: no answer\n").into_response(),
    }
}

pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    let body = app.metrics.render(&app.chat);
    let kind = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (kind, body).into_response()
}

pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/admin/stats", get(stats))
        .route("/admin/users", get(users))
        .route("/admin/rooms", get(rooms))
        .route("/admin/users/{name}/disconnect", post(disconnect))
        .route("/admin/users/{name}/ban", post(ban))
        .route("/admin/users/{name}/unban", post(unban))
        .route("/admin/notice", post(notice))
        .route("/admin/hubs", get(hubs))
        .route("/admin/hubs/{name}/delete", post(delete_hub))
        .route(
            "/admin/rooms/{room}/messages/{seq}/delete",
            post(delete_message),
        )
}

/// Proof that the request carries the admin token.
struct Admin;

impl FromRequestParts<Arc<App>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Admin, Response> {
        let Some(token) = app.config().admin_token.clone() else {
            return Err(error(StatusCode::NOT_FOUND, "the admin API is off"));
        };
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(given) if same(given.as_bytes(), token.expose().as_bytes()) => Ok(Admin),
            _ => {
                let mut response =
                    error(StatusCode::UNAUTHORIZED, "a valid bearer token is needed");
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    "Bearer".parse().expect("a header"),
                );
                Err(response)
            }
        }
    }
}

/// Compare without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn stats(_: Admin, State(app): State<Arc<App>>) -> Json<Value> {
    let (users, rooms) = app.chat.counts();
    Json(json!({
        "version": confab_proto::VERSION,
        "uptime_seconds": app.started.elapsed().as_secs(),
        "draining": app.draining.is_cancelled(),
        "connections": {
            "ws": app.metrics.open_connections(Transport::Ws),
            "line": app.metrics.open_connections(Transport::Line),
        },
        "users_online": users,
        "rooms_active": rooms,
        "messages_stored": app.metrics.messages_stored(),
    }))
}

async fn users(_: Admin, State(app): State<Arc<App>>) -> Json<Value> {
    let users: Vec<Value> = app
        .chat
        .online()
        .into_iter()
        .map(|c| {
            let addresses: Vec<String> = c.addresses.iter().map(|a| a.to_string()).collect();
            json!({"user": c.user.name.as_str(), "guest": c.user.guest,
                   "connections": c.connections, "addresses": addresses})
        })
        .collect();
    Json(json!({ "users": users }))
}

async fn rooms(_: Admin, State(app): State<Arc<App>>) -> Response {
    // `rooms` with `all` lists every public room; whose read markers it
    // shows does not matter here, and none are returned.
    let anyone = UserName::parse("admin").expect("a valid name");
    match app.chat.store().rooms(&anyone, true, None, u32::MAX).await {
        Ok(rooms) => {
            let rooms: Vec<Value> = rooms
                .into_iter()
                .map(|r| {
                    json!({"room": r.room.as_str(), "topic": r.topic,
                           "member_count": r.member_count, "last_seq": r.last_seq})
                })
                .collect();
            Json(json!({ "rooms": rooms })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn disconnect(_: Admin, State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let Ok(user) = UserName::parse(&name) else {
        return error(StatusCode::BAD_REQUEST, "not a valid user name");
    };
    let connections = app
        .chat
        .online()
        .into_iter()
        .find(|c| c.user.name == user)
        .map_or(0, |c| c.connections);
    if let Err(e) = app.chat.disconnect(&user).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    }
    tracing::info!(user = %user, connections, "an administrator disconnected a user");
    Json(json!({ "user": user.as_str(), "connections": connections })).into_response()
}

async fn hubs(_: Admin, State(app): State<Arc<App>>) -> Response {
    match app.chat.store().hubs(None, true).await {
        Ok(hubs) => {
            let hubs: Vec<Value> = hubs
                .into_iter()
                .map(|h| {
                    json!({"hub": h.hub.as_str(), "title": h.title, "private": h.private,
                           "member_count": h.member_count})
                })
                .collect();
            Json(json!({ "hubs": hubs })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// Delete a hub with its channels and their history.
async fn delete_hub(_: Admin, State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let Ok(hub) = HubName::parse(&name) else {
        return error(StatusCode::BAD_REQUEST, "not a valid hub name");
    };
    match app.chat.delete_hub(&hub).await {
        Ok(members) => {
            tracing::info!(hub = %hub, members, "an administrator deleted a hub");
            Json(json!({ "hub": hub.as_str(), "members": members })).into_response()
        }
        Err(StoreError::NoSuchRoom) => error(StatusCode::NOT_FOUND, &format!("no hub named {hub}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteMessage {
    /// The operator in whose name the deletion is logged.
    by: String,
}

/// Delete a message in an operator's name: `{"by": OPERATOR}`.
async fn delete_message(
    _: Admin,
    State(app): State<Arc<App>>,
    Path((room, seq)): Path<(String, u64)>,
    body: Result<Json<DeleteMessage>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(DeleteMessage { by })) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected {\"by\": \"OPERATOR\"}: the deletion is logged in an operator's name",
        );
    };
    let (Ok(room), Ok(by)) = (RoomName::parse(&room), UserName::parse(&by)) else {
        return error(StatusCode::BAD_REQUEST, "not a valid room or user name");
    };
    match app.chat.delete_message(&room, seq, &by).await {
        Ok(entry) => {
            tracing::info!(room = %room, seq, by = %by, "an operator deleted a message");
            Json(json!({ "room": entry.room, "seq": entry.seq, "delete": seq })).into_response()
        }
        Err(e) => {
            let status = match e.code {
                ErrorCode::NotFound => StatusCode::NOT_FOUND,
                ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(status, &e.message)
        }
    }
}

/// What `POST /admin/users/NAME/ban` may carry; an empty body bans for
/// good with no reason.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Ban {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    duration_ms: Option<i64>,
}

/// Ban a registered user from the whole server: logins are refused while
/// it holds, and every connection of the user closes now, on every node.
async fn ban(
    _: Admin,
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(user) = UserName::parse(&name) else {
        return error(StatusCode::BAD_REQUEST, "not a valid user name");
    };
    let ban: Ban = if body.is_empty() {
        Ban::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(ban) => ban,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "expected {\"reason\": \"...\", \"duration_ms\": N}, both optional",
                )
            }
        }
    };
    let until_ts = match ban.duration_ms {
        None => None,
        Some(ms @ 1..=MAX_SANCTION_MS) => Some(now_ms() + ms),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "duration_ms is 1 to 315360000000 (ten years); leave it out for good",
            )
        }
    };
    if ban.reason.chars().count() > MAX_NOTICE_BYTES || ban.reason.chars().any(char::is_control) {
        return error(
            StatusCode::BAD_REQUEST,
            "the reason is one line of at most 4096 characters",
        );
    }
    let server_ban = ServerBan {
        reason: ban.reason,
        until_ts,
    };
    let user = match registered(&app, &user).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    if let Err(e) = app.chat.store().ban_user(&user, server_ban).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    }
    if let Err(e) = app.chat.disconnect(&user).await {
        // Stored: no login from now on; connections on other nodes close
        // when they next log in.
        tracing::warn!(error = %e, user = %user, "closing a banned user's connections");
    }
    tracing::info!(user = %user, until_ts, "an administrator banned a user from the server");
    Json(json!({ "user": user.as_str(), "until_ts": until_ts })).into_response()
}

async fn unban(_: Admin, State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let Ok(user) = UserName::parse(&name) else {
        return error(StatusCode::BAD_REQUEST, "not a valid user name");
    };
    let user = match registered(&app, &user).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    match app.chat.store().unban_user(&user).await {
        Ok(was_banned) => {
            tracing::info!(user = %user, was_banned, "an administrator lifted a server ban");
            Json(json!({ "user": user.as_str(), "was_banned": was_banned })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// A registered user's name as registered, or the response to give.
async fn registered(app: &App, user: &UserName) -> Result<UserName, Response> {
    match app.chat.store().user(user).await {
        Ok(Some(record)) => Ok(record.name),
        Ok(None) => Err(error(
            StatusCode::NOT_FOUND,
            &format!("no user named {user}"),
        )),
        Err(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Notice {
    text: String,
}

async fn notice(
    _: Admin,
    State(app): State<Arc<App>>,
    body: Result<Json<Notice>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(Notice { text })) = body else {
        return error(StatusCode::BAD_REQUEST, "expected {\"text\": \"...\"}");
    };
    if text.trim().is_empty() || text.len() > MAX_NOTICE_BYTES {
        return error(StatusCode::BAD_REQUEST, "the text has 1 to 4096 bytes");
    }
    let (users, _) = app.chat.counts();
    if let Err(e) = app.chat.notice(&text).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    }
    tracing::info!(users, "an administrator sent a notice");
    Json(json!({ "users": users })).into_response()
}
