//! Loader tests: whole documents in, `Config` or the exact problems out. The golden
//! messages here are what `s2s-proxy check` prints; change them deliberately.

use super::*;
use crate::test_support::TempDir;

const SECRET: &str = "cs_CANARY_7f3a";
const PASSWORD: &str = "pw_CANARY_19c2";
const API_KEY: &str = "ak_CANARY_55e0";
/// A real RSA certificate and key (test-only, generated with `openssl req -x509`).
const CERT_PEM: &str = include_str!("../../tests/fixtures/creds/a.pem");

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn default_vars() -> HashMap<String, String> {
    vars(&[
        ("SECRET", SECRET),
        ("ERP_PASSWORD", PASSWORD),
        ("WAREHOUSE_KEY", API_KEY),
    ])
}

fn load_with(yaml: &str, variables: HashMap<String, String>) -> Result<Config, ConfigError> {
    Config::from_yaml_str(yaml, &Source::inline("proxy.yaml", variables))
}

fn load(yaml: &str) -> Result<Config, ConfigError> {
    load_with(yaml, default_vars())
}

/// The text `s2s-proxy check` prints; never contains a canary.
fn error_text(yaml: &str) -> String {
    let text = load(yaml).expect_err("config must be rejected").to_string();
    for canary in [SECRET, PASSWORD, API_KEY] {
        assert!(!text.contains(canary), "secret in error text: {text}");
    }
    text
}

fn problems(yaml: &str) -> Vec<String> {
    match load(yaml).expect_err("config must be rejected") {
        ConfigError::Invalid { problems, .. } => problems.iter().map(ToString::to_string).collect(),
        other => panic!("expected validation problems, got: {other}"),
    }
}

/// One problem, as `path: message`.
fn problem(yaml: &str) -> String {
    let found = problems(yaml);
    assert_eq!(found.len(), 1, "{found:#?}");
    found.into_iter().next().unwrap_or_default()
}

const CREDENTIALS: &str = r#"
credentials:
  bc:
    type: client_secret
    tenant_id: contoso.onmicrosoft.com
    client_id: 11111111-2222-3333-4444-555555555555
    client_secret: ${SECRET}
  partner:
    type: client_secret
    token_url: https://idp.partner.example/oauth2/token
    client_id: partner-app
    client_secret: ${SECRET}
"#;

const CLIENTS: &str = r#"
clients:
  erp:
    basic: { username: erp, password: "${ERP_PASSWORD}" }
  warehouse:
    api_key: ${WAREHOUSE_KEY}
"#;

/// A valid document around the given `routes:` section.
fn with_routes(routes: &str) -> String {
    format!("{CREDENTIALS}{CLIENTS}routes:\n{routes}")
}

fn one_route(upstream: &str, extra: &str) -> String {
    with_routes(&format!(
        "  - prefix: /bc/\n    upstream: {upstream}\n    credential: bc\n    clients: [erp]\n{extra}"
    ))
}

/// The configuration source of a file in `dir`.
fn source_in(dir: &TempDir, variables: HashMap<String, String>) -> Source {
    Source {
        name: "proxy.yaml".to_owned(),
        base_dir: dir.path().to_owned(),
        variables: Variables::map(variables),
    }
}

// ---------------------------------------------------------------------------------------
// The full example

/// A `proxy.yaml` using every section and credential type, with `upstream_ca_file` a temp file.
const DESIGN_EXAMPLE: &str = r#"
server:
  listen: 0.0.0.0:8080              # default 127.0.0.1:8080
  public_url: https://erp-proxy.contoso.com   # optional: base URL clients see (link rewriting)
  trusted_proxies: [10.0.0.0/8]     # take client IP from X-Forwarded-For only from these
  upstream_ca_file: private-ca.pem  # optional: extra roots for private upstreams
  api_key_header: X-API-Key         # default
  workers: 2                        # default: one per core
  tls:                              # optional inbound TLS (rustls)
    cert_file: /etc/s2s-proxy/tls.crt
    key_file: /etc/s2s-proxy/tls.key
    client_ca_file: /etc/s2s-proxy/clients-ca.pem   # optional: verify client certificates
  limits:                           # defaults shown
    max_header_bytes: 32768
    max_body_bytes: 367001600       # 350 MiB (Business Central's own limit), 413 beyond
    header_read_timeout: 10s
    request_timeout: 600s           # whole exchange, 504 beyond (BC allows 8-10 min)
    max_connections: 10000
admin:
  listen: 127.0.0.1:9090            # /metrics /healthz /readyz; off when absent

credentials:                        # service-to-service identities, by name
  bc:
    type: client_secret             # Entra ID app: tenant + client id + secret (the seed's S2S)
    tenant_id: ${BC_TENANT_ID}
    client_id: ${BC_CLIENT_ID}
    client_secret: ${BC_CLIENT_SECRET}
    authority: https://login.microsoftonline.com   # default; sovereign clouds override
  fo-cert:
    type: client_certificate        # Entra ID app with a certificate (signed client assertion)
    tenant_id: ${TENANT_ID}
    client_id: ${FO_CLIENT_ID}
    certificate_file: /run/secrets/fo.pem          # PEM: certificate and private key
  partner:
    type: client_secret             # any RFC 6749 server: token_url instead of tenant_id
    token_url: https://idp.partner.example/oauth2/token
    client_id: ${PARTNER_ID}
    client_secret: ${PARTNER_SECRET}
    auth_method: client_secret_basic   # or client_secret_post (default)
    params: { audience: https://api.partner.example }   # extra form fields
  pod:
    type: managed_identity          # Azure VM (IMDS), App Service / Functions; client_id optional
  aks:
    type: workload_identity         # AKS: AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_FEDERATED_TOKEN_FILE

clients:                            # who may call the proxy
  erp-sync:                         # password: "sha256:<hex>" (`s2s-proxy hash-secret`),
    basic: { username: erp-sync, password: "sha256:9f86d0…" }   # or wholly "${VAR}"/"${file:…}"
  warehouse:
    api_key: ${WAREHOUSE_KEY}       # sent as X-API-Key (server.api_key_header to change)
    networks: [192.168.10.0/24]     # optional: also require this source network
    rate_limit: 6000/5m             # optional: 429 + Retry-After beyond (also 100/s, 20/m)
  plant-floor:
    networks: [10.20.0.0/16]        # no credential: anyone from these networks
  edi:
    certificate: { subject_cn: edi.contoso.com }   # or fingerprint_sha256; needs tls.client_ca_file

routes:
  - prefix: /bc/
    upstream: https://api.businesscentral.dynamics.com/v2.0/${BC_TENANT_ID}/Production/
    credential: bc
    scope: https://api.businesscentral.dynamics.com/.default   # default: https://<upstream host>/.default
    clients: [erp-sync, warehouse]
    timeout: 9m                     # default: server.limits.request_timeout
    rewrite_links: true             # upstream absolute URLs in bodies/Location -> proxy URLs
    max_concurrent: 5               # BC processes 5 per app at once; queue beyond that
    max_queue: 95                   # BC's own queue size; 503 + Retry-After when full
    queue_timeout: 60s              # longest wait in the queue; 503 + Retry-After beyond
    retry_on_429: { attempts: 3, max_wait: 30s }
  - prefix: /bc-sandbox/            # preset form: URL, scope and BC defaults derived
    upstream: { businesscentral: { tenant: "${BC_TENANT_ID}", environment: Sandbox } }
    credential: bc
    clients: [erp-sync]
  - prefix: /crm/
    upstream: https://contoso.crm4.dynamics.com/api/data/v9.2/
    credential: bc
    clients: [plant-floor]
"#;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

fn design_vars() -> HashMap<String, String> {
    vars(&[
        ("BC_TENANT_ID", TENANT),
        ("BC_CLIENT_ID", "bc-app"),
        ("BC_CLIENT_SECRET", SECRET),
        ("TENANT_ID", TENANT),
        ("FO_CLIENT_ID", "fo-app"),
        ("PARTNER_ID", "partner-app"),
        ("PARTNER_SECRET", SECRET),
        ("WAREHOUSE_KEY", API_KEY),
        // What the AKS workload identity webhook injects.
        ("AZURE_TENANT_ID", TENANT),
        ("AZURE_CLIENT_ID", "aks-app"),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            "/var/run/secrets/azure/tokens/azure-identity-token",
        ),
    ])
}

/// The example without what later releases bring, and with a real hash.
fn design_example_supported() -> String {
    let mut kept = Vec::new();
    let mut skip_indent: Option<usize> = None;
    for line in DESIGN_EXAMPLE.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(level) = skip_indent {
            if indent > level || line.trim().is_empty() {
                continue;
            }
            skip_indent = None;
        }
        let key = line.trim_start().trim_start_matches("- ");
        let drop_block = ["tls:", "fo-cert:", "pod:", "aks:", "rate_limit:", "edi:"];
        if drop_block.iter().any(|k| key.starts_with(k)) {
            skip_indent = Some(indent);
            continue;
        }
        kept.push(line.replace(
            "sha256:9f86d0…",
            &SecretDigest::of(b"test").to_config_form(),
        ));
    }
    kept.join("\n")
}

#[test]
fn design_example_loads_without_the_parts_of_later_releases() {
    let dir = TempDir::new("config");
    dir.write("private-ca.pem", CERT_PEM);
    let yaml = design_example_supported();
    let config = Config::from_yaml_str(&yaml, &source_in(&dir, design_vars()))
        .unwrap_or_else(|e| panic!("{e}\n---\n{yaml}"));

    let server = &config.server;
    assert_eq!(server.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(
        server
            .public_url
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("https://erp-proxy.contoso.com/")
    );
    assert_eq!(
        server.trusted_proxies,
        ["10.0.0.0/8".parse::<IpNet>().unwrap()]
    );
    assert_eq!(
        server.upstream_ca_file,
        Some(dir.path().join("private-ca.pem"))
    );
    assert_eq!(server.api_key_header, "x-api-key");
    assert_eq!(server.workers, Some(2));
    assert!(server.tls.is_none());
    assert_eq!(server.limits.max_body_bytes, 367_001_600);
    assert_eq!(server.limits.request_timeout, Duration::from_secs(600));
    assert_eq!(
        config.admin.as_ref().map(|a| a.listen),
        Some("127.0.0.1:9090".parse().unwrap())
    );

    let names: Vec<&str> = config.credentials.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["bc", "partner"]);
    let Some(CredentialKind::ClientSecret(bc)) = config.credential("bc").map(|c| &c.kind) else {
        panic!("bc is a client secret");
    };
    assert_eq!(
        bc.endpoint.url().to_string(),
        format!("https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token")
    );
    assert_eq!(bc.client_id, "bc-app");
    assert_eq!(bc.client_secrets[0].value.expose(), SECRET);
    assert_eq!(bc.auth_method, ClientAuthMethod::Post);
    let Some(CredentialKind::ClientSecret(partner)) = config.credential("partner").map(|c| &c.kind)
    else {
        panic!("partner is a client secret");
    };
    assert!(!partner.endpoint.is_entra());
    assert_eq!(
        partner.endpoint.url().to_string(),
        "https://idp.partner.example/oauth2/token"
    );
    assert_eq!(partner.auth_method, ClientAuthMethod::Basic);
    assert_eq!(
        partner.params,
        [(
            "audience".to_owned(),
            "https://api.partner.example".to_owned()
        )]
    );

    let names: Vec<&str> = config.clients.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["erp-sync", "warehouse", "plant-floor"]);
    let erp = config.clients[0].basic.as_ref().expect("basic");
    assert_eq!(erp.username, "erp-sync");
    assert!(erp.password.matches(&Secret::new("test").digest()));
    let warehouse = &config.clients[1];
    assert!(
        warehouse
            .api_key
            .expect("key")
            .matches(&Secret::new(API_KEY).digest())
    );
    assert_eq!(
        warehouse.networks,
        ["192.168.10.0/24".parse::<IpNet>().unwrap()]
    );
    assert_eq!(
        config.clients[2].networks,
        ["10.20.0.0/16".parse::<IpNet>().unwrap()]
    );

    assert_eq!(config.routes.len(), 3);
    let bc_route = config.route("/bc/").expect("/bc/");
    assert_eq!(
        bc_route.upstream.url.to_string(),
        format!("https://api.businesscentral.dynamics.com/v2.0/{TENANT}/Production/")
    );
    assert_eq!(bc_route.upstream.host, "api.businesscentral.dynamics.com");
    assert_eq!(
        bc_route.scope.as_deref(),
        Some("https://api.businesscentral.dynamics.com/.default")
    );
    assert_eq!(bc_route.clients, ["erp-sync", "warehouse"]);
    assert_eq!(bc_route.timeout, Duration::from_secs(540));
    assert!(bc_route.rewrite_links);
    assert_eq!(bc_route.max_concurrent, Some(5));
    assert_eq!(bc_route.max_queue, Some(95));
    assert_eq!(bc_route.queue_timeout, Some(Duration::from_secs(60)));
    assert_eq!(
        bc_route.retry_on_429,
        Some(RetryOn429 {
            attempts: 3,
            max_wait: Duration::from_secs(30)
        })
    );
    assert_eq!(bc_route.preset, None);
    let sandbox = config.route("/bc-sandbox/").expect("/bc-sandbox/");
    assert_eq!(sandbox.preset, Some(Preset::BusinessCentral));
    assert_eq!(
        sandbox.upstream.url.to_string(),
        format!("https://api.businesscentral.dynamics.com/v2.0/{TENANT}/Sandbox/")
    );
    assert_eq!(
        sandbox.scope.as_deref(),
        Some("https://api.businesscentral.dynamics.com/.default")
    );
    assert_eq!(sandbox.timeout, Duration::from_secs(540));
    assert!(sandbox.rewrite_links);
    assert_eq!(
        (
            sandbox.max_concurrent,
            sandbox.max_queue,
            sandbox.queue_timeout
        ),
        (Some(5), Some(95), Some(Duration::from_secs(60)))
    );
    assert_eq!(sandbox.retry_on_429, bc_route.retry_on_429);
    let crm = config.route("/crm/").expect("/crm/");
    assert_eq!(crm.upstream.base_path, "/api/data/v9.2/");
    assert_eq!(crm.upstream.scheme, http::uri::Scheme::HTTPS);
    assert_eq!(crm.upstream.authority, "contoso.crm4.dynamics.com");
    assert_eq!(
        crm.scope.as_deref(),
        Some("https://contoso.crm4.dynamics.com/.default")
    );
    assert_eq!(crm.timeout, Duration::from_secs(600));
}

/// Golden: the example as written (files made to exist). Everything of later releases is
/// validated, then refused; the shortened hash is the one real mistake.
#[test]
fn design_example_as_written_reports_every_problem() {
    let dir = TempDir::new("config");
    dir.write("private-ca.pem", CERT_PEM);
    write_server_tls(&dir);
    dir.write("fo.pem", CERT_PEM);
    let yaml = DESIGN_EXAMPLE
        .replace("/etc/s2s-proxy/", "")
        .replace("/run/secrets/", "");
    let error = Config::from_yaml_str(&yaml, &source_in(&dir, design_vars()))
        .expect_err("later-release settings are refused");
    let text = error.to_string();
    assert!(!text.contains(SECRET) && !text.contains(API_KEY));
    assert_eq!(
        text,
        concat!(
            "proxy.yaml: 1 problem:\n",
            "  - clients.erp-sync.basic.password: a `sha256:` value needs exactly 64 hex digits; get it from `s2s-proxy hash-secret`",
        )
    );
}

// ---------------------------------------------------------------------------------------
// Syntax and schema

#[test]
fn unknown_field_names_the_path_and_line() {
    let yaml = "routes:\n  - prefix: /bc/\n    upstrem: https://example.com/\n";
    let error = load(yaml).expect_err("unknown field");
    let ConfigError::Syntax {
        location, message, ..
    } = &error
    else {
        panic!("expected a syntax error, got {error}");
    };
    assert_eq!(*location, Some((3, 5)));
    assert!(
        message.starts_with(
            "routes[0]: unknown field `upstrem`, expected one of `prefix`, `upstream`"
        ),
        "{message}"
    );
    assert!(!message.contains(" at line "), "{message}");
    assert!(
        error
            .to_string()
            .starts_with("proxy.yaml:3:5: routes[0]: unknown field `upstrem`")
    );
}

#[test]
fn unknown_field_in_a_credential_names_the_credential_and_its_line() {
    let yaml = format!("{CREDENTIALS}  typo:\n    type: client_secret\n    token_ulr: x\n");
    assert_eq!(
        load(&yaml).expect_err("unknown field").to_string(),
        "proxy.yaml:13:3: credentials.typo: unknown field `token_ulr`, expected one of \
         `tenant_id`, `token_url`, `authority`, `cloud`, `client_id`, `client_secret`, \
         `client_secrets`, `expires`, `auth_method`, `params`"
    );
    let error = load("credentials:\n  bc:\n    type: client_secrett\n").expect_err("bad type");
    assert_eq!(
        error.to_string(),
        "proxy.yaml:2:3: credentials.bc: unknown variant `client_secrett`, expected one of \
         `client_secret`, `client_certificate`, `managed_identity`, `workload_identity`"
    );
}

#[test]
fn credential_error_lines_skip_nested_keys_of_the_same_name() {
    let yaml = "credentials:\n  a:\n    type: client_secret\n    params:\n      b: x\n  b:\n    type: nope\n";
    let error = load(yaml).expect_err("bad type");
    assert!(
        matches!(
            error,
            ConfigError::Syntax {
                location: Some((6, 3)),
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_number_where_a_secret_belongs_is_not_echoed() {
    let yaml = "credentials:\n  bc:\n    type: client_secret\n    client_secret: 987654321\n";
    let text = load(yaml).expect_err("not a string").to_string();
    assert_eq!(
        text,
        "proxy.yaml:2:3: credentials.bc: expected a string, found a number or boolean; put the \
         value in quotes"
    );
}

#[test]
fn syntax_errors_and_empty_documents() {
    let error = load("routes: [\n").expect_err("syntax");
    assert!(
        matches!(
            error,
            ConfigError::Syntax {
                location: Some((2, 1)),
                ..
            }
        ),
        "{error}"
    );
    for empty in ["", "\n  \n", "# only a comment\n---\n"] {
        assert_eq!(
            load(empty).expect_err("empty").to_string(),
            "proxy.yaml: the document is empty; a configuration needs at least `credentials`, \
             `clients` and `routes`"
        );
    }
    assert_eq!(
        load("- a\n").expect_err("not a mapping").to_string(),
        "proxy.yaml:1:1: invalid type: sequence, expected a mapping with `server`, `admin`, \
         `credentials`, `clients` and `routes`"
    );
}

#[test]
fn duplicate_names_are_refused() {
    let yaml = "clients:\n  a:\n    networks: [10.0.0.0/8]\n  a:\n    networks: [10.0.0.0/8]\n";
    assert!(
        load(yaml)
            .expect_err("duplicate")
            .to_string()
            .contains("clients: `a` is defined twice")
    );
}

// ---------------------------------------------------------------------------------------
// Variables and files

#[test]
fn unset_variable_names_the_variable_and_the_path() {
    let yaml = one_route("https://example.com/${UPSTREAM_TENANT}/", "");
    assert_eq!(
        problem(&yaml),
        "routes[0].upstream: environment variable `UPSTREAM_TENANT` is not set; set it or \
         change this value"
    );
}

#[test]
fn empty_secret_variable_is_refused() {
    let mut variables = default_vars();
    variables.insert("SECRET".to_owned(), "  ".to_owned());
    variables.insert("ERP_PASSWORD".to_owned(), String::new());
    let error = load_with(&one_route("https://example.com/", ""), variables).expect_err("empty");
    assert_eq!(
        error.problems(),
        [
            Problem {
                path: "credentials.bc.client_secret".to_owned(),
                message: "`${SECRET}` is empty; it must hold the value".to_owned(),
            },
            Problem {
                path: "credentials.partner.client_secret".to_owned(),
                message: "`${SECRET}` is empty; it must hold the value".to_owned(),
            },
            Problem {
                path: "clients.erp.basic.password".to_owned(),
                message: "`${ERP_PASSWORD}` is empty; it must hold the value".to_owned(),
            },
        ]
    );
}

#[test]
fn file_references_are_trimmed_and_relative_to_the_config() {
    let dir = TempDir::new("config");
    dir.write("client-secret", &format!("{SECRET}\r\n"));
    std::fs::create_dir(dir.path().join("keys")).expect("mkdir");
    dir.write("keys/warehouse", &format!("{API_KEY}\n"));
    let yaml = one_route("https://example.com/", "")
        .replace("${SECRET}", "${file:client-secret}")
        .replace("${WAREHOUSE_KEY}", "${file:keys/warehouse}");
    let config = Config::from_yaml_str(&yaml, &source_in(&dir, default_vars())).expect("valid");
    let Some(CredentialKind::ClientSecret(bc)) = config.credential("bc").map(|c| &c.kind) else {
        panic!("bc is a client secret");
    };
    assert_eq!(bc.client_secrets[0].value.expose(), SECRET);
    let key = config.clients[1].api_key.expect("api key");
    assert!(key.matches(&Secret::new(API_KEY).digest()));
}

#[test]
fn empty_or_missing_secret_file_is_refused() {
    let dir = TempDir::new("config");
    dir.write("empty", "\n");
    let yaml = one_route("https://example.com/", "")
        .replacen("${SECRET}", "${file:empty}", 1)
        .replace("${WAREHOUSE_KEY}", "${file:missing}");
    let error =
        Config::from_yaml_str(&yaml, &source_in(&dir, default_vars())).expect_err("refused");
    assert_eq!(
        error.problems(),
        [
            Problem {
                path: "credentials.bc.client_secret".to_owned(),
                message: "`${file:empty}` is empty; it must hold the value".to_owned(),
            },
            Problem {
                path: "clients.warehouse.api_key".to_owned(),
                message: format!(
                    "cannot read {}: No such file or directory (os error 2)",
                    dir.path().join("missing").display()
                ),
            },
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Inbound secrets

#[test]
fn plaintext_password_is_refused() {
    let yaml = one_route("https://example.com/", "").replace("${ERP_PASSWORD}", PASSWORD);
    assert_eq!(
        error_text(&yaml),
        "proxy.yaml: 1 problem:\n  - clients.erp.basic.password: a plaintext password must not \
         be written into the YAML; use `s2s-proxy hash-secret` to get its sha256: form, or \
         ${VAR} / ${file:PATH}"
    );
    let yaml = one_route("https://example.com/", "").replace("${ERP_PASSWORD}", "x${ERP_PASSWORD}");
    assert_eq!(
        problem(&yaml),
        "clients.erp.basic.password: must be wholly one ${VAR} or ${file:PATH}, not mixed with \
         other text, or a `sha256:` hash from `s2s-proxy hash-secret`"
    );
    let yaml = one_route("https://example.com/", "").replace("${WAREHOUSE_KEY}", API_KEY);
    assert!(problem(&yaml).starts_with("clients.warehouse.api_key: a plaintext password"));
}

#[test]
fn hashed_and_referenced_secrets_are_digested() {
    let hash = Secret::new(PASSWORD).digest().to_config_form();
    let config = load(&one_route("https://example.com/", "")).expect("valid");
    let by_variable = config.clients[0].basic.as_ref().expect("basic").password;
    assert!(by_variable.matches(&Secret::new(PASSWORD).digest()));
    assert!(!by_variable.matches(&Secret::new("other").digest()));

    let yaml = one_route("https://example.com/", "").replace("${ERP_PASSWORD}", &hash);
    let config = load(&yaml).expect("valid");
    let by_hash = config.clients[0].basic.as_ref().expect("basic").password;
    assert!(by_hash.matches(&Secret::new(PASSWORD).digest()));

    let upper = format!("sha256:{}", hash["sha256:".len()..].to_uppercase());
    let yaml = one_route("https://example.com/", "").replace("${ERP_PASSWORD}", &upper);
    assert!(load(&yaml).is_ok());
}

#[test]
fn usernames_and_api_keys_must_be_unique() {
    let yaml = format!(
        "{CREDENTIALS}{CLIENTS}  erp-2:\n    basic: {{ username: erp, password: \"${{ERP_PASSWORD}}\" }}\n    \
         api_key: ${{WAREHOUSE_KEY}}\nroutes: []\n"
    );
    assert_eq!(
        problems(&yaml),
        [
            "clients.erp-2.basic.username: `erp` is also the username of clients.erp; usernames \
             must be unique",
            "clients.erp-2.api_key: is the same key as clients.warehouse.api_key; give each \
             client its own key",
        ]
    );
}

/// A matching `tls.crt` and `tls.key`, and that certificate as `clients-ca.pem`: the
/// loader reads them as `run` does.
fn write_server_tls(dir: &TempDir) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    dir.write("tls.crt", &cert.pem());
    dir.write("tls.key", &key.serialize_pem());
    dir.write("clients-ca.pem", &cert.pem());
}

#[test]
fn certificate_clients_with_a_client_ca() {
    let dir = TempDir::new("config");
    write_server_tls(&dir);
    let fingerprint = ["ab"; 32].join(":");
    let yaml = format!(
        "server:\n  tls: {{ cert_file: tls.crt, key_file: tls.key, client_ca_file: clients-ca.pem }}\n\
         {CREDENTIALS}clients:\n  edi:\n    certificate: {{ subject_cn: edi.contoso.com }}\n  \
         pinned:\n    certificate: {{ fingerprint_sha256: \"{fingerprint}\" }}\nroutes: []\n"
    );
    let config = Config::from_yaml_str(
        &yaml,
        &source_in(
            &dir,
            HashMap::from([("SECRET".to_owned(), SECRET.to_owned())]),
        ),
    )
    .expect("valid");
    let tls = config.server.tls.as_ref().expect("tls");
    assert!(
        tls.client_ca_file
            .as_ref()
            .is_some_and(|p| p.ends_with("clients-ca.pem"))
    );
    assert_eq!(
        config.clients[0].certificate,
        Some(CertificateMatch::SubjectCn("edi.contoso.com".into()))
    );
    assert_eq!(
        config.clients[1].certificate,
        Some(CertificateMatch::FingerprintSha256([0xab; 32]))
    );

    let twice = yaml.replace(
        "routes: []",
        "  edi-2:\n    certificate: { subject_cn: edi.contoso.com }\nroutes: []",
    );
    let error = Config::from_yaml_str(
        &twice,
        &source_in(
            &dir,
            HashMap::from([("SECRET".to_owned(), SECRET.to_owned())]),
        ),
    )
    .expect_err("duplicate certificate clients");
    assert_eq!(
        error.problems()[0].to_string(),
        "clients.edi-2.certificate: matches the same certificates as clients.edi.certificate; \
         give each client its own"
    );
}

#[test]
fn a_client_must_say_how_it_is_recognised() {
    let yaml = format!("{CREDENTIALS}clients:\n  nobody: {{}}\n  empty:\n    networks: []\n");
    assert_eq!(
        problems(&yaml),
        [
            "clients.nobody: needs at least one of `basic`, `api_key`, `networks` or \
             `certificate` to say how it is recognised",
            "clients.empty: needs at least one of `basic`, `api_key`, `networks` or \
             `certificate` to say how it is recognised",
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Routes

#[test]
fn route_without_clients_is_refused() {
    let yaml = with_routes(
        "  - prefix: /a/\n    upstream: https://example.com/\n    credential: bc\n  \
         - prefix: /b/\n    upstream: https://example.com/\n    credential: bc\n    clients: []\n",
    );
    assert_eq!(
        problems(&yaml),
        [
            "routes[0].clients: a route needs at least one client; list the names under \
             `clients:` that may call it",
            "routes[1].clients: a route needs at least one client; list the names under \
             `clients:` that may call it",
        ]
    );
}

#[test]
fn unknown_credential_and_client_list_the_defined_names() {
    let yaml = with_routes(
        "  - prefix: /a/\n    upstream: https://example.com/\n    credential: bcc\n    \
         clients: [erp, wearhouse]\n",
    );
    assert_eq!(
        problems(&yaml),
        [
            "routes[0].credential: unknown credential `bcc`; defined credentials: `bc`, `partner`",
            "routes[0].clients[1]: unknown client `wearhouse`; defined clients: `erp`, `warehouse`",
        ]
    );
    let yaml = "routes:\n  - prefix: /a/\n    upstream: https://example.com/\n    credential: bc\n    clients: [erp]\n";
    assert_eq!(
        problems(yaml),
        [
            "routes[0].credential: unknown credential `bc`; no credentials are defined under `credentials:`",
            "routes[0].clients[0]: unknown client `erp`; no clients are defined under `clients:`",
        ]
    );
}

#[test]
fn duplicate_prefix_names_both_routes() {
    let route = "  - prefix: /bc/\n    upstream: https://example.com/\n    credential: bc\n    clients: [erp]\n";
    let other = "  - prefix: /other/\n    upstream: https://example.com/\n    credential: bc\n    clients: [erp]\n";
    let yaml = with_routes(&format!("{route}{other}{route}"));
    assert_eq!(
        problem(&yaml),
        "routes[2].prefix: `/bc/` is also the prefix of routes[0]; each prefix must be unique"
    );
}

#[test]
fn prefixes_differing_only_in_case_name_both_routes() {
    let route = |prefix: &str| {
        format!(
            "  - prefix: {prefix}\n    upstream: https://example.com/\n    credential: bc\n    clients: [erp]\n"
        )
    };
    let yaml = with_routes(&format!(
        "{}{}{}",
        route("/bc/Admin/"),
        route("/bc/"),
        route("/BC/admin/")
    ));
    assert_eq!(
        problem(&yaml),
        "routes[2].prefix: `/BC/admin/` differs from routes[0].prefix `/bc/Admin/` only in \
         case; paths are matched without regard to case, so both would claim the same \
         requests: make them differ in more than case"
    );
}

#[test]
fn bad_prefixes_are_refused() {
    for (prefix, message) in [
        ("bc/", "`bc/` must start and end with `/`, such as `/bc/`"),
        ("/bc", "`/bc` must start and end with `/`, such as `/bc/`"),
        (
            "/a/../b/",
            "`/a/../b/` must not contain `..` or `.` segments",
        ),
        ("/a//b/", "`/a//b/` must not contain `//`"),
        (
            "/a;b/",
            "a prefix must not contain `;` (requests with it are refused)",
        ),
        ("/v2./", "`/v2./` must not contain a segment ending in `.`"),
        (
            "/a%2fb/",
            "a prefix must not contain `%` (percent-encoding)",
        ),
    ] {
        let yaml = with_routes(&format!(
            "  - prefix: \"{prefix}\"\n    upstream: https://example.com/\n    credential: bc\n    clients: [erp]\n"
        ));
        assert_eq!(problem(&yaml), format!("routes[0].prefix: {message}"));
    }
}

#[test]
fn plain_http_upstreams_only_to_loopback_or_when_allowed() {
    assert_eq!(
        problem(&one_route("http://erp.example.com/api/", "")),
        "routes[0].upstream: `http://` is allowed only for loopback hosts (127.0.0.0/8, ::1, \
         localhost); use https:// or set `allow_plain_http: true` on the route (host \
         erp.example.com)"
    );
    for loopback in [
        "http://127.0.0.1:8081/",
        "http://localhost/",
        "http://[::1]:9000/x/",
    ] {
        assert!(load(&one_route(loopback, "")).is_ok(), "{loopback}");
    }
    let config = load(&one_route(
        "http://erp.example.com/api/",
        "    allow_plain_http: true\n",
    ))
    .expect("explicitly allowed");
    assert!(config.routes[0].allow_plain_http);
    assert_eq!(config.routes[0].upstream.scheme, http::uri::Scheme::HTTP);
}

#[test]
fn link_local_upstreams_are_refused_even_when_plain_http_is_allowed() {
    for (url, host) in [
        ("http://169.254.169.254/metadata/", "169.254.169.254"),
        ("https://[fe80::1]/", "[fe80::1]"),
    ] {
        assert_eq!(
            problem(&one_route(url, "    allow_plain_http: true\n")),
            format!(
                "routes[0].upstream: host {host} is link-local (169.254.0.0/16, fe80::/10), \
                 which is refused: it reaches cloud metadata services"
            )
        );
    }
}

#[test]
fn upstream_must_be_an_absolute_url_without_credentials() {
    for (url, message) in [
        (
            "/relative/",
            "must be an absolute URL such as https://host/path",
        ),
        (
            "ftp://example.com/",
            "scheme `ftp` is not http or https; it must be an absolute URL such as https://host/path",
        ),
        (
            "https://user:pw@example.com/",
            "must not contain user info (`user:password@`); credentials belong under `credentials:`",
        ),
        ("https://example.com/?a=1", "must not have a query (`?…`)"),
        (
            "https://example.com/#top",
            "must not have a fragment (`#…`)",
        ),
    ] {
        assert_eq!(
            problem(&one_route(&format!("\"{url}\""), "")),
            format!("routes[0].upstream: {message}")
        );
    }
}

#[test]
fn missing_trailing_slash_is_added() {
    let config = load(&one_route("https://erp.example.com:8443/api/v2.0", "")).expect("valid");
    let upstream = &config.routes[0].upstream;
    assert_eq!(upstream.base_path, "/api/v2.0/");
    assert_eq!(
        upstream.url.to_string(),
        "https://erp.example.com:8443/api/v2.0/"
    );
    assert_eq!(upstream.authority, "erp.example.com:8443");
    assert_eq!(upstream.host, "erp.example.com");
    let config = load(&one_route("https://erp.example.com", "")).expect("valid");
    assert_eq!(config.routes[0].upstream.base_path, "/");
}

#[test]
fn scope_defaults_to_the_upstream_host_for_entra_only() {
    let yaml = with_routes(
        "  - prefix: /entra/\n    upstream: https://erp.example.com:8443/api/\n    credential: bc\n    clients: [erp]\n  \
         - prefix: /generic/\n    upstream: https://api.partner.example/\n    credential: partner\n    clients: [erp]\n  \
         - prefix: /explicit/\n    upstream: https://api.partner.example/\n    credential: partner\n    clients: [erp]\n    \
         scope: api://partner/.default\n",
    );
    let config = load(&yaml).expect("valid");
    assert_eq!(
        config.routes[0].scope.as_deref(),
        Some("https://erp.example.com/.default")
    );
    assert_eq!(config.routes[1].scope, None);
    assert_eq!(
        config.routes[2].scope.as_deref(),
        Some("api://partner/.default")
    );
}

#[test]
fn defaults() {
    let yaml = "routes: []\n";
    let config = load(yaml).expect("valid");
    assert_eq!(config.server.listen, DEFAULT_LISTEN.parse().unwrap());
    assert_eq!(config.server.api_key_header, "x-api-key");
    assert_eq!(config.server.workers, None);
    assert_eq!(
        config.server.limits.max_body_bytes,
        Limits::default().max_body_bytes
    );
    assert!(config.routes.is_empty());

    let yaml = CREDENTIALS.replace(
        "    client_id: 11111111",
        "    authority: https://login.microsoftonline.us/\n    client_id: 11111111",
    );
    let config = load(&yaml).expect("valid");
    let Some(CredentialKind::ClientSecret(bc)) = config.credential("bc").map(|c| &c.kind) else {
        panic!("bc is a client secret");
    };
    let TokenEndpoint::Entra {
        authority,
        tenant_id,
        url,
    } = &bc.endpoint
    else {
        panic!("entra endpoint");
    };
    assert_eq!(authority, "https://login.microsoftonline.us");
    assert_eq!(tenant_id, "contoso.onmicrosoft.com");
    assert_eq!(
        url.to_string(),
        "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(bc.auth_method, ClientAuthMethod::Post);
}

// ---------------------------------------------------------------------------------------
// Credentials

#[test]
fn credential_rules() {
    let yaml = r#"
credentials:
  both:
    type: client_secret
    tenant_id: contoso.onmicrosoft.com
    token_url: https://idp.example/token
    client_id: a
    client_secret: ${SECRET}
  neither:
    type: client_secret
    client_id: a
    client_secret: ${SECRET}
  common:
    type: client_secret
    tenant_id: common
    client_id: ""
    client_secret: ${SECRET}
  plain:
    type: client_secret
    token_url: http://idp.example/token
    authority: https://login.microsoftonline.com
    client_id: a
    client_secret: ${SECRET}
    auth_method: private_key_jwt
    params: { grant_type: password }
"#;
    assert_eq!(
        problems(yaml),
        [
            "credentials.both.token_url: set either credentials.both.tenant_id (Entra ID) or \
             credentials.both.token_url (any other OAuth 2.0 server), not both",
            "credentials.neither: needs `tenant_id` (Entra ID) or `token_url` (any other OAuth \
             2.0 server)",
            "credentials.common.tenant_id: `common` is not a tenant: the client-credentials grant \
             needs the directory (tenant) ID GUID or a verified domain such as \
             contoso.onmicrosoft.com",
            "credentials.common.client_id: must not be empty",
            "credentials.plain.authority: applies only with credentials.plain.tenant_id; with \
             credentials.plain.token_url remove it",
            "credentials.plain.token_url: `http://` is allowed only for loopback hosts \
             (127.0.0.0/8, ::1, localhost); token endpoints need https:// (host idp.example)",
            "credentials.plain.auth_method: unknown method `private_key_jwt`; use \
             `client_secret_post` (default) or `client_secret_basic`",
            "credentials.plain.params.grant_type: `grant_type` cannot be overridden; the proxy \
             sets it",
        ]
    );
}

#[test]
fn literal_client_secret_is_allowed() {
    let yaml = CREDENTIALS.replacen("${SECRET}", "inline-secret", 1);
    let config = load(&yaml).expect("valid");
    let Some(CredentialKind::ClientSecret(bc)) = config.credential("bc").map(|c| &c.kind) else {
        panic!("bc is a client secret");
    };
    assert_eq!(bc.client_secrets[0].value.expose(), "inline-secret");
}

#[test]
fn loopback_token_endpoints_for_tests_and_sidecars() {
    let yaml = CREDENTIALS
        .replace(
            "https://idp.partner.example/oauth2/token",
            "http://127.0.0.1:9999/token",
        )
        .replace(
            "    client_id: 11111111",
            "    authority: http://localhost:9998/\n    client_id: 11111111",
        );
    let config = load(&yaml).expect("valid");
    let urls: Vec<String> = config
        .credentials
        .iter()
        .map(|c| match &c.kind {
            CredentialKind::ClientSecret(s) => s.endpoint.url().to_string(),
            other => panic!("{}", other.type_name()),
        })
        .collect();
    assert_eq!(
        urls,
        [
            "http://localhost:9998/contoso.onmicrosoft.com/oauth2/v2.0/token",
            "http://127.0.0.1:9999/token",
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Not supported yet, and everything at once

#[test]
fn later_release_settings_are_validated_then_refused() {
    let yaml = format!(
        "{CREDENTIALS}  mi:\n    type: managed_identity\n{CLIENTS}    rate_limit: 100/x\n  \
         edi:\n    certificate: {{ subject_cn: edi.contoso.com }}\nroutes:\n  \
         - prefix: /bc/\n    upstream: https://example.com/\n    credential: bc\n    \
         clients: [erp]\n    max_queue: 10\n    rewrite_links: false\n"
    );
    assert_eq!(
        problems(&yaml),
        [
            "clients.warehouse.rate_limit: `100/x` has an invalid period; write requests per \
             period, such as `100/s`, `20/m` or `6000/5m`",
            "clients.edi.certificate: needs server.tls.client_ca_file to verify client \
             certificates; set server.tls.client_ca_file or remove this certificate",
            "routes[0].max_queue: applies only with routes[0].max_concurrent or \
             routes[0].upstream_rate_limit; set one of them or remove routes[0].max_queue",
        ]
    );
}

/// Golden: what `s2s-proxy check` prints for a config with many mistakes.
#[test]
fn many_problems_are_reported_at_once() {
    let yaml = r#"
server:
  listen: localhost:8080
  trusted_proxies: [10.0.0.0/8, 10.0.0.300]
  api_key_header: Authorization
  limits:
    request_timeout: 30
credentials:
  bc:
    type: client_secret
    tenant_id: organizations
    client_id: ${BC_CLIENT_ID}
    client_secret: ${BC_CLIENT_SECRET}
clients:
  erp:
    basic: { username: "erp:sync", password: hunter2 }
  warehouse:
    api_key: ${WAREHOUSE_KEY}
    networks: [192.168.10.0/24]
routes:
  - prefix: /bc
    upstream: http://api.businesscentral.dynamics.com/v2.0/Production/
    credential: bc
    clients: [erp, warehous]
    timeout: 9 minutes
  - prefix: /crm/
    upstream: https://contoso.crm4.dynamics.com/api/data/v9.2/
    credential: crm
  - prefix: /crm/
    upstream: https://169.254.169.254/
    credential: bc
    clients: [warehouse]
"#;
    assert_eq!(
        error_text(yaml),
        concat!(
            "proxy.yaml: 17 problems:\n",
            "  - server.listen: `localhost:8080` is not an address; write IP:port such as 127.0.0.1:8080, 0.0.0.0:8080 or [::]:8080\n",
            "  - server.trusted_proxies[1]: `10.0.0.300` is not a network; write CIDR such as 10.0.0.0/8 or fd00::/8, or a single address\n",
            "  - server.api_key_header: `Authorization` is a header the proxy sets or removes itself; use a dedicated one such as X-API-Key\n",
            "  - server.limits.request_timeout: `30` has no unit; write a whole number and a unit: `500ms`, `30s`, `5m` or `2h`\n",
            "  - credentials.bc.tenant_id: `organizations` is not a tenant: the client-credentials grant needs the directory (tenant) ID GUID or a verified domain such as contoso.onmicrosoft.com\n",
            "  - credentials.bc.client_id: environment variable `BC_CLIENT_ID` is not set; set it or change this value\n",
            "  - credentials.bc.client_secret: environment variable `BC_CLIENT_SECRET` is not set; set it or change this value\n",
            "  - clients.erp.basic.username: must not contain `:` (Basic auth splits on it)\n",
            "  - clients.erp.basic.password: a plaintext password must not be written into the YAML; use `s2s-proxy hash-secret` to get its sha256: form, or ${VAR} / ${file:PATH}\n",
            "  - routes[0].prefix: `/bc` must start and end with `/`, such as `/bc/`\n",
            "  - routes[0].upstream: `http://` is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost); use https:// or set `allow_plain_http: true` on the route (host api.businesscentral.dynamics.com)\n",
            "  - routes[0].clients[1]: unknown client `warehous`; defined clients: `erp`, `warehouse`\n",
            "  - routes[0].timeout: `9 minutes` is not a duration; write a whole number and a unit: `500ms`, `30s`, `5m` or `2h`\n",
            "  - routes[1].credential: unknown credential `crm`; defined credentials: `bc`\n",
            "  - routes[1].clients: a route needs at least one client; list the names under `clients:` that may call it\n",
            "  - routes[2].prefix: `/crm/` is also the prefix of routes[1]; each prefix must be unique\n",
            "  - routes[2].upstream: host 169.254.169.254 is link-local (169.254.0.0/16, fe80::/10), which is refused: it reaches cloud metadata services",
        )
    );
}

#[test]
fn yaml_bombs_are_errors_not_crashes() {
    let deep = format!("routes: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    assert!(matches!(load(&deep), Err(ConfigError::Syntax { .. })));
    // Billion laughs where it would hurt most: a credential is read into a YAML value first.
    let mut bomb = String::from(
        "credentials:\n  x:\n    a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for i in 1..10 {
        let previous = format!("*a{}", i - 1);
        let list = [previous.as_str(); 9].join(", ");
        bomb.push_str(&format!("    a{i}: &a{i} [{list}]\n"));
    }
    let started = std::time::Instant::now();
    let error = load(&bomb).expect_err("bomb");
    assert!(matches!(error, ConfigError::Syntax { .. }), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn sizes_have_sane_bounds() {
    let server = "server:\n  workers: 5000\n  limits: { max_header_bytes: 100, max_connections: 99999999999 }\n";
    let yaml = format!("{server}{}", one_route("https://api.example.com/", ""));
    assert_eq!(
        problems(&yaml),
        [
            "server.workers: must be at most 1024",
            "server.limits.max_header_bytes: must be at least 8192",
            "server.limits.max_connections: must be at most 1000000",
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Service presets and queue defaults

#[test]
fn presets_derive_url_scope_and_defaults() {
    let config = load(&with_routes(
        "  - prefix: /crm/\n    upstream: { dataverse: { url: \"https://contoso.crm4.dynamics.com/\" } }\n    \
         credential: bc\n    clients: [erp]\n  \
         - prefix: /fo/\n    upstream: { finance_operations: { url: https://contoso.operations.dynamics.com } }\n    \
         credential: bc\n    clients: [erp]\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let crm = config.route("/crm/").expect("/crm/");
    assert_eq!(crm.preset, Some(Preset::Dataverse));
    assert_eq!(
        crm.upstream.url.to_string(),
        "https://contoso.crm4.dynamics.com/api/data/v9.2/"
    );
    assert_eq!(
        crm.scope.as_deref(),
        Some("https://contoso.crm4.dynamics.com/.default")
    );
    assert_eq!(crm.max_concurrent, Some(52));
    assert_eq!(crm.max_queue, Some(DEFAULT_MAX_QUEUE));
    assert_eq!(crm.timeout, Duration::from_secs(600));
    assert!(crm.rewrite_links);

    let fo = config.route("/fo/").expect("/fo/");
    assert_eq!(fo.preset, Some(Preset::FinanceOperations));
    assert_eq!(
        fo.upstream.url.to_string(),
        "https://contoso.operations.dynamics.com/data/"
    );
    assert_eq!(
        fo.scope.as_deref(),
        Some("https://contoso.operations.dynamics.com/.default")
    );
    assert_eq!(
        (fo.max_concurrent, fo.max_queue, fo.queue_timeout),
        (None, None, None)
    );
    assert_eq!(fo.retry_on_429.map(|r| r.attempts), Some(3));
}

#[test]
fn route_settings_override_preset_defaults() {
    let config = load(&one_route(
        "{ businesscentral: { tenant: 72f988bf-86f1-41af-91ab-2d7cd011db47, environment: Production } }",
        "    timeout: 2m\n    max_concurrent: 2\n    max_queue: 0\n    queue_timeout: 5s\n    \
         rewrite_links: false\n    retry_on_429: { attempts: 1, max_wait: 2s }\n    \
         scope: https://api.businesscentral.dynamics.com/user_impersonation\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let route = &config.routes[0];
    assert_eq!(route.timeout, Duration::from_secs(120));
    assert_eq!(
        (route.max_concurrent, route.max_queue, route.queue_timeout),
        (Some(2), Some(0), Some(Duration::from_secs(5)))
    );
    assert!(!route.rewrite_links);
    assert_eq!(
        route.retry_on_429,
        Some(RetryOn429 {
            attempts: 1,
            max_wait: Duration::from_secs(2)
        })
    );
    assert_eq!(
        route.scope.as_deref(),
        Some("https://api.businesscentral.dynamics.com/user_impersonation")
    );
}

#[test]
fn max_concurrent_alone_gets_the_default_queue() {
    let config = load(&one_route(
        "https://example.com/",
        "    max_concurrent: 3\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let route = &config.routes[0];
    assert_eq!(route.max_queue, Some(DEFAULT_MAX_QUEUE));
    assert_eq!(route.queue_timeout, Some(DEFAULT_QUEUE_TIMEOUT));
    assert!(!route.rewrite_links && route.retry_on_429.is_none());
}

#[test]
fn upstream_rate_limit_alone_gets_the_default_queue_bounds() {
    let config = load(&one_route(
        "https://example.com/",
        "    upstream_rate_limit: 6000/5m\n    queue_timeout: 2m\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let route = &config.routes[0];
    assert_eq!(
        route.upstream_rate_limit,
        Some(RateLimit {
            requests: 6000,
            per: Duration::from_secs(300)
        })
    );
    assert_eq!(route.max_concurrent, None);
    assert_eq!(route.max_queue, Some(DEFAULT_MAX_QUEUE));
    assert_eq!(route.queue_timeout, Some(Duration::from_secs(120)));

    // No preset sets it: Microsoft documents the budget per app registration, which the
    // proxy cannot know it has to itself.
    let bc = load(&one_route(
        "{ businesscentral: { tenant: 72f988bf-86f1-41af-91ab-2d7cd011db47, environment: Production } }",
        "",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bc.routes[0].upstream_rate_limit, None);

    assert_eq!(
        problem(&one_route(
            "https://example.com/",
            "    upstream_rate_limit: 10/0s\n"
        )),
        "routes[0].upstream_rate_limit: `10/0s` has an invalid period; write requests per \
         period, such as `100/s`, `20/m` or `6000/5m`"
    );
}

#[test]
fn api_key_header_cannot_be_one_the_proxy_strips_or_a_content_header() {
    for header in [
        "X-Original-URL",
        "X-Forwarded-Uri",
        "X-Forwarded-Port",
        "X-MS-CLIENT-PRINCIPAL-NAME",
        "True-Client-IP",
        "Upgrade",
        "Cookie",
        "Content-Type",
    ] {
        let yaml = format!(
            "server:\n  api_key_header: {header}\n{}",
            one_route("https://api.example.com/", "")
        );
        let found = problem(&yaml);
        assert!(
            found.starts_with("server.api_key_header: ")
                && found.contains("sets or removes itself"),
            "{header}: {found}"
        );
    }
}

#[test]
fn header_policy_fields_are_typed_and_validated() {
    let config = load(&format!(
        "server:\n  allow_underscore_headers: true\n{}",
        one_route(
            "https://api.example.com/",
            "    strip_request_headers: [X-Debug-User, x-tenant-override, X-DEBUG-USER]\n"
        )
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.server.allow_underscore_headers);
    let names: Vec<&str> = config.routes[0]
        .strip_request_headers
        .iter()
        .map(HeaderName::as_str)
        .collect();
    assert_eq!(names, ["x-debug-user", "x-tenant-override"]);

    let config = load(&one_route("https://api.example.com/", "")).unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.server.allow_underscore_headers);
    assert!(config.routes[0].strip_request_headers.is_empty());

    let found = problems(&one_route(
        "https://api.example.com/",
        "    strip_request_headers: [\"X Debug\", X-Forwarded-For, Host, Content-Length, X-Request-Id, X-Ok]\n",
    ));
    assert_eq!(
        found,
        [
            "routes[0].strip_request_headers[0]: `X Debug` is not a valid header name; write it as in X-Debug-User",
            "routes[0].strip_request_headers[1]: `X-Forwarded-For` is set by the proxy itself or frames the body and cannot be stripped; remove it from the list",
            "routes[0].strip_request_headers[2]: `Host` is set by the proxy itself or frames the body and cannot be stripped; remove it from the list",
            "routes[0].strip_request_headers[3]: `Content-Length` is set by the proxy itself or frames the body and cannot be stripped; remove it from the list",
            "routes[0].strip_request_headers[4]: `X-Request-Id` is set by the proxy itself or frames the body and cannot be stripped; remove it from the list",
        ]
    );
    let found = load(&format!(
        "server:\n  allow_underscore_headers: yes please\n{}",
        one_route("https://api.example.com/", "")
    ))
    .expect_err("not a boolean")
    .to_string();
    assert!(
        found.contains("server.allow_underscore_headers: invalid type"),
        "{found}"
    );
}
