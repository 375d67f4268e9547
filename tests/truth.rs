//! What the binary does is what the README and docs/ say: `check` refuses what `run` refuses and
//! shows what `run` warns about, `doctor` names the step that failed, the documented
//! command-line behaviour, examples and metrics hold, and every answer the proxy makes
//! carries an `X-Request-Id`.

mod support;

#[path = "support/cli.rs"]
#[allow(dead_code)]
mod cli;

use std::time::Duration;

use cli::{TempDir, command, free_port, run_to_end};
use support::*;

/// A certificate for `localhost` and its key, PEM.
fn server_pair() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A config that is valid apart from what `server` adds; nothing in it is ever contacted.
fn minimal_yaml(server: &str) -> String {
    format!(
        "server:\n  listen: 127.0.0.1:0\n{server}\
         credentials:\n  app:\n    type: client_secret\n    token_url: http://127.0.0.1:9/token\n    \
         client_id: app\n    client_secret: ${{TRUTH_SECRET}}\n\
         clients:\n  c:\n    networks: [10.0.0.0/8]\n\
         routes:\n  - prefix: /r/\n    upstream: http://127.0.0.1:9/api/\n    credential: app\n    \
         scope: x/.default\n    clients: [c]\n"
    )
}

// ---------------------------------------------------------------------------------------
// check and run agree
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn check_and_run_both_refuse_a_tls_key_that_does_not_match_the_certificate() {
    let dir = TempDir::new("truth-tls-mismatch");
    let (cert, _) = server_pair();
    let (_, other_key) = server_pair();
    dir.write("tls.crt", &cert);
    dir.write("tls.key", &other_key);
    let path = dir.write(
        "proxy.yaml",
        &minimal_yaml("  tls:\n    cert_file: tls.crt\n    key_file: tls.key\n"),
    );
    for subcommand in ["check", "run"] {
        let mut cmd = command([subcommand, "--config"]);
        cmd.arg(&path).env("TRUTH_SECRET", "s3cret");
        let out = run_to_end(cmd, None).await;
        assert_eq!(out.code, Some(1), "{subcommand}: {out:?}");
        let problem = out
            .stderr
            .lines()
            .find(|line| line.contains("server.tls.key_file"))
            .unwrap_or_else(|| panic!("{subcommand}: no server.tls.key_file problem: {out:?}"));
        assert!(problem.contains("does not belong to"), "{problem}");
        assert!(!out.all().contains("PRIVATE KEY"), "{out:?}");
        assert!(!out.stdout.contains("configuration OK"), "{out:?}");
    }
}

#[tokio::test]
async fn check_refuses_an_upstream_ca_file_that_run_cannot_read() {
    let dir = TempDir::new("truth-upstream-ca");
    dir.write("ca.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n");
    let path = dir.write("proxy.yaml", &minimal_yaml("  upstream_ca_file: ca.pem\n"));
    let mut cmd = command(["check", "--config"]);
    cmd.arg(&path).env("TRUTH_SECRET", "s3cret");
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .lines()
            .any(|line| line.contains("server.upstream_ca_file") && line.contains("ca.pem")),
        "{out:?}"
    );
}

#[tokio::test]
async fn relative_certificate_paths_resolve_against_the_config_directory() {
    let dir = TempDir::new("truth-relative");
    let elsewhere = TempDir::new("truth-cwd");
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    let (cert, key) = server_pair();
    dir.write("tls/server.crt", &cert);
    dir.write("tls/server.key", &key);
    dir.write("tls/clients-ca.pem", &cert);
    // A client certificate credential (ES256: a generic token endpoint takes EC keys),
    // certificate and key in one PEM file.
    let (client_pem, client_key) = server_pair();
    dir.write("tls/app.pem", &format!("{client_pem}{client_key}"));
    let yaml = "server:\n  listen: 127.0.0.1:0\n  tls:\n    cert_file: tls/server.crt\n    \
         key_file: tls/server.key\n    client_ca_file: tls/clients-ca.pem\n\
         credentials:\n  app:\n    type: client_certificate\n    token_url: http://127.0.0.1:9/token\n    \
         client_id: app\n    certificate_file: tls/app.pem\n    assertion_alg: ES256\n\
         clients:\n  c:\n    networks: [10.0.0.0/8]\n\
         routes:\n  - prefix: /r/\n    upstream: http://127.0.0.1:9/api/\n    credential: app\n    \
         scope: x/.default\n    clients: [c]\n";
    dir.write("proxy.yaml", yaml);
    let mut cmd = command(["check", "--config"]);
    cmd.arg(dir.path().join("proxy.yaml"))
        .current_dir(elsewhere.path());
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("configuration OK"), "{out:?}");

    // The same names from the working directory's point of view do not exist.
    let mut cmd = command(["check", "--config"]);
    cmd.arg(dir.path().join("proxy.yaml"))
        .current_dir(dir.path().join("tls"));
    let out = run_to_end(cmd, None).await;
    assert_eq!(
        out.code,
        Some(0),
        "the working directory must not matter: {out:?}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn check_prints_the_inline_secret_warning_for_flow_style_yaml() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("truth-inline");
    let yaml = minimal_yaml("").replace(
        "  app:\n    type: client_secret\n    token_url: http://127.0.0.1:9/token\n    \
         client_id: app\n    client_secret: ${TRUTH_SECRET}\n",
        "  app: { type: client_secret, token_url: \"http://127.0.0.1:9/token\", \
         client_id: app, client_secret: \"x~CANARY\" }\n",
    );
    assert!(yaml.contains("{ type: client_secret"), "{yaml}");
    let path = dir.write("proxy.yaml", &yaml);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = command(["check", "--config"]);
    // Whatever the log filter says, `check` shows it.
    cmd.arg(&path).env("RUST_LOG", "off");
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let warning = out
        .stderr
        .lines()
        .find(|line| line.starts_with("warning:"))
        .unwrap_or_else(|| panic!("no warning: {out:?}"));
    assert!(
        warning.contains("credentials.app.client_secret") && warning.contains("mode 644"),
        "{warning}"
    );
    assert!(!out.all().contains("CANARY"), "{out:?}");

    // Not readable by others: no warning.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = command(["check", "--config"]);
    cmd.arg(&path);
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.all().contains("inline secret"), "{out:?}");
}

// ---------------------------------------------------------------------------------------
// doctor
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn doctor_says_the_upstream_refused_the_connection_not_the_token_request() {
    let idp = FakeIdp::start().await;
    // A port that was free a moment ago: nothing listens there.
    let closed = free_port();
    let yaml = format!(
        "{credential}clients:\n  c:\n    networks: [10.0.0.0/8]\nroutes:\n  - prefix: /r/\n    \
         upstream: http://{closed}/api/\n    credential: bc\n    scope: x/.default\n    clients: [c]\n",
        credential = bc_credential_yaml(TENANT, &idp.authority()),
    );
    let config = config(&yaml, standard_vars());
    let (text, ok) = s2s_proxy::doctor::run(&config).await;
    assert!(!ok, "{text}");
    let line = text.lines().next().unwrap();
    assert!(line.contains("FAIL"), "{text}");
    assert!(line.contains("GET /: cannot reach the upstream"), "{text}");
    assert!(!line.contains("token request failed"), "{text}");
    assert!(!line.contains("token endpoint"), "{text}");
    assert_eq!(idp.calls(), 1, "the token step passed");
}

// ---------------------------------------------------------------------------------------
// Command line as documented
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn token_failures_go_to_stderr_and_leave_stdout_empty() {
    let idp = FakeIdp::start_with(IdpMode::invalid_client()).await;
    let dir = TempDir::new("truth-token");
    let yaml = format!(
        "{credential}clients:\n  c:\n    networks: [10.0.0.0/8]\nroutes:\n  - prefix: /bc/\n    \
         upstream: https://api.businesscentral.dynamics.com/v2.0/{TENANT}/Production/\n    \
         credential: bc\n    clients: [c]\n",
        credential = bc_credential_yaml(TENANT, &idp.authority()),
    );
    let path = dir.write("proxy.yaml", &yaml);
    let mut cmd = command(["token", "--route", "/bc/", "--config"]);
    cmd.arg(&path).envs(standard_vars());
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.stdout, "", "a failure prints nothing on stdout");
    assert!(out.stderr.contains("AADSTS7000215"), "{out:?}");
    assert!(
        out.stderr.lines().any(|line| line.starts_with("hint:")),
        "{out:?}"
    );
    // And the documented claims go to stdout on success.
    idp.set_mode(IdpMode::Issue { expires_in: 3599 });
    let mut cmd = command(["token", "--route", "/bc/", "--config"]);
    cmd.arg(&path).envs(standard_vars());
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stdout.is_empty(), "{out:?}");
}

#[tokio::test]
async fn the_readme_hash_secret_example_is_what_the_binary_prints() {
    let readme = include_str!("../README.md");
    let mut lines = readme.lines();
    let command_line = lines
        .find(|line| line.contains("| s2s-proxy hash-secret") && line.starts_with("printf"))
        .expect("the README shows a hash-secret example");
    let password = command_line
        .split('\'')
        .nth(3)
        .unwrap_or_else(|| panic!("no quoted password in {command_line:?}"));
    let shown = lines
        .next()
        .and_then(|line| line.strip_prefix("# "))
        .expect("the example's output follows it")
        .trim();
    let then = lines.next().unwrap_or_default();
    assert!(then.contains(&format!("\"{shown}\"")), "{then}");
    let out = run_to_end(command(["hash-secret"]), Some(password.as_bytes())).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        shown,
        "the README's hash is not the binary's"
    );
}

// ---------------------------------------------------------------------------------------
// Metrics present from the start
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_whose_labels_come_from_config_are_present_at_zero_from_the_start() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_admin_proxy(&idp, &upstream).await;
    idp.wait_for_calls(1).await;
    let text = get(proxy.admin, "/metrics").await.text();
    for line in [
        // The alert in docs/operations.md: increase(...{outcome="error"}[5m]) > 0 needs a 0 first.
        r#"s2s_proxy_config_reloads_total{outcome="error"} 0"#,
        r#"s2s_proxy_config_reloads_total{outcome="ok"} 0"#,
        r#"s2s_proxy_token_fetches_total{credential="bc",outcome="network"} 0"#,
        r#"s2s_proxy_token_fetches_total{credential="bc",outcome="provider_error"} 0"#,
        r#"s2s_proxy_token_fetches_total{credential="bc",outcome="timeout"} 0"#,
        r#"s2s_proxy_request_duration_seconds_count{route="/bc/"} 0"#,
        r#"s2s_proxy_upstream_duration_seconds_count{route="/bc/sandbox/"} 0"#,
        r#"s2s_proxy_in_flight{route="/bc/"} 0"#,
    ] {
        assert!(text.contains(line), "{line} missing in:\n{text}");
    }
    // Nothing that request data decides: no series for the unrouted.
    assert!(!text.contains(r#"route="none""#), "{text}");
    proxy.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 431 is the proxy's own answer, with X-Request-Id
// ---------------------------------------------------------------------------------------

/// The status line, header lines and body of a raw HTTP/1 response.
fn parse_raw(response: &str) -> (u16, Vec<(String, String)>, String) {
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    let mut lines = head.lines();
    let status = raw_status(lines.next().unwrap_or_default());
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn an_http1_head_over_max_header_bytes_gets_431_json_with_a_request_id() {
    let (idp, upstream, proxy) = standard().await;
    let auth = basic("erp", PASSWORD);
    let big = format!(
        "GET /bc/companies?$top=1 HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\
         X-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many =
        format!("GET /bc/companies HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n{many}\r\n");
    for head in [&big, &many] {
        let response = raw(proxy.addr, head.as_bytes()).await;
        let (status, headers, body) = parse_raw(&response);
        assert_eq!(status, 431, "{response}");
        let id = header(&headers, "x-request-id").unwrap_or_else(|| panic!("{response}"));
        assert!(!id.is_empty());
        assert_eq!(header(&headers, "connection"), Some("close"), "{response}");
        assert_eq!(
            header(&headers, "content-type"),
            Some("application/json"),
            "{response}"
        );
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"], "request_header_fields_too_large", "{body}");
        assert_eq!(json["request_id"], id, "{body}");
        assert!(!body.contains(PASSWORD), "{body}");
    }
    // The same head sent in small pieces, after a request on the same connection.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let first = format!("GET /bc/first HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n");
    let sent = [first.as_bytes(), big.as_bytes()].concat();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        let (mut read_half, mut write_half) = stream.split();
        for piece in sent.chunks(1500) {
            write_half.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            use tokio::io::AsyncReadExt as _;
            read_half.read_to_end(&mut out).await
        })
        .await;
        String::from_utf8_lossy(&out).into_owned()
    });
    let both = writer.await.unwrap();
    let second = both
        .match_indices("HTTP/1.1 ")
        .nth(1)
        .map(|(at, _)| &both[at..])
        .unwrap_or_else(|| panic!("two answers expected: {both}"));
    assert!(both.starts_with("HTTP/1.1 200"), "{both}");
    let (status, headers, _) = parse_raw(second);
    assert_eq!(status, 431, "{both}");
    assert!(header(&headers, "x-request-id").is_some(), "{both}");
    assert_eq!(upstream.count(), 1, "only the first request was forwarded");
    assert_eq!(upstream.requests()[0].target, format!("{BC_BASE}first"));
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_http2_header_list_over_max_header_bytes_gets_431_json_with_a_request_id() {
    use http_body_util::{BodyExt as _, Full};
    let (_idp, upstream, proxy) = standard().await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(format!("http://{}/bc/companies", proxy.addr))
        .header("authorization", basic("erp", PASSWORD))
        .header("x-big", "a".repeat(40 * 1024))
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 431);
    let id = response
        .headers()
        .get("x-request-id")
        .expect("x-request-id on the 431")
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "request_header_fields_too_large");
    assert_eq!(json["request_id"], id.as_str());
    // Within the limit, the same connection still works.
    let request = http::Request::get(format!("http://{}/bc/companies", proxy.addr))
        .header("authorization", basic("erp", PASSWORD))
        .header("x-big", "a".repeat(8 * 1024))
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    sender.ready().await.unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    assert_eq!(upstream.count(), 1);
    proxy.shutdown().await;
}

#[test]
fn max_header_bytes_below_8192_is_refused_as_the_configuration_reference_says() {
    let yaml = |limit: u32| minimal_yaml(&format!("  limits:\n    max_header_bytes: {limit}\n"));
    let vars = std::collections::HashMap::from([("TRUTH_SECRET".to_owned(), "s".to_owned())]);
    let source = s2s_proxy::Source::inline("proxy.yaml", vars);
    let error = s2s_proxy::Config::from_yaml_str(&yaml(8191), &source).unwrap_err();
    assert!(
        error.to_string().contains("server.limits.max_header_bytes"),
        "{error}"
    );
    let config = s2s_proxy::Config::from_yaml_str(&yaml(8192), &source).unwrap();
    assert_eq!(config.server.limits.max_header_bytes, 8192);
    let reference = include_str!("../docs/configuration.md");
    let row = reference
        .lines()
        .find(|line| line.starts_with("| `max_header_bytes` |"))
        .unwrap();
    assert!(
        row.contains("From 8192") && !row.contains("act as"),
        "{row}"
    );
}
