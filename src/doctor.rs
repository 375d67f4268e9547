//! `s2s-proxy doctor`: for every route, fetch a token and make one cheap authenticated call
//! to the upstream, then explain each failure in one line.
//!
//! The call is `doctor_path` when the route sets it, else derived from the service:
//! Business Central `api/v2.0/companies`, Dataverse `WhoAmI`, Finance & Operations
//! `data/$metadata`, anything else the upstream base URL itself. Explanations follow
//! docs/troubleshooting.md "By upstream status": in BC a 401
//! `Authentication_InvalidCredentials` means the app is not enabled on the "Microsoft Entra
//! Applications" page or the URL names another tenant; a 403 means missing permission sets.
//! It also lists the secrets read from secret stores with their version and `exp`.
//! Never prints a token or a secret. The status page's Test button runs the same steps
//! for one route ([`test_route`]).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::{Config, Route};
use crate::token::{self, TokenError, TokenHttp};
use crate::upstream;

/// The service behind a route, guessed from its upstream URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    BusinessCentral,
    Dataverse,
    FinanceOperations,
    Other,
}

pub(crate) fn service(route: &Route) -> Service {
    let host = route.upstream.host.to_ascii_lowercase();
    if host.ends_with("businesscentral.dynamics.com") {
        Service::BusinessCentral
    } else if host.contains(".operations.") {
        Service::FinanceOperations
    } else if route.upstream.base_path.contains("/api/data/")
        || (host.ends_with(".dynamics.com") && host.contains(".crm"))
    {
        Service::Dataverse
    } else {
        Service::Other
    }
}

/// What `doctor` requests for `route`, relative to its upstream base.
pub(crate) fn check_path(route: &Route) -> String {
    if let Some(path) = &route.doctor_path {
        return path.clone();
    }
    let base = route.upstream.base_path.to_ascii_lowercase();
    match service(route) {
        Service::BusinessCentral if base.ends_with("/api/v2.0/") => "companies".to_owned(),
        Service::BusinessCentral if base.ends_with("/odatav4/") => "Company".to_owned(),
        Service::BusinessCentral => "api/v2.0/companies".to_owned(),
        Service::Dataverse if base.contains("/api/data/") => "WhoAmI".to_owned(),
        Service::Dataverse => "api/data/v9.2/WhoAmI".to_owned(),
        Service::FinanceOperations if base.ends_with("/data/") => "$metadata".to_owned(),
        Service::FinanceOperations => "data/$metadata".to_owned(),
        Service::Other => String::new(),
    }
}

/// One line explaining an upstream answer to the doctor's call.
pub(crate) fn explain_upstream(route: &Route, status: u16, body: &str) -> String {
    let service = service(route);
    match (status, service) {
        (200..=299, _) => "ok".to_owned(),
        (401, Service::BusinessCentral) if body.contains("Authentication_InvalidCredentials") => {
            "BC refused the token (Authentication_InvalidCredentials): enable the app (State = \
             Enabled) on BC's \"Microsoft Entra Applications\" page, and check that the tenant \
             in the upstream URL is the app's tenant"
                .to_owned()
        }
        (401, Service::BusinessCentral) => {
            "BC refused the token: check the scope is https://api.businesscentral.dynamics.com/.default \
             and the app is enabled on BC's \"Microsoft Entra Applications\" page"
                .to_owned()
        }
        (403, Service::BusinessCentral) => {
            "BC accepted the token but denies access: assign permission sets (e.g. D365 \
             AUTOMATION) to the app on the \"Microsoft Entra Applications\" page"
                .to_owned()
        }
        (401, Service::Dataverse) => {
            "Dataverse refused the token: create an application user for this app in the \
             environment (Power Platform admin center → Application users) and check the scope"
                .to_owned()
        }
        (403, Service::Dataverse) => {
            "Dataverse accepted the token but denies access: give the application user a \
             security role"
                .to_owned()
        }
        (401, Service::FinanceOperations) => {
            "F&O refused the token: register the client id under System administration > Setup \
             > Microsoft Entra applications, and check the scope is the environment URL"
                .to_owned()
        }
        (403, Service::FinanceOperations) => {
            "F&O accepted the token but denies access: give the user mapped to the app the \
             needed roles"
                .to_owned()
        }
        (401, Service::Other) => {
            "the upstream refused the token: check the route's scope (audience) and that the \
             API knows this client"
                .to_owned()
        }
        (403, Service::Other) => {
            "the upstream accepted the token but denies access: grant the client the needed \
             permission"
                .to_owned()
        }
        (404, _) => "not found (HTTP 404): check the upstream URL (environment name, path) or \
                     set doctor_path on the route"
            .to_owned(),
        (429 | 503, _) => format!("the upstream is throttling or unavailable (HTTP {status}); try again later"),
        _ => format!("the upstream answered HTTP {status}"),
    }
}

/// Runs the checks; returns the report and whether every route passed.
pub async fn run(config: &Config) -> (String, bool) {
    let mut out = String::new();
    let tls = match upstream::client_tls_for(config) {
        Ok(tls) => Arc::new(tls),
        Err(error) => return (format!("error: {error}\n"), false),
    };
    let http = match TokenHttp::new(&tls) {
        Ok(http) => http,
        Err(error) => return (format!("error: {error}\n"), false),
    };
    let width = config
        .routes
        .iter()
        .map(|r| r.prefix.len())
        .max()
        .unwrap_or(0);
    let mut all_ok = true;
    for route in &config.routes {
        let (ok, line) = check_route(config, route, &tls, &http).await;
        all_ok &= ok;
        let _ = writeln!(
            out,
            "{:<width$}  {}  {line}",
            route.prefix,
            if ok { "ok  " } else { "FAIL" }
        );
    }
    let now = SystemTime::now();
    // The secret-store values this configuration was loaded with: version and `exp`.
    for ((store, name), stored) in &config.secret_stores.values.0 {
        let expires = stored.expires.map_or_else(
            || "no expiry date".to_owned(),
            |at| format!("expires {}", crate::civil_date::utc_at(at)),
        );
        let _ = writeln!(
            out,
            "secret {store}/{name}: version {}, {expires}",
            stored.version
        );
    }
    for expiry in token::credential_expiries(config) {
        let note = if expiry.expires <= now {
            "EXPIRED"
        } else if expiry.expires <= now + token::EXPIRY_WARNING {
            "expires within 30 days"
        } else {
            "expires"
        };
        let _ = writeln!(
            out,
            "credential {} {}: {note} {}",
            expiry.credential,
            expiry.entry,
            crate::civil_date::utc_at(expiry.expires)
        );
    }
    (out, all_ok)
}

/// One step of a route check, as the status page's Test button shows it.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) name: &'static str,
    pub(crate) ok: bool,
    pub(crate) ms: u64,
    /// What happened, in one line; never a token or secret.
    pub(crate) detail: String,
}

/// The checks of one route: `token`, then (if a token came) `upstream`; and the hint for
/// the first failure (an AADSTS explanation, or what an upstream status means).
pub(crate) async fn route_steps(
    config: &Config,
    route: &Route,
    tls: &Arc<rustls::ClientConfig>,
    http: &TokenHttp,
) -> (Vec<Step>, Option<String>) {
    let started = tokio::time::Instant::now();
    let ms = |since: tokio::time::Instant| since.elapsed().as_millis() as u64;
    let fetched = match token::fetch_once(config, route, Arc::clone(tls)).await {
        Ok(fetched) => fetched,
        Err(error) => {
            let (text, hint) = match error.cause() {
                TokenError::Provider(provider) => {
                    (error.public_message(), provider.hint().map(str::to_owned))
                }
                other => (other.to_string(), None),
            };
            let step = Step {
                name: "token",
                ok: false,
                ms: ms(started),
                detail: format!("token ({}): {text}", route.credential),
            };
            return (vec![step], hint);
        }
    };
    let token_step = Step {
        name: "token",
        ok: true,
        ms: ms(started),
        detail: format!("token ({}): ok", route.credential),
    };
    let started = tokio::time::Instant::now();
    let (ok, detail, hint) = upstream_call(route, http, &fetched).await;
    let upstream_step = Step {
        name: "upstream",
        ok,
        ms: ms(started),
        detail,
    };
    (vec![token_step, upstream_step], hint)
}

/// `route_steps` with a TLS configuration and HTTP client of its own, as `doctor` builds
/// them; for the status page's Test button.
pub(crate) async fn test_route(config: &Config, route: &Route) -> (Vec<Step>, Option<String>) {
    let failed = |detail: String| {
        let step = Step {
            name: "token",
            ok: false,
            ms: 0,
            detail,
        };
        (vec![step], None)
    };
    let tls = match upstream::client_tls_config(config.server.upstream_ca_file.as_deref()) {
        Ok(tls) => Arc::new(tls),
        Err(error) => return failed(error.to_string()),
    };
    let http = match TokenHttp::new(&tls) {
        Ok(http) => http,
        Err(error) => return failed(error.to_string()),
    };
    route_steps(config, route, &tls, &http).await
}

async fn check_route(
    config: &Config,
    route: &Route,
    tls: &Arc<rustls::ClientConfig>,
    http: &TokenHttp,
) -> (bool, String) {
    let (steps, _) = route_steps(config, route, tls, http).await;
    let ok = steps.iter().all(|s| s.ok);
    let line = steps.last().map(|s| s.detail.clone()).unwrap_or_default();
    (ok, line)
}

/// The upstream step: whether it passed, its line and, on failure, the explanation.
async fn upstream_call(
    route: &Route,
    http: &TokenHttp,
    fetched: &token::FetchedToken,
) -> (bool, String, Option<String>) {
    let path = check_path(route);
    let url = format!("{}{path}", route.upstream.url);
    let Ok(parsed) = reqwest::Url::parse(&url) else {
        return (false, format!("GET {path}: not a valid URL"), None);
    };
    let Ok(mut bearer) =
        http::HeaderValue::from_str(&format!("Bearer {}", fetched.access_token.expose()))
    else {
        return (
            false,
            "the token cannot be sent in a header".to_owned(),
            None,
        );
    };
    bearer.set_sensitive(true);
    let request = http
        .client()
        .get(parsed.clone())
        .header(http::header::AUTHORIZATION, bearer)
        .header(http::header::ACCEPT, "application/json");
    let shown = if path.is_empty() { "/" } else { &path };
    match http.send_upstream(request, &parsed).await {
        Ok(response) => {
            let status = response.status.as_u16();
            let body = String::from_utf8_lossy(&response.body);
            let explanation = explain_upstream(route, status, &body);
            let mut line = format!("GET {shown} → {status}: {explanation}");
            if !response.status.is_success()
                && let Some(tid) = fetched.claims.as_ref().and_then(|c| c.tid.as_deref())
                && route.upstream.base_path.contains('-')
                && !route
                    .upstream
                    .base_path
                    .to_ascii_lowercase()
                    .contains(&tid.to_ascii_lowercase())
                && service(route) == Service::BusinessCentral
            {
                let _ = write!(
                    line,
                    " (the token's tenant {tid} is not the one in the URL)"
                );
            }
            let ok = response.status.is_success();
            (ok, line, (!ok).then_some(explanation))
        }
        Err(TokenError::Redirect { status }) => (
            false,
            format!("GET {shown} → {status}: the upstream redirects; check the upstream URL"),
            None,
        ),
        // The token was fetched; what failed here is the upstream call, and the line
        // says so (the transport's errors are worded for token requests).
        Err(TokenError::Network(reason)) => (
            false,
            format!("GET {shown}: cannot reach the upstream: {reason}"),
            None,
        ),
        Err(TokenError::Timeout(after)) => (
            false,
            format!(
                "GET {shown}: the upstream did not answer within {}s",
                after.as_secs()
            ),
            None,
        ),
        Err(error) => (false, format!("GET {shown}: {}", error.cause()), None),
    }
}

#[cfg(test)]
mod tests;
