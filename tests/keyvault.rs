//! Secrets from Azure Key Vault (README "Secrets from Azure Key Vault", docs/key-vault.md):
//! `secret_stores` and `${secret:STORE/NAME}` against a loopback fake of the Key Vault REST
//! API that records what it received, the fake token endpoint of `support` as the vault
//! identity's issuer (a workload identity), and a token endpoint for the route's
//! credential that accepts only the secrets a test says.
//!
//! Refresh runs on real time (`refresh: 1s`) because every party is on a real socket; the
//! assertions poll with generous limits and never sleep to synchronise.

mod support;

#[path = "support/cli.rs"]
#[allow(dead_code)]
mod cli;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use s2s_proxy::{Config, ConfigError, Source};
use support::{
    FakeIdp, FakeUpstream, PASSWORD, TENANT, capture_logs, erp, eventually, get, json_response,
    metric, send, serve, spawn_ops_proxy,
};

/// Secret values planted in the fake vault: none may appear in logs, metrics, `check`
/// output or answers.
const OLD: &str = "kv_CANARY_old_91d2";
const NEW: &str = "kv_CANARY_new_4be7";

// ---------------------------------------------------------------------------------------
// Fakes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VaultMode {
    Serve,
    /// Answer every request with this status.
    Fail(u16),
    /// Never answer.
    Stall,
}

/// A request as the fake vault received it.
#[derive(Debug, Clone)]
struct VaultRequest {
    path_and_query: String,
    authorization: Option<String>,
}

#[derive(Debug)]
struct VaultState {
    /// name → (value, version, exp)
    secrets: HashMap<String, (String, String, Option<u64>)>,
    /// The `resource` of the 401 challenge; `None`: the vault's own origin.
    challenge: Option<String>,
    mode: VaultMode,
    requests: Vec<VaultRequest>,
}

/// A fake Azure Key Vault (`GET /secrets/{name}?api-version=7.4`): 401 with a `Bearer`
/// challenge to a request without a token, the secret bundle or 404 otherwise.
#[derive(Clone)]
struct FakeVault {
    addr: SocketAddr,
    state: Arc<Mutex<VaultState>>,
}

impl FakeVault {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(VaultState {
            secrets: HashMap::new(),
            challenge: None,
            mode: VaultMode::Serve,
            requests: Vec::new(),
        }));
        let shared = state.clone();
        let addr = serve(move |request: Request<Incoming>| {
            let state = shared.clone();
            async move {
                let host = request
                    .headers()
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let authorization = request
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned());
                let path_and_query = request.uri().to_string();
                let (mode, challenge, secret) = {
                    let mut state = state.lock().unwrap();
                    state.requests.push(VaultRequest {
                        path_and_query: path_and_query.clone(),
                        authorization: authorization.clone(),
                    });
                    let name = request
                        .uri()
                        .path()
                        .strip_prefix("/secrets/")
                        .unwrap_or_default()
                        .to_owned();
                    (
                        state.mode,
                        state.challenge.clone(),
                        state.secrets.get(&name).cloned().map(|s| (name, s)),
                    )
                };
                match mode {
                    VaultMode::Fail(status) => {
                        return json_response(
                            StatusCode::from_u16(status).unwrap(),
                            r#"{"error":{"code":"InternalError","message":"boom"}}"#.to_owned(),
                        );
                    }
                    VaultMode::Stall => std::future::pending().await,
                    VaultMode::Serve => {}
                }
                if !authorization.is_some_and(|a| a.starts_with("Bearer tok-")) {
                    let resource = challenge.unwrap_or_else(|| format!("http://{host}"));
                    let mut response = json_response(
                        StatusCode::UNAUTHORIZED,
                        r#"{"error":{"code":"Unauthorized","message":"AKV10000: Request is missing a Bearer or PoP token."}}"#.to_owned(),
                    );
                    response.headers_mut().insert(
                        "www-authenticate",
                        format!(
                            r#"Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="{resource}""#
                        )
                        .parse()
                        .unwrap(),
                    );
                    return response;
                }
                if !path_and_query.ends_with("?api-version=7.4") {
                    return json_response(StatusCode::BAD_REQUEST, "{}".to_owned());
                }
                match secret {
                    Some((name, (value, version, exp))) => {
                        let mut attributes = serde_json::json!({
                            "enabled": true, "created": 1_764_892_800, "updated": 1_764_892_800,
                            "recoveryLevel": "Recoverable+Purgeable",
                        });
                        if let Some(exp) = exp {
                            attributes["exp"] = exp.into();
                        }
                        let mut bundle = serde_json::json!({
                            "value": value,
                            "id": format!("http://{host}/secrets/{name}/{version}"),
                            "attributes": attributes,
                            "tags": {},
                        });
                        // A certificate's secret says what it holds (Key Vault sets it).
                        if value.contains("-----BEGIN ") {
                            bundle["contentType"] = "application/x-pem-file".into();
                            bundle["kid"] =
                                format!("http://{host}/keys/{name}/{version}").into();
                            bundle["managed"] = true.into();
                        }
                        json_response(StatusCode::OK, bundle.to_string())
                    }
                    None => json_response(
                        StatusCode::NOT_FOUND,
                        r#"{"error":{"code":"SecretNotFound","message":"A secret with (name/id) was not found in this key vault."}}"#.to_owned(),
                    ),
                }
            }
        })
        .await;
        Self { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn put(&self, name: &str, value: &str, version: &str, exp: Option<u64>) {
        self.state
            .lock()
            .unwrap()
            .secrets
            .insert(name.to_owned(), (value.to_owned(), version.to_owned(), exp));
    }

    fn set_mode(&self, mode: VaultMode) {
        self.state.lock().unwrap().mode = mode;
    }

    fn set_challenge(&self, resource: &str) {
        self.state.lock().unwrap().challenge = Some(resource.to_owned());
    }

    fn requests(&self) -> Vec<VaultRequest> {
        self.state.lock().unwrap().requests.clone()
    }
}

/// A token endpoint for the route's `client_secret` credential that accepts only the
/// secrets in its list (else Entra's `invalid_client`), and records every secret it saw.
#[derive(Clone)]
struct SecretIdp {
    addr: SocketAddr,
    accepted: Arc<Mutex<HashSet<String>>>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl SecretIdp {
    async fn start(accepted: &[&str]) -> Self {
        let accepted = Arc::new(Mutex::new(
            accepted
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<HashSet<String>>(),
        ));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let issued = Arc::new(AtomicUsize::new(0));
        let (a, s, i) = (accepted.clone(), seen.clone(), issued.clone());
        let addr = serve(move |request: Request<Incoming>| {
            let (accepted, seen, issued) = (a.clone(), s.clone(), i.clone());
            async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let secret = support::url_decode_form(&body)
                    .into_iter()
                    .find(|(k, _)| k == "client_secret")
                    .map(|(_, v)| v)
                    .unwrap_or_default();
                seen.lock().unwrap().push(secret.clone());
                if accepted.lock().unwrap().contains(&secret) {
                    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                    json_response(
                        StatusCode::OK,
                        format!(
                            r#"{{"token_type":"Bearer","expires_in":3599,"access_token":"bc-tok-{n}"}}"#
                        ),
                    )
                } else {
                    json_response(StatusCode::UNAUTHORIZED, support::invalid_client_body())
                }
            }
        })
        .await;
        Self {
            addr,
            accepted,
            seen,
        }
    }

    fn authority(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accept_only(&self, secrets: &[&str]) {
        *self.accepted.lock().unwrap() = secrets.iter().map(|s| (*s).to_owned()).collect();
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------
// Set-up

struct Setup {
    vault: FakeVault,
    /// Issues the vault identity's (workload identity) tokens.
    identity: FakeIdp,
    bc: SecretIdp,
    upstream: FakeUpstream,
    dir: cli::TempDir,
}

impl Setup {
    async fn start(accepted: &[&str]) -> Self {
        let dir = cli::TempDir::new("keyvault");
        dir.write("federated-token", "eyJhbGciOiJSUzI1NiJ9.e30.sig");
        Self {
            vault: FakeVault::start().await,
            identity: FakeIdp::start().await,
            bc: SecretIdp::start(accepted).await,
            upstream: FakeUpstream::start().await,
            dir,
        }
    }

    /// A proxy with the admin listener, store `kv` read by workload identity `pod`, and
    /// route `/bc/` whose credential `bc` has `secret_yaml` (e.g.
    /// `client_secret: ${secret:kv/bc-secret}`).
    fn yaml(&self, secret_yaml: &str) -> String {
        format!(
            r#"
server:
  listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
secret_stores:
  kv:
    type: azure_key_vault
    url: {vault}
    credential: pod
    refresh: 1s
credentials:
  pod:
    type: workload_identity
    tenant_id: {TENANT}
    client_id: 11111111-1111-1111-1111-111111111111
    token_file: {token_file}
    authority: {identity}
  bc:
    type: client_secret
    tenant_id: {TENANT}
    authority: {bc}
    client_id: app-1
    {secret_yaml}
clients:
  erp:
    basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }}
routes:
  - prefix: /bc/
    upstream: {upstream}/api/
    credential: bc
    clients: [erp]
"#,
            vault = self.vault.url(),
            token_file = self.dir.path().join("federated-token").display(),
            identity = self.identity.authority(),
            bc = self.bc.authority(),
            upstream = self.upstream.base(),
        )
    }
}

fn vars() -> HashMap<String, String> {
    HashMap::from([("ERP_PASSWORD".to_owned(), PASSWORD.to_owned())])
}

/// Both configuration stages, off the runtime's thread: the second stage reads the vault,
/// which the fakes on this runtime must answer.
async fn load(yaml: String) -> Result<Config, ConfigError> {
    tokio::task::spawn_blocking(move || {
        Config::from_yaml_str(&yaml, &Source::inline("test.yaml", vars()))
    })
    .await
    .unwrap()
}

async fn bc_get(addr: SocketAddr) -> support::Answer {
    let (name, value) = erp();
    send(addr, "GET", "/bc/companies", &[(name, &value)], "").await
}

// ---------------------------------------------------------------------------------------
// Start-up

#[tokio::test]
async fn startup_follows_the_challenge_then_reads_the_secret_with_a_vault_token() {
    let setup = Setup::start(&[OLD]).await;
    setup.vault.put("bc-secret", OLD, "v1", Some(1_893_456_000));
    let config = load(setup.yaml("client_secret: ${secret:kv/bc-secret}"))
        .await
        .expect("loads");
    let proxy = spawn_ops_proxy(config, None).await;

    // First request without a token gets the challenge; the second carries the token the
    // identity's issuer gave for the challenge's resource.
    let requests = setup.vault.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        requests[0].path_and_query,
        "/secrets/bc-secret?api-version=7.4"
    );
    assert_eq!(requests[0].authorization, None);
    assert_eq!(requests[1].authorization.as_deref(), Some("Bearer tok-1"));
    let identity = setup.identity.requests();
    assert_eq!(identity.len(), 1);
    let scope = identity[0]
        .form
        .iter()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone());
    assert_eq!(scope, Some(format!("{}/.default", setup.vault.url())));

    // The route's credential sends the vault's value.
    let answer = bc_get(proxy.handle.addr).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(setup.bc.seen(), [OLD]);
    let recorded = setup.upstream.requests();
    assert_eq!(
        recorded.last().unwrap().header("authorization"),
        Some("Bearer bc-tok-1")
    );

    // Version and expiry on the status page, never the value.
    let status = get(proxy.admin, "/status.json").await;
    let text = status.text();
    assert!(!text.contains(OLD), "{text}");
    let secrets = &status.json()["secret_stores"];
    assert_eq!(secrets[0]["store"], "kv", "{text}");
    assert_eq!(secrets[0]["secret"], "bc-secret");
    assert_eq!(secrets[0]["version"], "v1");
    assert_eq!(secrets[0]["expires"], "2030-01-01T00:00:00Z");
    // The vault's `exp` is the client secret's expiry date, with the usual warnings.
    let credentials = &status.json()["credentials"];
    assert_eq!(credentials[0]["credential"], "bc", "{text}");
    assert_eq!(credentials[0]["entry"], "client_secret");
    assert_eq!(credentials[0]["expires"], "2030-01-01T00:00:00Z");
    // The page itself shows the version.
    let page = get(proxy.admin, "/").await.text();
    assert!(page.contains("<code>v1</code>"), "{page}");
    assert!(!page.contains(OLD));
    proxy.handle.shutdown().await;
}

#[tokio::test]
async fn a_challenge_for_a_foreign_resource_gets_no_token() {
    let setup = Setup::start(&[OLD]).await;
    setup.vault.put("bc-secret", OLD, "v1", None);
    setup.vault.set_challenge("https://evil.example");
    let error = load(setup.yaml("client_secret: ${secret:kv/bc-secret}"))
        .await
        .expect_err("refused");
    let text = error.to_string();
    assert!(
        text.contains("credentials.bc.client_secret: store `kv`: the vault's authentication challenge names `https://evil.example`, which is not the vault's domain"),
        "{text}"
    );
    assert_eq!(setup.identity.calls(), 0, "a token was requested");
    assert!(
        setup
            .vault
            .requests()
            .iter()
            .all(|r| r.authorization.is_none()),
        "a token was sent"
    );
}

#[tokio::test]
async fn a_missing_secret_is_a_startup_error_naming_store_and_secret() {
    let setup = Setup::start(&[OLD]).await;
    let error = load(setup.yaml("client_secret: ${secret:kv/bc-secret}"))
        .await
        .expect_err("refused");
    assert_eq!(
        error
            .problems()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["credentials.bc.client_secret: secret `bc-secret` not found in store `kv`"]
    );
}

/// `check` reads the vault as start-up does: a missing secret fails it, a present one
/// passes, and the value is printed in neither case; `doctor` shows version and expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_doctor_read_the_vault_and_never_print_the_secret() {
    let setup = Setup::start(&[OLD]).await;
    let path = setup.dir.write(
        "proxy.yaml",
        &setup.yaml("client_secret: ${secret:kv/bc-secret}"),
    );
    let check = || {
        let mut command = cli::command(["check", "--config"]);
        command.arg(&path).envs(vars());
        cli::run_to_end(command, None)
    };
    let missing = check().await;
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(
        missing
            .all()
            .contains("secret `bc-secret` not found in store `kv`"),
        "{missing:?}"
    );
    setup.vault.put("bc-secret", OLD, "v1", None);
    let ok = check().await;
    assert_eq!(ok.code, Some(0), "{ok:?}");
    assert!(!ok.all().contains(OLD), "{ok:?}");
    assert!(!missing.all().contains(OLD));

    // `doctor` names the version and expiry it read, not the value.
    setup.vault.put("bc-secret", OLD, "v7", Some(1_893_456_000));
    let mut command = cli::command(["doctor", "--config"]);
    command.arg(&path).envs(vars());
    let doctor = cli::run_to_end(command, None).await;
    assert_eq!(doctor.code, Some(0), "{doctor:?}");
    assert!(
        doctor
            .stdout
            .contains("secret kv/bc-secret: version v7, expires 2030-01-01T00:00:00Z"),
        "{doctor:?}"
    );
    assert!(!doctor.all().contains(OLD), "{doctor:?}");
}

// ---------------------------------------------------------------------------------------
// Rotation

/// A new version in the vault reaches the token endpoint within `refresh`, and requests
/// running all along never fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_is_used_at_once_and_no_request_fails() {
    let setup = Setup::start(&[OLD, NEW]).await;
    setup.vault.put("bc-secret", OLD, "v1", None);
    let config = load(setup.yaml("client_secret: ${secret:kv/bc-secret}"))
        .await
        .expect("loads");
    let proxy = spawn_ops_proxy(config, None).await;
    assert_eq!(bc_get(proxy.handle.addr).await.status, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let addr = proxy.handle.addr;
    let traffic = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(bc_get(addr).await.status);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };
    // The old secret stops working as soon as the new one exists: the proxy must have
    // switched before a token is needed again.
    setup.vault.put("bc-secret", NEW, "v2", None);
    setup.bc.accept_only(&[NEW]);
    eventually(
        Duration::from_secs(20),
        "the new secret at the token endpoint",
        || {
            let seen = setup.bc.seen();
            async move { seen.contains(&NEW.to_owned()).then_some(()) }
        },
    )
    .await;
    // And the upstream gets the token issued for it.
    eventually(Duration::from_secs(20), "the new token upstream", || {
        let recorded = setup.upstream.requests();
        async move {
            (recorded.last()?.header("authorization") == Some("Bearer bc-tok-2")).then_some(())
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let statuses = traffic.await.unwrap();
    assert!(!statuses.is_empty());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // The new token was fetched with the new secret only (no try with the old one).
    assert_eq!(setup.bc.seen(), [OLD, NEW]);

    let metrics = get(proxy.admin, "/metrics").await.text();
    let updated = metric(
        &metrics,
        r#"s2s_proxy_secret_refreshes_total{store="kv",outcome="updated"}"#,
    );
    assert_eq!(updated, Some(1.0), "{metrics}");
    // Not a configuration reload.
    assert_eq!(
        metric(&metrics, r#"s2s_proxy_config_reloads_total{outcome="ok"}"#),
        Some(0.0)
    );
    assert!(!metrics.contains(OLD) && !metrics.contains(NEW));
    proxy.handle.shutdown().await;
}

/// A configuration reload (SIGHUP, a changed file) reads the vault again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_vault_again() {
    use sha2::Digest as _;
    let setup = Setup::start(&[OLD, NEW]).await;
    setup.vault.put("bc-secret", OLD, "v1", None);
    // Read from the file with the process environment: the password as its digest.
    let digest = hex(&sha2::Sha256::digest(PASSWORD.as_bytes()));
    let yaml = setup
        .yaml("client_secret: ${secret:kv/bc-secret}")
        .replace("${ERP_PASSWORD}", &format!("sha256:{digest}"))
        .replace("refresh: 1s", "refresh: 1h");
    let path = setup.dir.write("proxy.yaml", &yaml);
    let config = tokio::task::spawn_blocking({
        let path = path.clone();
        move || Config::load(&path)
    })
    .await
    .unwrap()
    .expect("loads");
    let proxy = spawn_ops_proxy(config, Some(&path)).await;
    assert_eq!(bc_get(proxy.handle.addr).await.status, 200);

    setup.vault.put("bc-secret", NEW, "v2", None);
    let reload = proxy.reload.clone();
    tokio::task::spawn_blocking(move || reload.reload())
        .await
        .unwrap()
        .expect("reloads");
    assert_eq!(bc_get(proxy.handle.addr).await.status, 200);
    assert_eq!(setup.bc.seen(), [OLD, NEW]);
    proxy.handle.shutdown().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An inbound API key from the vault: a new version admits the new key and refuses the
/// old one within `refresh`, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_from_the_vault_rotates_too() {
    let setup = Setup::start(&[OLD]).await;
    setup.vault.put("bc-secret", OLD, "v1", None);
    setup.vault.put("scanner-key", "key_CANARY_one", "k1", None);
    let yaml = setup
        .yaml("client_secret: ${secret:kv/bc-secret}")
        .replace(
            "clients:\n  erp:",
            "clients:\n  scanner:\n    api_key: ${secret:kv/scanner-key}\n  erp:",
        )
        .replace("clients: [erp]", "clients: [erp, scanner]");
    let config = load(yaml).await.expect("loads");
    let proxy = spawn_ops_proxy(config, None).await;
    let with_key = |key: &'static str| {
        let addr = proxy.handle.addr;
        async move {
            send(addr, "GET", "/bc/companies", &[("x-api-key", key)], "")
                .await
                .status
        }
    };
    assert_eq!(with_key("key_CANARY_one").await, 200);
    assert_eq!(with_key("key_CANARY_two").await, 401);
    setup.vault.put("scanner-key", "key_CANARY_two", "k2", None);
    // Waiting on the metric, not on refused attempts (which count towards the lockout).
    eventually(Duration::from_secs(20), "the new version read", || {
        let admin = proxy.admin;
        async move {
            let text = get(admin, "/metrics").await.text();
            metric(
                &text,
                r#"s2s_proxy_secret_refreshes_total{store="kv",outcome="updated"}"#,
            )
            .filter(|n| *n >= 1.0)
        }
    })
    .await;
    // Applied right after the read, off the serving threads.
    eventually(Duration::from_secs(10), "the new key admitted", || async {
        (with_key("key_CANARY_two").await == 200).then_some(())
    })
    .await;
    assert_eq!(with_key("key_CANARY_one").await, 401);
    proxy.handle.shutdown().await;
}

/// `client_secrets: [${secret:kv/new}, ${secret:kv/old}]` works through the overlap
/// window like file-based rotation: the new secret first, the old one while Entra does
/// not take the new one yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_list_from_the_vault_falls_back_to_the_old_secret() {
    let setup = Setup::start(&[OLD]).await;
    setup.vault.put("new", NEW, "n1", None);
    setup.vault.put("old", OLD, "o1", None);
    let config = load(setup.yaml("client_secrets: [\"${secret:kv/new}\", \"${secret:kv/old}\"]"))
        .await
        .expect("loads");
    let proxy = spawn_ops_proxy(config, None).await;
    let answer = bc_get(proxy.handle.addr).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(setup.bc.seen(), [NEW, OLD]);
    proxy.handle.shutdown().await;
}

/// `certificate_file: ${secret:kv/NAME}`: a Key Vault certificate's secret (PEM: the
/// certificate and its key) signs the client assertion; no file is read.
#[tokio::test]
async fn a_certificate_from_the_vault_signs_the_client_assertion() {
    use base64::Engine as _;
    let setup = Setup::start(&[OLD]).await;
    setup.vault.put("bc-secret", OLD, "v1", None);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["fo-app".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let pem = format!("{}{}", key.serialize_pem(), cert.pem());
    setup.vault.put("fo-cert", &pem, "c1", None);
    let yaml = setup
        .yaml("client_secret: ${secret:kv/bc-secret}")
        .replacen(
            "clients:\n",
            &format!(
                "  fo:\n    type: client_certificate\n    token_url: {}/fo/token\n    \
                 client_id: fo-app\n    certificate_file: ${{secret:kv/fo-cert}}\n    \
                 assertion_alg: ES256\nclients:\n",
                setup.identity.authority()
            ),
            1,
        )
        + &format!(
            "  - prefix: /fo/\n    upstream: {}/fo/\n    credential: fo\n    \
             scope: api://fo/.default\n    clients: [erp]\n",
            setup.upstream.base()
        );
    let config = load(yaml).await.expect("loads");
    let proxy = spawn_ops_proxy(config, None).await;
    let (name, value) = erp();
    let answer = send(proxy.handle.addr, "GET", "/fo/x", &[(name, &value)], "").await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let request = setup
        .identity
        .requests()
        .into_iter()
        .find(|r| r.path == "/fo/token")
        .expect("a token request for fo");
    let assertion = request
        .form
        .iter()
        .find(|(k, _)| k == "client_assertion")
        .map(|(_, v)| v.clone())
        .expect("a client assertion");
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(assertion.split('.').next().unwrap())
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    use sha2::Digest as _;
    let thumbprint =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(cert.der()));
    assert_eq!(header["x5t#S256"], thumbprint.as_str(), "{header}");
    proxy.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Outages

/// A vault that fails, then stalls, during refresh: the last value stays, requests keep
/// working, the outage is logged once and its recovery once, every read is counted, and
/// the secret appears in no log line, metric or answer.
#[test]
fn a_failing_or_slow_vault_keeps_the_last_value_and_logs_once() {
    let ((), logs) = capture_logs(async {
        let setup = Setup::start(&[OLD]).await;
        setup.vault.put("bc-secret", OLD, "v1", None);
        let config = load(setup.yaml("client_secret: ${secret:kv/bc-secret}"))
            .await
            .expect("loads");
        let proxy = spawn_ops_proxy(config, None).await;
        let failed = |text: &str| {
            metric(
                text,
                r#"s2s_proxy_secret_refreshes_total{store="kv",outcome="failed"}"#,
            )
            .unwrap_or(0.0)
        };

        setup.vault.set_mode(VaultMode::Fail(500));
        eventually(Duration::from_secs(20), "two failed refreshes", || {
            let admin = proxy.admin;
            async move { (failed(&get(admin, "/metrics").await.text()) >= 2.0).then_some(()) }
        })
        .await;
        assert_eq!(bc_get(proxy.handle.addr).await.status, 200);

        // A vault that does not answer is cut off by the refresh's bound (2 s here).
        setup.vault.set_mode(VaultMode::Stall);
        let before = failed(&get(proxy.admin, "/metrics").await.text());
        eventually(Duration::from_secs(30), "a timed-out refresh", || {
            let admin = proxy.admin;
            async move { (failed(&get(admin, "/metrics").await.text()) > before).then_some(()) }
        })
        .await;
        let answer = bc_get(proxy.handle.addr).await;
        assert_eq!(answer.status, 200);

        setup.vault.set_mode(VaultMode::Serve);
        eventually(Duration::from_secs(20), "an unchanged refresh", || {
            let admin = proxy.admin;
            async move {
                let text = get(admin, "/metrics").await.text();
                metric(
                    &text,
                    r#"s2s_proxy_secret_refreshes_total{store="kv",outcome="unchanged"}"#,
                )
                .filter(|n| *n >= 1.0)
            }
        })
        .await;
        let metrics = get(proxy.admin, "/metrics").await.text();
        assert!(!metrics.contains(OLD), "{metrics}");
        assert_eq!(setup.bc.seen(), [OLD], "the token was not fetched again");
        // An error body of the proxy (wrong caller) holds no secret either.
        let refused = send(proxy.handle.addr, "GET", "/bc/x", &[], "").await;
        assert_eq!(refused.status, 401);
        assert!(!refused.text().contains(OLD));
        proxy.handle.shutdown().await;
    });
    let text = logs.text();
    assert_eq!(
        text.matches("Secret store refresh failed; keeping the last values.")
            .count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("Secret store readable again.").count(),
        1,
        "{text}"
    );
    assert!(!text.contains(OLD), "the secret was logged: {text}");
    assert!(!text.contains("Bearer tok-"), "a vault token was logged");
}

// ---------------------------------------------------------------------------------------
// Configuration

fn problems(yaml: &str) -> Vec<String> {
    Config::validate_yaml_str(yaml, &Source::inline("test.yaml", vars()))
        .expect_err("invalid")
        .problems()
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[tokio::test]
async fn configuration_mistakes_are_problems_with_their_paths() {
    let setup = Setup::start(&[]).await;
    let good = setup.yaml("client_secret: ${secret:kv/bc-secret}");

    // An unknown store; a reference outside a secret field.
    let yaml = good.replace("${secret:kv/bc-secret}", "${secret:vault2/bc-secret}");
    assert_eq!(
        problems(&yaml),
        [
            "credentials.bc.client_secret: `${secret:vault2/bc-secret}`: secret store `vault2` is not defined in `secret_stores`"
        ]
    );
    let yaml = good.replace("client_id: app-1", "client_id: ${secret:kv/app-id}");
    let found = problems(&yaml);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with(
            "credentials.bc.client_id: `${secret:kv/app-id}` may stand only where a secret does"
        ),
        "{found:?}"
    );

    // Plain http to a vault that is not on loopback.
    let yaml = good.replace(&setup.vault.url(), "http://contoso-kv.vault.azure.net");
    assert_eq!(
        problems(&yaml),
        [
            "secret_stores.kv.url: must be https:// (plain http only on loopback hosts): the proxy sends a token to the vault"
        ]
    );

    // The checks every configured URL gets: the vault receives a token.
    for (url, expected) in [
        (
            "https://user:pw@contoso-kv.vault.azure.net",
            "must not contain user info",
        ),
        ("https://169.254.169.254", "is link-local"),
        (
            "https://contoso-kv.vault.azure.net/secrets",
            "without a path or query",
        ),
    ] {
        let found = problems(&good.replace(&setup.vault.url(), url));
        assert_eq!(found.len(), 1, "{url}: {found:?}");
        assert!(
            found[0].starts_with("secret_stores.kv.url: ") && found[0].contains(expected),
            "{url}: {found:?}"
        );
        assert!(!found[0].contains("pw@"), "{found:?}");
    }

    // The store's credential must be able to read a vault without a stored secret.
    let yaml = good.replace("credential: pod", "credential: bc");
    let found = problems(&yaml);
    assert!(
        found[0].starts_with("secret_stores.kv.credential: credential `bc` is a client_secret"),
        "{found:?}"
    );
    let yaml = good.replace(
        "    type: workload_identity",
        "    type: client_certificate\n    certificate_file: cert.pfx\n    certificate_password: ${secret:kv/pfx-password}",
    );
    let yaml = yaml.replace(
        &format!(
            "    token_file: {}\n",
            setup.dir.path().join("federated-token").display()
        ),
        "",
    );
    setup.dir.write("cert.pfx", "not read in stage one");
    let yaml = yaml.replace(
        "certificate_file: cert.pfx",
        &format!(
            "certificate_file: {}",
            setup.dir.path().join("cert.pfx").display()
        ),
    );
    let found = problems(&yaml);
    assert!(
        found.iter().any(|p| p.starts_with(
            "secret_stores.kv.credential: credential `pod` takes `credentials.pod.certificate_password` from a secret store"
        )),
        "{found:?}"
    );
}
