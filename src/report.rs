//! What `s2s-proxy check` and `s2s-proxy token` print: plain text for a terminal.

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::Config;

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

/// What `token --route` prints, and whether a token was obtained. Completed once the
/// token module lands.
pub async fn token(config: &Config, prefix: &str, _raw: bool) -> (String, bool) {
    let _ = config;
    (format!("{prefix}: not available yet\n"), false)
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
}
