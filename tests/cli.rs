//! End-to-end tests of the `s2s-proxy` binary: what an operator types and what the
//! command prints and returns (docs/operations.md, "Command line": exit 0 ok, 1 config or runtime
//! error, 2 usage error).
//!
//! Every child gets its variables through `Command::env`, never the test process's own
//! environment; long-running children sit behind a guard that kills them. Fake token
//! endpoints and upstreams from `support` run in the test's runtime, so the tests that use
//! them are multi-threaded.

mod support;

#[path = "support/cli.rs"]
mod cli;

use std::time::Duration;

use serde_json::{Value, json};

use cli::{Running, TempDir, cells, command, field, free_port, run_to_end, unsigned_jwt};
use support::{
    API_KEY, CLIENT_SECRET, FakeIdp, FakeUpstream, IdpMode, PASSWORD, basic, bc_credential_yaml,
    send, standard_vars, standard_yaml,
};

/// A tenant id in the GUID form Entra uses.
const TENANT_GUID: &str = "5f0c8e1a-3b2d-4c6e-9a7f-0d1e2f3a4b5c";
/// 2100-01-01T00:00:00Z: a token expiry far from any clock the tests run at.
const EXP_2100: u64 = 4_102_444_800;

// ---------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------

const VALID_YAML: &str = r#"
server:
  listen: 127.0.0.1:18080
credentials:
  bc:
    type: client_secret
    tenant_id: ${CLI_TENANT}
    client_id: ${CLI_CLIENT_ID}
    client_secret: ${CLI_SECRET}
clients:
  erp-sync:
    basic: { username: erp-sync, password: "${CLI_PASSWORD}" }
  warehouse:
    api_key: ${CLI_KEY}
routes:
  - prefix: /bc/
    upstream: https://api.businesscentral.dynamics.com/v2.0/${CLI_TENANT}/Production/
    credential: bc
    scope: https://api.businesscentral.dynamics.com/.default
    clients: [erp-sync, warehouse]
    timeout: 9m
  - prefix: /crm/
    upstream: https://contoso.crm4.dynamics.com/api/data/v9.2/
    credential: bc
    clients: [warehouse]
"#;

fn valid_vars() -> [(&'static str, &'static str); 5] {
    [
        ("CLI_TENANT", TENANT_GUID),
        ("CLI_CLIENT_ID", "app-1"),
        ("CLI_SECRET", CLIENT_SECRET),
        ("CLI_PASSWORD", PASSWORD),
        ("CLI_KEY", API_KEY),
    ]
}

/// The table rows of `check` output, as cells, keyed by their first cell.
fn table_row<'a>(stdout: &'a str, prefix: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .map(cells)
        .find(|row| row.first() == Some(&prefix))
        .unwrap_or_else(|| panic!("no row for {prefix} in:\n{stdout}"))
}

#[tokio::test]
async fn check_valid_config_prints_ok_and_the_route_table() {
    let dir = TempDir::new("check-valid");
    let path = dir.write("proxy.yaml", VALID_YAML);
    let mut cmd = command(["check", "--config"]);
    cmd.arg(&path).envs(valid_vars());
    let out = run_to_end(cmd, None).await;

    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout.lines().next(),
        Some(format!("{}: configuration OK", path.display()).as_str()),
        "{}",
        out.stdout
    );
    assert_eq!(
        table_row(&out.stdout, "PREFIX"),
        [
            "PREFIX",
            "UPSTREAM",
            "CREDENTIAL",
            "SCOPE",
            "CLIENTS",
            "TIMEOUT"
        ]
    );
    assert_eq!(
        table_row(&out.stdout, "/bc/"),
        [
            "/bc/",
            format!("https://api.businesscentral.dynamics.com/v2.0/{TENANT_GUID}/Production/")
                .as_str(),
            "bc (client_secret)",
            "https://api.businesscentral.dynamics.com/.default",
            "erp-sync, warehouse",
            "9m",
        ]
    );
    // Defaults made visible: scope from the upstream host, the server's request timeout.
    assert_eq!(
        table_row(&out.stdout, "/crm/"),
        [
            "/crm/",
            "https://contoso.crm4.dynamics.com/api/data/v9.2/",
            "bc (client_secret)",
            "https://contoso.crm4.dynamics.com/.default",
            "warehouse",
            "10m",
        ]
    );
    assert!(
        out.stdout
            .contains("2 routes, 1 credential, 2 clients; listening on 127.0.0.1:18080"),
        "{}",
        out.stdout
    );
    for secret in [CLIENT_SECRET, PASSWORD, API_KEY] {
        assert!(
            !out.all().contains(secret),
            "{secret} printed:\n{}",
            out.all()
        );
    }
}

/// Every variable the shipped example's header comment documents.
const SHIPPED_VARS: [(&str, &str); 13] = [
    ("BC_TENANT_ID", TENANT_GUID),
    ("BC_CLIENT_ID", "0a1b2c3d-0000-4000-8000-00000000b0c0"),
    ("BC_CLIENT_SECRET", CLIENT_SECRET),
    ("FO_ENV", "contoso-prod"),
    ("FO_TENANT_ID", TENANT_GUID),
    ("FO_CLIENT_ID", "0a1b2c3d-0000-4000-8000-00000000f0f0"),
    ("FO_CLIENT_SECRET", CLIENT_SECRET),
    ("CRM_ORG", "contoso"),
    ("CRM_TENANT_ID", "6a1d9f2b-4c3e-4d7f-8b9a-1e2f3a4b5c6d"),
    ("CRM_CLIENT_ID", "0a1b2c3d-0000-4000-8000-00000000c0c0"),
    ("CRM_CLIENT_SECRET", CLIENT_SECRET),
    ("ERP_SYNC_PASSWORD", PASSWORD),
    ("WAREHOUSE_KEY", API_KEY),
];

fn shipped_config() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml")
}

#[tokio::test]
async fn check_accepts_the_shipped_proxy_yaml() {
    let path = shipped_config();
    let mut cmd = command(["check", "--config"]);
    cmd.arg(&path).envs(SHIPPED_VARS);
    let out = run_to_end(cmd, None).await;

    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("configuration OK"), "{}", out.stdout);
    let bc = table_row(&out.stdout, "/bc/");
    assert_eq!(
        bc[1],
        format!("https://api.businesscentral.dynamics.com/v2.0/{TENANT_GUID}/Production/")
    );
    assert_eq!(
        table_row(&out.stdout, "/fo/")[3],
        "https://contoso-prod.operations.dynamics.com/.default"
    );
    assert_eq!(
        table_row(&out.stdout, "/crm/")[1],
        "https://contoso.crm4.dynamics.com/api/data/v9.2/"
    );
    assert!(!out.all().contains(CLIENT_SECRET), "{}", out.all());
}

#[tokio::test]
async fn check_of_the_shipped_proxy_yaml_names_each_documented_variable_left_unset() {
    let path = shipped_config();
    for (missing, _) in SHIPPED_VARS {
        let mut cmd = command(["check", "--config"]);
        cmd.arg(&path)
            .envs(
                SHIPPED_VARS
                    .into_iter()
                    .filter(|(name, _)| *name != missing),
            )
            .env_remove(missing);
        let out = run_to_end(cmd, None).await;
        assert_eq!(out.code, Some(1), "without {missing}: {out:?}");
        assert!(
            out.stderr
                .contains(&format!("environment variable `{missing}` is not set")),
            "without {missing}:\n{}",
            out.stderr
        );
    }
}

/// Planted secrets for the invalid config: each sits in a variable used by a field
/// that is rejected, so a careless message would echo it.
const CANARY_MIXED: &str = "CANARY_mixed_91b7";
const CANARY_SPACED: &str = "CANARY spaced 4d2e";
const CANARY_HASH: &str = "CANARY_hash_e03f";

const INVALID_YAML: &str = r#"
credentials:
  bc:
    type: client_secret
    tenant_id: ${S2S_CLI_TEST_UNSET_TENANT}
    client_id: app-1
    client_secret: ${CLI_SECRET}
clients:
  erp:
    basic: { username: erp, password: "pre-${CLI_MIXED_PART}" }
  scanner:
    api_key: ${CLI_SPACED_KEY}
  edi:
    basic: { username: edi, password: "sha256:${CLI_HASH_PART}" }
routes:
  - prefix: /bc/
    upstream: https://api.businesscentral.dynamics.com/v2.0/x/Production/
    credential: nope
    clients: [erp]
  - prefix: /crm/
    upstream: https://contoso.crm4.dynamics.com/api/data/v9.2/
    credential: bc
    clients: []
"#;

#[tokio::test]
async fn check_invalid_config_names_file_and_every_problem_without_echoing_secrets() {
    let dir = TempDir::new("check-invalid");
    let path = dir.write("broken.yaml", INVALID_YAML);
    let mut cmd = command(["check", "--config"]);
    cmd.arg(&path)
        .env_remove("S2S_CLI_TEST_UNSET_TENANT")
        .env("CLI_SECRET", CLIENT_SECRET)
        .env("CLI_MIXED_PART", CANARY_MIXED)
        .env("CLI_SPACED_KEY", CANARY_SPACED)
        .env("CLI_HASH_PART", CANARY_HASH);
    let out = run_to_end(cmd, None).await;

    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(!out.stdout.contains("configuration OK"), "{}", out.stdout);
    let stderr = &out.stderr;
    assert!(
        stderr.contains(&path.display().to_string()),
        "file not named:\n{stderr}"
    );
    for (yaml_path, what) in [
        (
            "credentials.bc.tenant_id",
            "`S2S_CLI_TEST_UNSET_TENANT` is not set",
        ),
        ("clients.erp.basic.password", "wholly one ${VAR}"),
        ("clients.scanner.api_key", "printable ASCII"),
        ("clients.edi.basic.password", "64 hex digits"),
        ("routes[0].credential", "unknown credential `nope`"),
        ("routes[1].clients", "at least one client"),
    ] {
        assert!(
            stderr
                .lines()
                .any(|line| line.contains(&format!("{yaml_path}: ")) && line.contains(what)),
            "no line for {yaml_path} mentioning {what:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("6 problems"), "{stderr}");
    let all = out.all();
    for canary in ["CANARY", CLIENT_SECRET] {
        assert!(!all.contains(canary), "{canary} echoed:\n{all}");
    }
}

#[tokio::test]
async fn check_reports_yaml_syntax_errors_with_file_line_and_column() {
    let dir = TempDir::new("check-syntax");
    let path = dir.write(
        "syntax.yaml",
        "server:\n  listen: 127.0.0.1:8080\nroutes:\n  - prefix: /a/\n   upstream: [x\n",
    );
    let mut cmd = command(["check", "--config"]);
    cmd.arg(&path);
    let out = run_to_end(cmd, None).await;

    assert_eq!(out.code, Some(1), "{out:?}");
    let location = format!("{}:5:4:", path.display());
    assert!(
        out.stderr.contains(&location),
        "expected {location} in:\n{}",
        out.stderr
    );
}

#[tokio::test]
async fn check_of_a_missing_file_exits_1_naming_it() {
    let dir = TempDir::new("check-missing");
    let path = dir.path().join("nowhere.yaml");
    let mut cmd = command(["check", "--config"]);
    cmd.arg(&path);
    let out = run_to_end(cmd, None).await;

    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&path.display().to_string()) && out.stderr.contains("cannot read"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("No such file"), "{}", out.stderr);
}

#[tokio::test]
async fn config_path_comes_from_flag_then_environment_then_working_directory() {
    let dir = TempDir::new("config-path");
    let good = dir.write("from-env.yaml", VALID_YAML);
    let bad = dir.write("bad.yaml", "routes: [");

    // $S2S_PROXY_CONFIG when --config is absent; the working directory has no proxy.yaml.
    let mut cmd = command(["check"]);
    cmd.current_dir(dir.path())
        .env("S2S_PROXY_CONFIG", &good)
        .envs(valid_vars());
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .starts_with(&format!("{}: configuration OK", good.display())),
        "{}",
        out.stdout
    );

    // --config wins over the environment.
    let mut cmd = command(["check", "--config"]);
    cmd.arg(&good)
        .env("S2S_PROXY_CONFIG", &bad)
        .envs(valid_vars());
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.code, Some(0), "{out:?}");

    // Neither: proxy.yaml in the working directory.
    let mut cmd = command(["check"]);
    cmd.current_dir(dir.path());
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("proxy.yaml: cannot read"),
        "{}",
        out.stderr
    );
    dir.write("proxy.yaml", VALID_YAML);
    let mut cmd = command(["check"]);
    cmd.current_dir(dir.path()).envs(valid_vars());
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

// ---------------------------------------------------------------------------------------
// usage
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn usage_errors_exit_2() {
    for (args, expected) in [
        (&["frobnicate"][..], "frobnicate"),
        (&[][..], "Usage"),
        (&["token"][..], "--route"),
        (&["token", "--config", "proxy.yaml"][..], "--route"),
        (&["check", "--frobnicate"][..], "--frobnicate"),
        (&["--log-format", "xml", "check"][..], "xml"),
        (&["dev", "--listen", "not-an-address"][..], "not-an-address"),
    ] {
        let out = run_to_end(command(args), None).await;
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(out.stderr.contains(expected), "{args:?}:\n{}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}:\n{}", out.stdout);
    }
}

#[tokio::test]
async fn help_and_version_exit_0() {
    let out = run_to_end(command(["--help"]), None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for subcommand in ["run", "check", "token", "hash-secret", "dev"] {
        assert!(
            out.stdout
                .lines()
                .any(|line| line.trim_start().starts_with(&format!("{subcommand} "))),
            "{subcommand} not in help:\n{}",
            out.stdout
        );
    }
    let out = run_to_end(command(["token", "--help"]), None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("--route") && out.stdout.contains("--raw"),
        "{}",
        out.stdout
    );

    let out = run_to_end(command(["--version"]), None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        format!("s2s-proxy {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn dev_refuses_a_non_loopback_listen_address() {
    // TEST-NET-1 (RFC 5737): never a local address, so nothing can ever bind it here.
    let out = run_to_end(command(["dev", "--listen", "192.0.2.1:8080"]), None).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("loopback"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------------------
// hash-secret
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hash_secret_prints_the_sha256_form_of_stdin_without_its_newline() {
    for input in [&b"test\n"[..], b"test", b"test\r\n"] {
        let out = run_to_end(command(["hash-secret"]), Some(input)).await;
        assert_eq!(out.code, Some(0), "{input:?}: {out:?}");
        assert_eq!(
            out.stdout, "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n",
            "{input:?}"
        );
    }
}

#[tokio::test]
async fn hash_secret_refuses_an_empty_secret() {
    for input in [&b""[..], b"\n"] {
        let out = run_to_end(command(["hash-secret"]), Some(input)).await;
        assert_eq!(out.code, Some(1), "{input:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        assert!(out.stderr.contains("empty"), "{}", out.stderr);
    }
}

// ---------------------------------------------------------------------------------------
// token
// ---------------------------------------------------------------------------------------

const BC_AUDIENCE: &str = "https://api.businesscentral.dynamics.com";

/// One Entra-style credential at `idp`, routes `/bc/` and `/bc/sandbox/` to Business
/// Central (never contacted: `token` only talks to the identity provider).
fn token_yaml(idp: &FakeIdp) -> String {
    format!(
        r#"
{credential}clients:
  erp:
    basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }}
routes:
  - prefix: /bc/
    upstream: {BC_AUDIENCE}/v2.0/{TENANT_GUID}/Production/
    credential: bc
    scope: {BC_AUDIENCE}/.default
    clients: [erp]
  - prefix: /bc/sandbox/
    upstream: {BC_AUDIENCE}/v2.0/{TENANT_GUID}/Sandbox/
    credential: bc
    clients: [erp]
"#,
        credential = bc_credential_yaml(TENANT_GUID, &idp.authority()),
    )
}

fn app_token(roles: &[&str]) -> String {
    unsigned_jwt(&json!({
        "aud": BC_AUDIENCE,
        "iss": format!("https://sts.windows.net/{TENANT_GUID}/"),
        "tid": TENANT_GUID,
        "appid": "app-1",
        "idtyp": "app",
        "roles": roles,
        "exp": EXP_2100,
    }))
}

async fn token_command(idp: &FakeIdp, dir: &TempDir, extra: &[&str]) -> cli::Outcome {
    let path = dir.write("proxy.yaml", &token_yaml(idp));
    let mut cmd = command(["token"]);
    cmd.args(extra)
        .arg("--config")
        .arg(path)
        .envs(standard_vars());
    run_to_end(cmd, None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn token_prints_decoded_claims_and_the_raw_token_only_with_raw() {
    let jwt = app_token(&["API.ReadWrite.All"]);
    let idp = FakeIdp::start_with(IdpMode::IssueToken(jwt.clone())).await;
    let dir = TempDir::new("token-claims");
    let out = token_command(&idp, &dir, &["--route", "/bc/"]).await;

    assert_eq!(out.code, Some(0), "{out:?}");
    let stdout = &out.stdout;
    assert_eq!(field(stdout, "route"), Some("/bc/"), "{stdout}");
    assert_eq!(field(stdout, "aud"), Some(BC_AUDIENCE), "{stdout}");
    assert_eq!(field(stdout, "tid"), Some(TENANT_GUID), "{stdout}");
    assert_eq!(field(stdout, "appid"), Some("app-1"), "{stdout}");
    assert_eq!(
        field(stdout, "roles"),
        Some("API.ReadWrite.All"),
        "{stdout}"
    );
    assert_eq!(
        field(stdout, "exp"),
        Some("2100-01-01T00:00:00Z"),
        "{stdout}"
    );
    assert!(!stdout.contains("warning"), "{stdout}");
    let all = out.all();
    assert!(
        !all.contains(&jwt),
        "raw token printed without --raw:\n{all}"
    );
    assert!(
        !all.contains("eyJ"),
        "token part printed without --raw:\n{all}"
    );
    assert!(!all.contains("CANARY"), "secret printed:\n{all}");

    // What crossed the wire: one client-credentials request for the route's scope.
    let requests = idp.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].path,
        format!("/{TENANT_GUID}/oauth2/v2.0/token")
    );
    let form = |name: &str| {
        requests[0]
            .form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(form("grant_type"), Some("client_credentials"));
    assert_eq!(form("client_id"), Some("app-1"));
    assert_eq!(form("client_secret"), Some(CLIENT_SECRET));
    assert_eq!(
        form("scope"),
        Some(format!("{BC_AUDIENCE}/.default").as_str())
    );

    let out = token_command(&idp, &dir, &["--route", "/bc/", "--raw"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.lines().any(|line| line.trim() == jwt),
        "raw token missing with --raw:\n{}",
        out.stdout
    );
    assert_eq!(field(&out.stdout, "roles"), Some("API.ReadWrite.All"));
}

#[tokio::test(flavor = "multi_thread")]
async fn token_without_roles_warns_about_admin_consent() {
    let idp = FakeIdp::start_with(IdpMode::IssueToken(app_token(&[]))).await;
    let dir = TempDir::new("token-roles");
    let out = token_command(&idp, &dir, &["--route", "/bc/"]).await;

    assert_eq!(out.code, Some(0), "{out:?}");
    let warning = out
        .stdout
        .lines()
        .find(|line| line.starts_with("warning:"))
        .unwrap_or_else(|| panic!("no warning in:\n{}", out.stdout));
    assert!(warning.contains("no roles"), "{warning}");
    assert!(warning.contains("admin consent"), "{warning}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_failure_shows_the_aadsts_error_and_hint_never_the_secret() {
    let idp = FakeIdp::start_with(IdpMode::invalid_client()).await;
    let dir = TempDir::new("token-fail");
    let out = token_command(&idp, &dir, &["--route", "/bc/"]).await;

    assert_eq!(out.code, Some(1), "{out:?}");
    let all = out.all();
    assert!(all.contains("invalid_client"), "{all}");
    assert!(all.contains("7000215"), "{all}");
    let hint = all
        .lines()
        .find(|line| line.starts_with("hint:"))
        .unwrap_or_else(|| panic!("no hint in:\n{all}"));
    assert!(hint.contains("secret ID"), "{hint}");
    // The secret, even partly or form-encoded, and the raw provider body stay out.
    assert!(!all.contains("CANARY"), "secret printed:\n{all}");
    assert!(
        !all.contains("error_uri"),
        "raw provider body printed:\n{all}"
    );
    assert_eq!(idp.calls(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_for_an_unknown_route_lists_the_routes() {
    let idp = FakeIdp::start().await;
    let dir = TempDir::new("token-route");
    let out = token_command(&idp, &dir, &["--route", "/nope/"]).await;

    assert_eq!(out.code, Some(1), "{out:?}");
    let all = out.all();
    assert!(all.contains("/nope/"), "{all}");
    assert!(
        all.contains("/bc/") && all.contains("/bc/sandbox/"),
        "{all}"
    );
    assert_eq!(idp.calls(), 0, "no token requested for an unknown route");
}

// ---------------------------------------------------------------------------------------
// run
// ---------------------------------------------------------------------------------------

/// Starts `s2s-proxy run` for the standard config on a free loopback port and waits
/// until it accepts connections.
async fn spawn_run(
    idp: &FakeIdp,
    upstream: &FakeUpstream,
    dir: &TempDir,
    extra: &[&str],
) -> (Running, std::net::SocketAddr) {
    let addr = free_port();
    let yaml =
        standard_yaml(idp, upstream).replace("listen: 127.0.0.1:0", &format!("listen: {addr}"));
    assert!(yaml.contains(&addr.to_string()));
    let path = dir.write("proxy.yaml", &yaml);
    let mut cmd = command(extra);
    cmd.arg("run")
        .arg("--config")
        .arg(path)
        .envs(standard_vars());
    let mut proxy = Running::spawn(cmd);
    proxy.wait_until_accepting(addr).await;
    (proxy, addr)
}

/// The JSON objects of a JSON log; panics on any line that is not one.
fn json_lines(stderr: &str) -> Vec<serde_json::Map<String, Value>> {
    stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| match serde_json::from_str(line) {
            Ok(Value::Object(object)) => object,
            _ => panic!("not a JSON object: {line}\nstderr:\n{stderr}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_forwards_with_the_token_and_logs_json_access_lines() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let dir = TempDir::new("run-json");
    let (mut proxy, addr) = spawn_run(&idp, &upstream, &dir, &["--log-format", "json"]).await;

    let answer = send(
        addr,
        "GET",
        "/bc/api/v2.0/companies?$top=1",
        &[("authorization", &basic("erp", PASSWORD))],
        "",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let request_id = answer
        .header("x-request-id")
        .expect("x-request-id returned")
        .to_owned();
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("authorization"), Some("Bearer tok-1"));
    assert_eq!(
        seen[0].target,
        format!(
            "/v2.0/{}/Production/api/v2.0/companies?$top=1",
            support::TENANT
        )
    );

    proxy.signal("TERM");
    let status = proxy.exit_within(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status}");

    let stderr = proxy.stderr();
    let lines = json_lines(&stderr);
    let access = lines
        .iter()
        .find(|line| line.get("request_id").and_then(Value::as_str) == Some(request_id.as_str()))
        .unwrap_or_else(|| panic!("no access line for {request_id}:\n{stderr}"));
    let text = |name: &str| access.get(name).and_then(Value::as_str);
    assert_eq!(text("client"), Some("erp"), "{access:?}");
    assert_eq!(text("route"), Some("/bc/"), "{access:?}");
    assert_eq!(text("method"), Some("GET"), "{access:?}");
    assert_eq!(text("path"), Some("/bc/api/v2.0/companies"), "{access:?}");
    assert_eq!(
        access.get("status").and_then(Value::as_u64),
        Some(200),
        "{access:?}"
    );
    for number in ["total_ms", "upstream_ms", "bytes_in", "bytes_out"] {
        assert!(
            access.get(number).and_then(Value::as_u64).is_some(),
            "{number}: {access:?}"
        );
    }
    assert_eq!(
        access.get("bytes_out").and_then(Value::as_u64),
        Some(12),
        "{access:?}"
    );
    for secret in [PASSWORD, CLIENT_SECRET, "tok-1"] {
        assert!(!stderr.contains(secret), "{secret} logged:\n{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn run_drains_an_in_flight_request_on_sigterm_and_exits_0() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let dir = TempDir::new("run-sigterm");
    let (mut proxy, addr) = spawn_run(&idp, &upstream, &dir, &[]).await;

    upstream.set_delay(Duration::from_millis(500));
    let slow = tokio::spawn(async move {
        send(
            addr,
            "GET",
            "/bc/api/v2.0/companies",
            &[("authorization", &basic("erp", PASSWORD))],
            "",
        )
        .await
    });
    // Signal only once the request is with the upstream, i.e. truly in flight.
    for _ in 0..500 {
        if upstream.count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.count(), 1, "request never reached the upstream");
    proxy.signal("TERM");

    let answer = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("in-flight request finished")
        .expect("client task");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some("Bearer tok-1")
    );
    let status = proxy.exit_within(Duration::from_secs(5)).await;
    assert!(status.success(), "exit {status}\n{}", proxy.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn run_exits_1_when_the_listen_address_is_taken() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = TempDir::new("run-taken");
    let yaml =
        standard_yaml(&idp, &upstream).replace("listen: 127.0.0.1:0", &format!("listen: {addr}"));
    let path = dir.write("proxy.yaml", &yaml);
    let mut cmd = command(["run", "--config"]);
    cmd.arg(path).envs(standard_vars());
    let out = run_to_end(cmd, None).await;

    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!("cannot listen on {addr}")),
        "{}",
        out.stderr
    );
    drop(taken);
}

// ---------------------------------------------------------------------------------------
// dev
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn dev_demo_serves_the_sample_api_and_reports_tokens_on_sigint() {
    let addr = free_port();
    let mut cmd = command(["dev", "--listen"]);
    cmd.arg(addr.to_string());
    let mut dev = Running::spawn(cmd);
    dev.wait_until_accepting(addr).await;
    let demo = basic("demo", "demo-password");

    let companies = send(
        addr,
        "GET",
        "/bc/api/v2.0/companies",
        &[("authorization", &demo)],
        "",
    )
    .await;
    assert_eq!(companies.status, 200, "{}", companies.text());
    let body = companies.json();
    assert!(
        body["value"].as_array().is_some_and(|v| !v.is_empty()),
        "{body}"
    );
    let next = body["@odata.nextLink"]
        .as_str()
        .unwrap_or_else(|| panic!("no nextLink: {body}"));
    // Links are rewritten to the proxy, and following one reaches page 2.
    let proxied = format!("http://{addr}/bc/api/v2.0/companies?$skiptoken=");
    assert!(next.starts_with(&proxied), "{next}");
    let page2 = send(
        addr,
        "GET",
        &next[format!("http://{addr}").len()..],
        &[("authorization", &demo)],
        "",
    )
    .await;
    assert_eq!(page2.status, 200, "{}", page2.text());
    assert!(page2.json().get("@odata.nextLink").is_none());

    let echo = send(
        addr,
        "GET",
        "/bc/api/v2.0/echo",
        &[("x-api-key", "demo-key")],
        "",
    )
    .await;
    assert_eq!(echo.status, 200, "{}", echo.text());
    let echoed = echo.json();
    let authorization = echoed["headers"]["authorization"]
        .as_str()
        .unwrap_or_else(|| panic!("no authorization echoed: {echoed}"));
    assert!(
        authorization.starts_with("Bearer <verified"),
        "{authorization}"
    );
    assert!(
        authorization.contains("API.ReadWrite.All"),
        "{authorization}"
    );
    assert!(echoed["headers"].get("x-api-key").is_none(), "{echoed}");
    assert!(
        !echo.text().contains("eyJ"),
        "raw JWT echoed: {}",
        echo.text()
    );

    let anonymous = send(addr, "GET", "/bc/api/v2.0/companies", &[], "").await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());

    // The banner's curl commands point at the address asked for.
    assert!(
        dev.stdout()
            .contains(&format!("curl -u demo:demo-password http://{addr}/bc/")),
        "{}",
        dev.stdout()
    );

    dev.signal("INT");
    let status = dev.exit_within(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status}\n{}", dev.stderr());
    let stdout = dev.stdout();
    assert!(
        stdout.contains("handed out 1 token "),
        "expected one token issued:\n{stdout}"
    );
}

// ---------------------------------------------------------------------------------------
// known product bugs
// ---------------------------------------------------------------------------------------

/// `main` prints errors with `{:#}` (the whole source chain), but `ConfigError::Read` and
/// `StartError::Bind` also put their `#[source]` into their own message, so the OS error
/// is printed twice: `cannot read: No such file or directory (os error 2): No such file
/// or directory (os error 2)`.
#[tokio::test(flavor = "multi_thread")]
async fn io_error_reasons_are_printed_once() {
    let dir = TempDir::new("once");
    let mut cmd = command(["check", "--config"]);
    cmd.arg(dir.path().join("nowhere.yaml"));
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.stderr.matches("os error").count(), 1, "{}", out.stderr);

    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let yaml = standard_yaml(&idp, &upstream).replace(
        "listen: 127.0.0.1:0",
        &format!("listen: {}", taken.local_addr().unwrap()),
    );
    let mut cmd = command(["run", "--config"]);
    cmd.arg(dir.write("proxy.yaml", &yaml))
        .envs(standard_vars());
    let out = run_to_end(cmd, None).await;
    assert_eq!(out.stderr.matches("os error").count(), 1, "{}", out.stderr);
}

/// Secrets and tokens live in memory: the process must not be able to dump core.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
async fn run_disables_core_dumps() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let dir = TempDir::new("run-core");
    let (mut proxy, _addr) = spawn_run(&idp, &upstream, &dir, &[]).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let core = limits
        .lines()
        .find(|line| line.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("{limits}"));
    let values: Vec<&str> = core.split_whitespace().skip(4).take(2).collect();
    assert_eq!(values, ["0", "0"], "{core}");
    proxy.signal("TERM");
    assert!(proxy.exit_within(Duration::from_secs(10)).await.success());
}
