//! The operator's status page on the admin listener (docs/operations.md "Admin
//! endpoints"): `GET /` (HTML), `GET /status.json` (the same data) and `POST
//! /status/test` (the `doctor` checks of one route), behind `admin.auth`.
//!
//! Everything shown comes from the running configuration's names (prefixes, hosts,
//! credential names), the token cache's state and public error messages, the metrics'
//! recent windows and errors (status, error code, request id): never a secret, a token, a
//! path or a query string. The page is rendered here, every value HTML-escaped; its one
//! inline style and script are allowed by their SHA-256 hashes in a `Content-Security-Policy`
//! whose default is `'none'` (W3C CSP Level 3 §6.7.3.4), so nothing else can run or load.
//! The test endpoint takes only `Content-Type: application/json`, which a cross-site HTML
//! form cannot send (Fetch standard, "CORS-safelisted request-header"), and answers 415
//! otherwise. `/?test=<prefix>` runs that route's test on load as its Test button does.
//!
//! Not here: the listener and routing of admin requests (`admin`), the checks (`doctor`).

use std::sync::LazyLock;
use std::time::SystemTime;

use base64::Engine as _;
use http::HeaderMap;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::config::AdminAuth;
use crate::reload::Runtime;
use crate::secret::SecretDigest;
use crate::token::{EXPIRY_WARNING, SlotStatus};

/// Longest body `POST /status/test` reads.
pub(super) const MAX_TEST_BODY: usize = 4096;

/// The `WWW-Authenticate` challenge of the protected endpoints (RFC 7617 §2).
pub(super) const CHALLENGE: &str = "Basic realm=\"s2s-proxy admin\", charset=\"UTF-8\"";

/// Whether the request may see the status page: always when `admin.auth` is not set
/// (validation allows that only on loopback), else when it carries the configured Basic
/// credentials or API key (compared as SHA-256 digests in constant time).
pub(super) fn authorized(
    auth: Option<&AdminAuth>,
    headers: &HeaderMap,
    api_key_header: &http::HeaderName,
) -> bool {
    let Some(auth) = auth else {
        return true;
    };
    if let Some((username, password)) = &auth.basic
        && let Some(value) = headers.get(http::header::AUTHORIZATION)
        && let Some(Ok((user, given))) = crate::inbound::basic::parse(value.as_bytes())
    {
        let user_ok =
            SecretDigest::of(user.as_bytes()).matches(&SecretDigest::of(username.as_bytes()));
        let password_ok = password.matches(&SecretDigest::of(given.as_bytes()));
        if user_ok & password_ok {
            return true;
        }
    }
    if let Some(key) = &auth.api_key
        && let Some(value) = headers.get(api_key_header)
    {
        return key.matches(&SecretDigest::of(value.as_bytes()));
    }
    false
}

/// `valid`: a token may be injected now; `renewing`: one is held and a renewal is under
/// way; `failed`: none, and the last fetch failed; `pending`: none yet.
fn token_state(slot: &SlotStatus) -> &'static str {
    match (slot.has_valid_token, slot.fetching, &slot.last_error) {
        (true, true, _) => "renewing",
        (true, false, _) => "valid",
        (false, _, Some(_)) => "failed",
        (false, _, None) => "pending",
    }
}

/// The data of the status page.
pub(super) fn status(runtime: &Runtime) -> Value {
    let generation = runtime.current();
    let config = &generation.config;
    let slots = generation.tokens.status();
    let pipeline = runtime.pipelines.load();
    let queued: Vec<(String, usize)> = pipeline
        .queue_depths()
        .map(|(route, depth)| (route.to_owned(), depth))
        .collect();
    let routes: Vec<Value> = config
        .routes
        .iter()
        .map(|route| {
            let slot = slots
                .iter()
                .find(|s| s.credential == route.credential && s.scope == route.scope);
            let token = match slot {
                Some(slot) => json!({
                    "state": token_state(slot),
                    "expires_in_seconds": slot.expires_in.map(|d| d.as_secs()),
                    "renews_in_seconds": slot.renews_in.map(|d| d.as_secs()),
                    "last_error": slot.last_error,
                    "permanent": slot.last_error_permanent,
                }),
                None => json!({
                    "state": "pending",
                    "expires_in_seconds": null,
                    "renews_in_seconds": null,
                    "last_error": null,
                    "permanent": false,
                }),
            };
            let (requests, errors) = runtime.metrics.recent_traffic(&route.prefix);
            json!({
                "prefix": route.prefix,
                "upstream_host": route.upstream.host,
                "credential": route.credential,
                "scope": route.scope,
                "token": token,
                "in_flight": runtime.metrics.in_flight_now(&route.prefix).max(0),
                "queued": queued.iter().find(|(p, _)| *p == route.prefix).map_or(0, |(_, d)| *d),
                "max_concurrent": route.max_concurrent,
                "requests_5m": requests,
                "errors_5m": errors,
            })
        })
        .collect();
    let now = SystemTime::now();
    let credentials: Vec<Value> = generation
        .credential_expiries
        .iter()
        .map(|expiry| {
            let warning = if expiry.expires <= now {
                Some("expired")
            } else if expiry.expires <= now + EXPIRY_WARNING {
                Some("expires within 30 days")
            } else {
                None
            };
            json!({
                "credential": expiry.credential,
                "entry": expiry.entry,
                "expires": crate::civil_date::utc_at(expiry.expires),
                "expires_in_days": expiry.expires.duration_since(now).map_or(0, |d| d.as_secs() / 86_400),
                "warning": warning,
            })
        })
        .collect();
    // Version and `exp` of each secret-store value in use; never the value.
    let secret_stores: Vec<Value> = config
        .secret_stores
        .values
        .0
        .iter()
        .map(|((store, name), stored)| {
            json!({
                "store": store,
                "secret": name,
                "version": stored.version,
                "expires": stored.expires.map(crate::civil_date::utc_at),
            })
        })
        .collect();
    let recent_errors: Vec<Value> = runtime
        .metrics
        .recent_errors()
        .iter()
        .rev()
        .map(|e| {
            json!({
                "time": crate::civil_date::utc_at(e.at),
                "route": e.route,
                "status": e.status,
                "error": e.error,
                "request_id": e.request_id,
            })
        })
        .collect();
    let last_reload = runtime
        .metrics
        .last_reload()
        .map(|(at, outcome)| json!({ "time": crate::civil_date::utc_at(at), "outcome": outcome }));
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": runtime.metrics.uptime().as_secs(),
        "draining": runtime.is_draining(),
        "config": {
            "file": runtime.config_path().map(|p| p.display().to_string()),
            "last_reload": last_reload,
            "routes": config.routes.len(),
            "credentials": config.credentials.len(),
            "clients": config.clients.len(),
        },
        "routes": routes,
        "credentials": credentials,
        "secret_stores": secret_stores,
        "recent_errors": recent_errors,
    })
}

/// Answers `POST /status/test`: `{"route": "/bc/"}` → the route's check steps. `None`:
/// the body names no configured route.
pub(super) async fn test(runtime: &Runtime, body: &[u8]) -> Option<Value> {
    let prefix = serde_json::from_slice::<Value>(body)
        .ok()?
        .get("route")?
        .as_str()?
        .to_owned();
    let generation = runtime.current();
    let route = generation
        .config
        .routes
        .iter()
        .find(|r| r.prefix == prefix)?;
    let (steps, hint) = crate::doctor::test_route(&generation.config, route).await;
    let ok = steps.iter().all(|s| s.ok);
    let steps: Vec<Value> = steps
        .iter()
        .map(|s| json!({ "name": s.name, "ok": s.ok, "ms": s.ms, "detail": s.detail }))
        .collect();
    Some(json!({ "route": prefix, "ok": ok, "steps": steps, "hint": hint }))
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;max-width:70em;padding:.5em}\
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ccc;padding:.3em;text-align:left;vertical-align:top}\
.valid{color:#060}.renewing{color:#660}.failed,.bad{color:#a00;font-weight:bold}.pending{color:#666}\
.wrap{overflow-x:auto}small{color:#555}pre{white-space:pre-wrap}";

/// The page's script: reloads every 15 s until a test runs; `run` posts one route's test
/// and shows its steps. The Test buttons and the deep link `/?test=<prefix>` both call
/// `run`; the deep link's value is only compared with the buttons' `data-route` (so only a
/// configured prefix runs) and never written into the page.
const SCRIPT: &str = "var t=setTimeout(function(){location.reload()},15000);\
function run(b){clearTimeout(t);var o=document.getElementById('test-'+b.dataset.index);o.textContent='testing\\u2026';\
fetch('status/test',{method:'POST',headers:{'Content-Type':'application/json'},credentials:'same-origin',\
body:JSON.stringify({route:b.dataset.route})}).then(function(r){return r.json()}).then(function(j){\
var lines=j.steps.map(function(s){return (s.ok?'ok   ':'FAIL ')+s.name+' ('+s.ms+' ms): '+s.detail});\
if(j.hint)lines.push('hint: '+j.hint);o.textContent=(j.ok?'PASS\\n':'FAIL\\n')+lines.join('\\n')})\
.catch(function(e){o.textContent='test failed: '+e})}\
var bs=document.querySelectorAll('button[data-route]');\
bs.forEach(function(b){b.addEventListener('click',function(){run(b)})});\
var q=new URLSearchParams(location.search).get('test');\
bs.forEach(function(b){if(q!==null&&b.dataset.route===q)run(b)});";

fn hash(text: &str) -> String {
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
    )
}

/// The page's `Content-Security-Policy`: nothing but its own inline style and script, and
/// `fetch` to itself.
pub(super) static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(SCRIPT),
        hash(STYLE)
    )
});

/// Escapes text for HTML element content and quoted attribute values.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "–".to_owned(),
        Value::String(s) => escape(s),
        other => escape(&other.to_string()),
    }
}

fn countdown(value: &Value) -> String {
    match value.as_u64() {
        Some(s) => format!("{}m {:02}s", s / 60, s % 60),
        None => "–".to_owned(),
    }
}

/// `GET /`: the status page, from [`status`].
pub(super) fn page(status: &Value) -> String {
    use std::fmt::Write as _;
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>s2s-proxy status</title><style>{STYLE}</style></head><body>\
         <h1>s2s-proxy {}</h1><p>up {} s · config <code>{}</code> · last reload {}{}</p>",
        text(&status["version"]),
        text(&status["uptime_seconds"]),
        text(&status["config"]["file"]),
        text(&status["config"]["last_reload"]["outcome"]),
        match status["config"]["last_reload"]["time"].as_str() {
            Some(time) => format!(" at {}", escape(time)),
            None => String::new(),
        },
    );
    html.push_str(
        "<h2>Routes</h2><div class=\"wrap\"><table><tr><th>route</th><th>token</th>\
         <th>last 5 min</th><th>now</th><th></th></tr>",
    );
    for (index, route) in status["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let token = &route["token"];
        let state = token["state"].as_str().unwrap_or("pending");
        let mut error = String::new();
        if let Some(message) = token["last_error"].as_str() {
            let _ = write!(error, "<br><span class=\"bad\">{}</span>", escape(message));
        }
        let _ = write!(
            html,
            "<tr><td><b>{}</b><br><small>{} · credential {}</small></td>\
             <td><span class=\"{state}\">{state}</span><br><small>expires in {} · renews in {}</small>{error}</td>\
             <td>{} requests<br>{} errors</td><td>{} in flight<br>{} queued</td>\
             <td><button type=\"button\" data-route=\"{}\" data-index=\"{index}\">Test</button></td></tr>\
             <tr><td colspan=\"5\"><pre id=\"test-{index}\"></pre></td></tr>",
            text(&route["prefix"]),
            text(&route["upstream_host"]),
            text(&route["credential"]),
            countdown(&token["expires_in_seconds"]),
            countdown(&token["renews_in_seconds"]),
            text(&route["requests_5m"]),
            text(&route["errors_5m"]),
            text(&route["in_flight"]),
            text(&route["queued"]),
            text(&route["prefix"]),
        );
    }
    html.push_str("</table></div><h2>Credential expiry</h2><div class=\"wrap\"><table>");
    let credentials = status["credentials"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if credentials.is_empty() {
        html.push_str(
            "<tr><td><small>No certificate and no secret with an <code>expires</code> date \
             is configured.</small></td></tr>",
        );
    }
    for credential in credentials {
        let warning = match credential["warning"].as_str() {
            Some(w) => format!("<span class=\"bad\">{}</span>", escape(w)),
            None => "ok".to_owned(),
        };
        let _ = write!(
            html,
            "<tr><td>{} <small>{}</small></td><td>{}</td><td>{warning}</td></tr>",
            text(&credential["credential"]),
            text(&credential["entry"]),
            text(&credential["expires"]),
        );
    }
    let stored = status["secret_stores"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if !stored.is_empty() {
        html.push_str(
            "</table></div><h2>Secret stores</h2><div class=\"wrap\"><table>\
             <tr><th>secret</th><th>version</th><th>expires</th></tr>",
        );
    }
    for secret in stored {
        let _ = write!(
            html,
            "<tr><td>{}/{}</td><td><code>{}</code></td><td>{}</td></tr>",
            text(&secret["store"]),
            text(&secret["secret"]),
            text(&secret["version"]),
            text(&secret["expires"]),
        );
    }
    html.push_str(
        "</table></div><h2>Recent errors</h2><div class=\"wrap\"><table>\
         <tr><th>time</th><th>route</th><th>status</th><th>error</th><th>request id</th></tr>",
    );
    for error in status["recent_errors"].as_array().into_iter().flatten() {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            text(&error["time"]),
            text(&error["route"]),
            text(&error["status"]),
            text(&error["error"]),
            text(&error["request_id"]),
        );
    }
    let _ = writeln!(
        html,
        "</table></div><p><small>Refreshes every 15 s. <a href=\"status.json\">status.json</a></small></p>\
         <script>{SCRIPT}</script></body></html>"
    );
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>"a" & 'b'</script>"#),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
        let status = json!({
            "version": "<em>",
            "config": { "file": "\"><img src=x>" },
            "routes": [{ "prefix": "/a'<x>/", "token": { "last_error": "<i>e</i>" } }],
            "credentials": [], "recent_errors": [{ "request_id": "<svg onload=1>" }],
        });
        let html = page(&status);
        for raw in ["<em>", "<img", "<x>", "<i>", "<svg"] {
            assert!(!html.contains(raw), "{raw} unescaped in {html}");
        }
    }

    #[test]
    fn the_csp_allows_exactly_the_inline_style_and_script() {
        assert!(CSP.starts_with("default-src 'none';"));
        assert!(CSP.contains(&hash(SCRIPT)) && CSP.contains(&hash(STYLE)));
        assert!(!CSP.contains("unsafe"));
    }
}
