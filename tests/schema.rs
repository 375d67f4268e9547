//! `proxy.schema.json`: the shipped file is what `s2s-proxy schema` prints, the examples in
//! the repository validate against it, and it refuses what the loader refuses (unknown keys
//! at every level, wrong types, unknown credential types and presets).

use std::path::Path;

use serde_json::{Value, json};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(&s2s_proxy::config::json_schema()).unwrap();
    jsonschema::draft202012::new(&schema).expect("the schema compiles")
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("valid YAML")
}

fn assert_valid(validator: &jsonschema::Validator, what: &str, instance: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not match proxy.schema.json: {errors:#?}"
    );
}

#[test]
fn shipped_schema_is_the_generated_one() {
    let shipped = std::fs::read_to_string(root().join("proxy.schema.json")).unwrap_or_default();
    assert!(
        shipped == s2s_proxy::config::json_schema(),
        "proxy.schema.json is out of date; refresh it with `cargo run -- schema > proxy.schema.json`"
    );
}

#[test]
fn schema_command_prints_the_shipped_file() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_s2s-proxy"))
        .arg("schema")
        .output()
        .unwrap();
    assert!(output.status.success());
    let shipped = std::fs::read(root().join("proxy.schema.json")).unwrap();
    assert!(
        output.stdout == shipped,
        "`s2s-proxy schema` differs from proxy.schema.json"
    );
}

#[test]
fn schema_is_draft_2020_12_and_closed() {
    let schema: Value = serde_json::from_str(&s2s_proxy::config::json_schema()).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(schema["additionalProperties"], false);
}

#[test]
fn proxy_yaml_names_the_schema_and_matches_it() {
    let text = std::fs::read_to_string(root().join("proxy.yaml")).unwrap();
    assert!(
        text.starts_with("# yaml-language-server: $schema=./proxy.schema.json\n"),
        "proxy.yaml must start with the yaml-language-server modeline"
    );
    assert_valid(&validator(), "proxy.yaml", &yaml(&text));
}

/// The ```yaml blocks of README.md and docs/*.md that are documents (their first key is a
/// top-level section at column 0); indented fragments of one section are skipped.
#[test]
fn documented_examples_match_the_schema() {
    const SECTIONS: [&str; 5] = ["server:", "admin:", "credentials:", "clients:", "routes:"];
    let validator = validator();
    let mut files = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut lines = text.lines().enumerate();
        while let Some((start, line)) = lines.next() {
            if line.trim_end() != "```yaml" {
                continue;
            }
            let block: Vec<&str> = lines
                .by_ref()
                .map(|(_, l)| l)
                .take_while(|l| !l.starts_with("```"))
                .collect();
            let first = block
                .iter()
                .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
            if !first.is_some_and(|l| SECTIONS.iter().any(|s| l.starts_with(s))) {
                continue;
            }
            let what = format!("{}:{}", file.display(), start + 1);
            assert_valid(&validator, &what, &yaml(&block.join("\n")));
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} documented examples found");
}

#[test]
fn deployed_config_maps_match_the_schema() {
    let validator = validator();
    let mut checked = 0;
    for file in [
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes/workload-identity/configmap.yaml",
    ] {
        let map = yaml(&std::fs::read_to_string(root().join(file)).unwrap());
        let config = map["data"]["proxy.yaml"]
            .as_str()
            .unwrap_or_else(|| panic!("{file} holds no data.proxy.yaml"));
        assert_valid(&validator, file, &yaml(config));
        checked += 1;
    }
    assert_eq!(checked, 2);
}

/// Every section, every credential type, both forms of list entries and every preset.
fn everything() -> Value {
    yaml(
        r#"
server:
  listen: 0.0.0.0:8443
  public_url: https://proxy.contoso.com
  trusted_proxies: [10.0.0.0/8]
  upstream_ca_file: /etc/ssl/ca.pem
  api_key_header: X-API-Key
  allow_underscore_headers: false
  workers: 2
  tls: { cert_file: a.crt, key_file: a.key, client_ca_file: ca.pem }
  limits:
    max_header_bytes: 32768
    max_body_bytes: 1000
    header_read_timeout: 10s
    body_idle_timeout: ${BODY_IDLE}
    idle_timeout: 75s
    request_timeout: 500ms
    max_connections: 10
admin:
  listen: 127.0.0.1:9090
credentials:
  secret:
    type: client_secret
    tenant_id: ${T}
    client_id: ${C}
    client_secrets:
      - { value: "${S1}", expires: 2027-03-31 }
      - "${S2}"
    auth_method: client_secret_basic
    params: { resource: https://example.com }
  cert:
    type: client_certificate
    tenant_id: contoso.onmicrosoft.com
    client_id: ${C}
    certificate_files:
      - a.pem
      - { file: b.pfx, password: "${file:/run/p}" }
    send_certificate_chain: true
  mi:
    type: managed_identity
    client_id: ${UAMI}
  wi:
    type: workload_identity
    token_file: /var/run/token
clients:
  erp:
    basic: { username: erp, password: "${P}" }
    rate_limit: 6000/5m
    networks: [10.1.0.0/16]
  scanner:
    api_key: ${K}
    rate_limit: ${RATE}
  edi:
    certificate: { subject_cn: edi.contoso.com }
routes:
  - prefix: /bc/
    upstream: { businesscentral: { tenant: "${T}", environment: Production } }
    credential: secret
    clients: [erp]
    timeout: 9m
    max_concurrent: 5
    max_queue: 95
    queue_timeout: 60s
    retry_on_429: { attempts: 3, max_wait: 30s }
  - prefix: /crm/
    upstream: { dataverse: { url: https://contoso.crm4.dynamics.com } }
    credential: cert
    clients: [scanner]
  - prefix: /fo/
    upstream: { finance_operations: { url: "https://${FO_ENV}.operations.dynamics.com" } }
    credential: mi
    clients: [edi]
  - prefix: /api/
    upstream: https://api.contoso.com/
    credential: wi
    scope: api://x/.default
    clients: [erp]
    allow_plain_http: false
    rewrite_links: true
    strip_request_headers: [X-Debug-User]
    doctor_path: /health
"#,
    )
}

#[test]
fn a_config_using_every_key_matches_the_schema() {
    assert_valid(&validator(), "the full example", &everything());
}

/// Adds an unknown key to every mapping of `value` (except the maps of names and `params`,
/// whose keys are free) and checks that each is refused on its own.
#[test]
fn unknown_keys_are_refused_at_every_level() {
    fn mappings(value: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match value {
            Value::Object(map) => {
                out.push(path.clone());
                for (key, child) in map {
                    path.push(key.clone());
                    mappings(child, path, out);
                    path.pop();
                }
            }
            Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    path.push(index.to_string());
                    mappings(child, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let validator = validator();
    let full = everything();
    let mut paths = Vec::new();
    mappings(&full, &mut Vec::new(), &mut paths);
    let mut refused = 0;
    for path in &paths {
        let last = path.last().map(String::as_str);
        if matches!(last, Some("credentials" | "clients" | "params")) {
            continue; // names are free here
        }
        let mut config = full.clone();
        let mut at = &mut config;
        for key in path {
            at = match at {
                Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
                other => &mut other[key.as_str()],
            };
        }
        at.as_object_mut()
            .unwrap()
            .insert("no_such_key".to_owned(), json!({}));
        assert!(
            !validator.is_valid(&config),
            "an unknown key at /{} was accepted",
            path.join("/")
        );
        refused += 1;
    }
    // The root, server, tls, limits, admin, four credentials, two list entries of each
    // kind, three clients, basic, certificate, four routes, three presets and their
    // settings, retry_on_429.
    assert!(refused >= 25, "only {refused} mappings checked");
}

#[test]
fn wrong_types_and_values_are_refused() {
    let validator = validator();
    let cases = [
        ("server: { workers: two }", "an integer as a word"),
        (
            "server: { allow_underscore_headers: \"yes\" }",
            "a boolean as a string",
        ),
        (
            "server: { limits: { idle_timeout: 30 } }",
            "a duration without a unit",
        ),
        (
            "server: { limits: { idle_timeout: 30 seconds } }",
            "a duration in words",
        ),
        (
            "clients: { a: { rate_limit: lots } }",
            "a rate that is no rate",
        ),
        (
            "clients: { a: { networks: 10.0.0.0/8 } }",
            "a list as a scalar",
        ),
        (
            "credentials: { a: { type: password } }",
            "an unknown credential type",
        ),
        (
            "credentials: { a: { tenant_id: x } }",
            "a credential without a type",
        ),
        (
            "credentials: { a: { type: managed_identity, tenant_id: x } }",
            "a field of another credential type",
        ),
        (
            "credentials: { a: { type: client_secret, params: { a: 1 } } }",
            "a numeric param",
        ),
        (
            "routes: [ { upstream: { sharepoint: { url: x } } } ]",
            "an unknown preset",
        ),
        (
            "routes: [ { upstream: { dataverse: { url: x }, businesscentral: {} } } ]",
            "two presets",
        ),
        ("routes: { prefix: /bc/ }", "routes as a mapping"),
        ("route: []", "a misspelt section"),
    ];
    for (text, what) in cases {
        assert!(
            !validator.is_valid(&yaml(text)),
            "{what} was accepted: {text}"
        );
    }
}

#[test]
fn durations_and_rates_accept_literals_and_references() {
    let validator = validator();
    for value in ["500ms", "30s", "5m", "2h", "${TIMEOUT}", "${N}s"] {
        let config = json!({ "server": { "limits": { "request_timeout": value } } });
        assert_valid(&validator, value, &config);
    }
    for value in ["100/s", "20/m", "6000/5m", "1000/h", "${RATE}"] {
        let config = json!({ "clients": { "a": { "rate_limit": value } } });
        assert_valid(&validator, value, &config);
    }
}
