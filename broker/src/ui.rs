//! The browser UI, embedded in the binary from `iframe-ui/` at compile time and served at `/`.

use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

/// The files of `iframe-ui/`: (path under `/ui/`, content type, bytes).
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("../../iframe-ui/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("../../iframe-ui/app.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("../../iframe-ui/style.css")),
    ("connection.js", "text/javascript; charset=utf-8", include_str!("../../iframe-ui/connection.js")),
    ("ansi.js", "text/javascript; charset=utf-8", include_str!("../../iframe-ui/ansi.js")),
    ("logview.js", "text/javascript; charset=utf-8", include_str!("../../iframe-ui/logview.js")),
    ("demo.html", "text/html; charset=utf-8", include_str!("../../iframe-ui/demo.html")),
    ("metaframe.js", "text/javascript; charset=utf-8", include_str!("../../iframe-ui/metaframe.js")),
    ("hashparams.js", "text/javascript; charset=utf-8", include_str!("../../iframe-ui/hashparams.js")),
    ("metaframe.json", "application/json", include_str!("../../iframe-ui/metaframe.json")),
];

fn file(name: &str) -> Option<warp::reply::Response> {
    FILES.iter().find(|(n, _, _)| *n == name).map(|(_, mime, body)| {
        let mut r = warp::reply::with_status(*body, StatusCode::OK).into_response();
        r.headers_mut().insert("content-type", warp::http::HeaderValue::from_static(mime));
        r
    })
}

/// `GET /metaframe.json` (and `/ui/metaframe.json`): the page described for metapage hosts, which
/// fetch it from another origin before loading the frame, so any origin may read it.
fn metaframe_json() -> warp::reply::Response {
    let mut r = file("metaframe.json").expect("metaframe.json is embedded");
    r.headers_mut().insert("access-control-allow-origin", warp::http::HeaderValue::from_static("*"));
    r
}

/// `GET /`, `GET /metaframe.json` and `GET /ui/{file}`.
pub fn routes() -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let index = warp::path::end().and(warp::get()).map(|| file("index.html").expect("index.html is embedded"));
    let described = warp::path!("metaframe.json")
        .or(warp::path!("ui" / "metaframe.json"))
        .unify()
        .and(warp::get())
        .map(metaframe_json);
    let asset = warp::path!("ui" / String)
        .and(warp::get())
        .and_then(|name: String| async move { file(&name).ok_or_else(warp::reject::not_found) });
    index.or(described).unify().or(asset).unify()
}
