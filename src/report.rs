//! What `s2s-proxy check` and `s2s-proxy token` print: plain text for a terminal.

use std::fmt::Write as _;
use std::time::Duration;

use std::sync::Arc;

use crate::config::{Config, Route};
use crate::token::{self, Claims, ProviderError, TokenError};
use crate::upstream;

use crate::civil_date::utc;

/// The route table printed by `check`, like `nginx -t` followed by a summary.
pub fn route_table(config: &Config) -> String {
    let header = [
        "PREFIX",
        "UPSTREAM",
        "CREDENTIAL",
        "SCOPE",
        "CLIENTS",
        "TIMEOUT",
    ];
    let rows: Vec<[String; 6]> = config
        .routes
        .iter()
        .map(|route| {
            let credential = config
                .credential(&route.credential)
                .map(|c| format!("{} ({})", c.name, c.kind.type_name()))
                .unwrap_or_else(|| route.credential.clone());
            [
                route.prefix.clone(),
                route.upstream.url.to_string(),
                credential,
                route.scope.clone().unwrap_or_else(|| "-".to_owned()),
                route.clients.join(", "),
                duration(route.timeout),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    let details: Vec<String> = config.routes.iter().filter_map(route_details).collect();
    if !details.is_empty() {
        out.push('\n');
        for detail in details {
            out.push_str(&detail);
            out.push('\n');
        }
    }
    let warnings: Vec<String> = config
        .routes
        .iter()
        .filter(|route| route.rewrite_links)
        .flat_map(|route| {
            crate::rewrite::link_base_warnings(&route.upstream.url)
                .into_iter()
                .map(move |warning| format!("warning: {}: {warning}", route.prefix))
        })
        .collect();
    if !warnings.is_empty() {
        out.push('\n');
        for warning in warnings {
            out.push_str(&warning);
            out.push('\n');
        }
    }
    if let Some(cluster) = &config.cluster {
        // The redacted URL: `check` output lands in CI logs.
        let _ = writeln!(
            out,
            "\nfleet mode: limits shared through {} (key prefix {}, {} per call)",
            cluster.redis,
            cluster.key_prefix,
            duration(cluster.timeout)
        );
    }
    let _ = writeln!(
        out,
        "\n{} route{}, {} credential{}, {} client{}; listening on {}",
        config.routes.len(),
        plural(config.routes.len()),
        config.credentials.len(),
        plural(config.credentials.len()),
        config.clients.len(),
        plural(config.clients.len()),
        config.server.listen
    );
    out
}

/// A route's Dynamics settings on one line, with what its preset expanded to; `None` for a
/// route that uses none of them.
fn route_details(route: &Route) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(preset) = route.preset {
        parts.push(format!(
            "{} preset: upstream {}, scope {}, timeout {}",
            preset.name(),
            route.upstream.url,
            route.scope.as_deref().unwrap_or("-"),
            duration(route.timeout)
        ));
    }
    if route.rewrite_links {
        parts.push("rewrite_links".to_owned());
    }
    if let Some(n) = route.max_concurrent {
        parts.push(format!("max_concurrent {n}"));
    }
    if let Some(n) = route.max_queue {
        parts.push(format!("max_queue {n}"));
    }
    if let Some(wait) = route.queue_timeout {
        parts.push(format!("queue_timeout {}", duration(wait)));
    }
    if let Some(rate) = route.upstream_rate_limit {
        parts.push(format!(
            "upstream_rate_limit {}/{}",
            rate.requests,
            duration(rate.per)
        ));
    }
    if let Some(retry) = route.retry_on_429 {
        parts.push(format!(
            "retry_on_429 {} attempt{} up to {}",
            retry.attempts,
            plural(retry.attempts as usize),
            duration(retry.max_wait)
        ));
    }
    (!parts.is_empty()).then(|| format!("{}  {}", route.prefix, parts.join(", ")))
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `9m`, `30s`, `1500ms`: the way durations are written in the YAML.
pub fn duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// What `token --route` prints, and whether a token was obtained. The raw token is
/// printed only when `raw` is set.
pub async fn token(config: &Config, prefix: &str, raw: bool) -> (String, bool) {
    let wanted = if prefix.ends_with('/') {
        prefix.to_owned()
    } else {
        format!("{prefix}/")
    };
    let Some(route) = config.route(&wanted) else {
        let known: Vec<&str> = config.routes.iter().map(|r| r.prefix.as_str()).collect();
        return (
            format!(
                "error: no route with prefix {prefix}; routes: {}\n",
                known.join(", ")
            ),
            false,
        );
    };
    let tls = match upstream::client_tls_for(config) {
        Ok(tls) => Arc::new(tls),
        Err(error) => return (format!("error: {error}\n"), false),
    };
    let mut out = String::new();
    let credential = config
        .credential(&route.credential)
        .map(|c| format!("{} ({})", c.name, c.kind.type_name()))
        .unwrap_or_else(|| route.credential.clone());
    let _ = writeln!(out, "route        {}", route.prefix);
    let _ = writeln!(out, "credential   {credential}");
    let _ = writeln!(
        out,
        "scope        {}",
        route.scope.as_deref().unwrap_or("(none sent)")
    );
    let fetched = match token::fetch_once(config, route, tls).await {
        Ok(fetched) => fetched,
        Err(error) => {
            out.push('\n');
            match error.cause() {
                TokenError::Provider(provider) => provider_failure(&mut out, provider),
                other => {
                    let _ = writeln!(out, "error: {other}");
                }
            }
            return (out, false);
        }
    };
    let _ = writeln!(out, "expires in   {} s", fetched.expires_in.as_secs());
    match &fetched.claims {
        None => {
            let _ = writeln!(
                out,
                "claims       (opaque token: not a JWT, nothing to decode)"
            );
        }
        Some(claims) => {
            let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(out, "aud          {}", claims.aud.join(", "));
            let _ = writeln!(out, "tid          {}", or_dash(&claims.tid));
            let _ = writeln!(out, "appid        {}", or_dash(&claims.appid));
            let _ = writeln!(
                out,
                "roles        {}",
                if claims.roles.is_empty() {
                    "-".to_owned()
                } else {
                    claims.roles.join(", ")
                }
            );
            let _ = writeln!(
                out,
                "exp          {}",
                claims.exp.map(utc).unwrap_or_else(|| "-".to_owned())
            );
            for warning in claim_warnings(claims, route) {
                let _ = writeln!(out, "warning: {warning}");
            }
        }
    }
    if raw {
        let _ = writeln!(out, "\n{}", fetched.access_token.expose());
    }
    (out, true)
}

/// A provider's refusal for the operator: everything parsed, the hint on its own line.
fn provider_failure(out: &mut String, provider: &ProviderError) {
    let mut line = format!("error: token endpoint answered HTTP {}", provider.status);
    if let Some(error) = &provider.error {
        let _ = write!(line, ": {error}");
    }
    if !provider.codes.is_empty() {
        let codes: Vec<String> = provider
            .codes
            .iter()
            .map(|c| format!("AADSTS{c}"))
            .collect();
        let _ = write!(line, " [{}]", codes.join(", "));
    }
    let _ = writeln!(out, "{line}");
    if let Some(description) = &provider.description {
        let _ = writeln!(out, "       {description}");
    }
    if let Some(hint) = provider.hint() {
        let _ = writeln!(out, "hint: {hint}");
    }
    for (name, value) in [
        ("trace_id", &provider.trace_id),
        ("correlation_id", &provider.correlation_id),
    ] {
        if let Some(value) = value {
            let _ = writeln!(out, "{name}: {value}");
        }
    }
}

/// What commonly goes wrong with app-only tokens for Dynamics, read from the claims.
fn claim_warnings(claims: &Claims, route: &Route) -> Vec<String> {
    let mut warnings = Vec::new();
    if claims.roles.is_empty() {
        warnings.push(
            "the token has no roles: grant the application permission (e.g. API.ReadWrite.All) \
             and give admin consent in the app registration"
                .to_owned(),
        );
    }
    let host = route.upstream.host.to_ascii_lowercase();
    let matches_host = claims.aud.iter().any(|aud| {
        let aud = aud.to_ascii_lowercase();
        let aud_host = aud
            .strip_prefix("https://")
            .or_else(|| aud.strip_prefix("http://"))
            .unwrap_or(&aud);
        let aud_host = aud_host.split(['/', ':']).next().unwrap_or_default();
        aud_host == host
    });
    if !claims.aud.is_empty() && !matches_host {
        warnings.push(format!(
            "aud ({}) does not name the upstream host {}: check the route's scope",
            claims.aud.join(", "),
            route.upstream.host
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_in_config_syntax() {
        assert_eq!(duration(Duration::from_secs(540)), "9m");
        assert_eq!(duration(Duration::from_secs(30)), "30s");
        assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn route_table_warns_about_link_bases_the_rewriter_cannot_see() {
        let yaml = r#"
credentials:
  bc:
    type: client_secret
    token_url: https://idp.example/token
    client_id: app
    client_secret: ${SECRET}
clients:
  erp:
    networks: [10.0.0.0/8]
routes:
  - prefix: /crm/
    upstream: https://10.1.2.3/api/data/v9.2/
    credential: bc
    clients: [erp]
    rewrite_links: true
  - prefix: /quiet/
    upstream: https://10.1.2.4/
    credential: bc
    clients: [erp]
"#;
        let source = crate::config::Source::inline(
            "proxy.yaml",
            [("SECRET".to_owned(), "s".to_owned())].into(),
        );
        let config = Config::from_yaml_str(yaml, &source).unwrap();
        let table = route_table(&config);
        assert!(
            table.contains("warning: /crm/: rewrite_links: the upstream is given as 10.1.2.3;"),
            "{table}"
        );
        assert!(!table.contains("warning: /quiet/"), "{table}");
    }

    #[test]
    fn route_table_shows_what_a_preset_expanded_to() {
        let yaml = r#"
credentials:
  bc:
    type: client_secret
    tenant_id: 72f988bf-86f1-41af-91ab-2d7cd011db47
    client_id: app
    client_secret: ${SECRET}
clients:
  erp:
    networks: [10.0.0.0/8]
routes:
  - prefix: /bc/
    upstream: { businesscentral: { tenant: 72f988bf-86f1-41af-91ab-2d7cd011db47, environment: Sandbox } }
    credential: bc
    clients: [erp]
  - prefix: /plain/
    upstream: https://example.com/
    credential: bc
    clients: [erp]
"#;
        let source = crate::config::Source::inline(
            "proxy.yaml",
            [("SECRET".to_owned(), "s".to_owned())].into(),
        );
        let config = Config::from_yaml_str(yaml, &source).unwrap();
        let table = route_table(&config);
        assert!(
            table.contains(
                "/bc/  businesscentral preset: upstream https://api.businesscentral.dynamics.com\
                 /v2.0/72f988bf-86f1-41af-91ab-2d7cd011db47/Sandbox/, scope \
                 https://api.businesscentral.dynamics.com/.default, timeout 9m, rewrite_links, \
                 max_concurrent 5, max_queue 95, queue_timeout 1m, retry_on_429 3 attempts up \
                 to 30s\n"
            ),
            "{table}"
        );
        let details = table.split("\n\n").nth(1).unwrap_or_default();
        assert!(
            details.starts_with("/bc/") && !details.contains("/plain/"),
            "{table}"
        );
    }
}
