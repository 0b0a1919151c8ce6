//! The embedded web UI: files under `web/` served at `/ui/`, with `/` redirecting there. Unknown
//! paths under `/ui/` get `index.html`, so the UI's own routes survive a reload.

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use rust_embed::RustEmbed;

use super::Ctx;

#[derive(RustEmbed)]
#[folder = "web/"]
struct Assets;

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui/", get(|| async { asset("index.html") }))
        .route("/ui/{*path}", get(|Path(p): Path<String>| async move { asset(&p) }))
}

fn asset(path: &str) -> Response {
    let (name, file) = match Assets::get(path) {
        Some(f) => (path, f),
        None if !path.contains('.') => match Assets::get("index.html") {
            Some(f) => ("index.html", f),
            None => {
                return (StatusCode::NOT_FOUND, "UI not built into this binary").into_response();
            }
        },
        None => return (StatusCode::NOT_FOUND, "404 page not found").into_response(),
    };
    let _ = name;
    ([(header::CONTENT_TYPE, file.metadata.mimetype().to_string()), (header::CACHE_CONTROL, "no-cache".to_string())], file.data.into_owned())
        .into_response()
}
