//! The web client, embedded in the binary: `/` and its three files. No
//! build step, no CDN. The sources are in `web/` at the top of the
//! repository; `web/confab.js` is also the client module for other pages.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../../../web/index.html");
const APP_JS: &str = include_str!("../../../web/app.js");
const CLIENT_JS: &str = include_str!("../../../web/confab.js");
const APP_CSS: &str = include_str!("../../../web/app.css");

fn file(kind: &'static str, body: &'static str) -> impl IntoResponse {
    // no-cache: revalidate, so an upgraded server never serves a stale app.
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { file("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { file("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/confab.js",
            get(|| async { file("text/javascript; charset=utf-8", CLIENT_JS) }),
        )
        .route(
            "/app.css",
            get(|| async { file("text/css; charset=utf-8", APP_CSS) }),
        )
}
