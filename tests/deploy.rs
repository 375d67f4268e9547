//! The deployment files agree with the code: every Kubernetes manifest parses, the probes
//! hit `/healthz` and `/readyz` on the admin port that the ConfigMap's `admin.listen`
//! opens, the proxy port is `server.listen`'s, and the systemd unit and Dockerfile keep
//! their sandboxing and health check.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_yaml_ng::Value;

use s2s_proxy::config::DEFAULT_LISTEN;
use s2s_proxy::{Config, DEFAULT_HEALTHCHECK_URL, Source};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Every document of every manifest, with the file it came from.
fn manifests() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    yaml_files(&Path::new(ROOT).join("deploy/kubernetes"), &mut files);
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !value.is_null() {
                docs.push((file.clone(), value));
            }
        }
    }
    docs
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path)?.as_str()
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn named<'a>(docs: &'a [(PathBuf, Value)], kind: &str, dir: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(file, doc)| {
            str_at(doc, &["kind"]) == Some(kind) && file.parent().unwrap().ends_with(dir)
        })
        .map(|(_, doc)| doc)
        .collect()
}

#[test]
fn every_manifest_is_a_kubernetes_object() {
    for (file, doc) in manifests() {
        assert!(
            str_at(&doc, &["apiVersion"]).is_some() && str_at(&doc, &["kind"]).is_some(),
            "{}: no apiVersion/kind",
            file.display()
        );
    }
}

#[test]
fn probes_and_ports_match_the_config_and_the_code() {
    let docs = manifests();
    let deployment = named(&docs, "Deployment", "kubernetes")[0];
    assert_eq!(
        at(deployment, &["spec", "replicas"]).unwrap().as_u64(),
        Some(2)
    );
    let pod = at(deployment, &["spec", "template", "spec"]).unwrap();
    let container = &at(pod, &["containers"]).unwrap()[0];
    let ports: HashMap<&str, u16> = at(container, &["ports"])
        .unwrap()
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                str_at(p, &["name"]).unwrap(),
                at(p, &["containerPort"]).unwrap().as_u64().unwrap() as u16,
            )
        })
        .collect();

    // The ConfigMap's proxy.yaml is valid and opens exactly these ports.
    let config_map = named(&docs, "ConfigMap", "kubernetes")[0];
    let yaml = str_at(config_map, &["data", "proxy.yaml"]).unwrap();
    let vars = HashMap::from(
        [
            "BC_TENANT_ID",
            "BC_CLIENT_ID",
            "BC_CLIENT_SECRET",
            "ERP_SYNC_PASSWORD",
            "ADMIN_API_KEY",
        ]
        .map(|name| (name.to_owned(), "value-1".to_owned())),
    );
    let config = Config::from_yaml_str(yaml, &Source::inline("configmap.yaml", vars))
        .unwrap_or_else(|e| panic!("{e}"));
    let admin_port = config.admin.as_ref().expect("admin listener").listen.port();
    assert_eq!(ports["admin"], admin_port);
    assert_eq!(ports["http"], config.server.listen.port());
    assert_eq!(
        ports["http"],
        port_of(DEFAULT_LISTEN),
        "the default proxy port"
    );
    // The image's HEALTHCHECK default targets the same admin port.
    assert!(
        DEFAULT_HEALTHCHECK_URL.ends_with(&format!(":{admin_port}/healthz")),
        "{DEFAULT_HEALTHCHECK_URL}"
    );

    let probe = |name: &str| {
        let get = at(container, &[name, "httpGet"]).unwrap_or_else(|| panic!("{name}"));
        let port = match at(get, &["port"]).unwrap() {
            Value::String(named) => ports[named.as_str()],
            other => other.as_u64().unwrap() as u16,
        };
        (str_at(get, &["path"]).unwrap().to_owned(), port)
    };
    assert_eq!(probe("livenessProbe"), ("/healthz".to_owned(), admin_port));
    assert_eq!(probe("startupProbe"), ("/healthz".to_owned(), admin_port));
    assert_eq!(probe("readinessProbe"), ("/readyz".to_owned(), admin_port));

    // Hardening and resources.
    let security = at(container, &["securityContext"]).unwrap();
    assert_eq!(
        at(security, &["readOnlyRootFilesystem"]),
        Some(&Value::Bool(true))
    );
    assert_eq!(
        at(security, &["allowPrivilegeEscalation"]),
        Some(&Value::Bool(false))
    );
    assert_eq!(
        at(pod, &["securityContext", "runAsNonRoot"]),
        Some(&Value::Bool(true))
    );
    assert!(at(container, &["resources", "requests", "memory"]).is_some());
    assert!(at(container, &["resources", "limits", "memory"]).is_some());
    let grace = at(pod, &["terminationGracePeriodSeconds"])
        .unwrap()
        .as_u64()
        .unwrap();
    assert!(grace > 30, "the drain takes up to 30 s");

    // The Service exposes the proxy port, not the admin port.
    let service = named(&docs, "Service", "kubernetes")[0];
    let service_ports = at(service, &["spec", "ports"])
        .unwrap()
        .as_sequence()
        .unwrap();
    assert_eq!(service_ports.len(), 1);
    assert_eq!(str_at(&service_ports[0], &["targetPort"]), Some("http"));

    for kind in ["PodDisruptionBudget", "HorizontalPodAutoscaler", "Secret"] {
        assert_eq!(named(&docs, kind, "kubernetes").len(), 1, "{kind}");
    }
    let hpa = named(&docs, "HorizontalPodAutoscaler", "kubernetes")[0];
    assert_eq!(
        str_at(hpa, &["spec", "scaleTargetRef", "name"]),
        str_at(deployment, &["metadata", "name"])
    );
    assert!(at(hpa, &["spec", "minReplicas"]).unwrap().as_u64().unwrap() >= 2);
}

#[test]
fn workload_identity_variant_uses_the_federated_service_account() {
    let docs = manifests();
    let config_map = named(&docs, "ConfigMap", "workload-identity")[0];
    let yaml = str_at(config_map, &["data", "proxy.yaml"]).unwrap();
    let proxy: Value = serde_yaml_ng::from_str(yaml).unwrap();
    assert_eq!(
        str_at(&proxy, &["credentials", "bc", "type"]),
        Some("workload_identity")
    );
    assert_eq!(port_of(str_at(&proxy, &["admin", "listen"]).unwrap()), 9090);
    assert_eq!(
        port_of(str_at(&proxy, &["server", "listen"]).unwrap()),
        8080
    );

    let patch = named(&docs, "Deployment", "workload-identity")[0];
    assert_eq!(
        str_at(
            patch,
            &[
                "spec",
                "template",
                "metadata",
                "labels",
                "azure.workload.identity/use"
            ]
        ),
        Some("true")
    );
    let account = str_at(patch, &["spec", "template", "spec", "serviceAccountName"]).unwrap();
    let service_account = named(&docs, "ServiceAccount", "workload-identity")[0];
    assert_eq!(
        str_at(service_account, &["metadata", "name"]),
        Some(account)
    );
    assert!(
        str_at(
            service_account,
            &[
                "metadata",
                "annotations",
                "azure.workload.identity/client-id"
            ]
        )
        .is_some()
    );
}

/// The fleet overlay: its proxy.yaml is valid with `cluster` pointing at the overlay's own
/// Redis Service (through the Secret both pods read), Business Central's limits are written
/// once, and only the proxy's pods may reach Redis.
#[test]
fn fleet_variant_points_every_replica_at_its_redis() {
    let docs = manifests();
    let config_map = named(&docs, "ConfigMap", "fleet")[0];
    let yaml = str_at(config_map, &["data", "proxy.yaml"]).unwrap();
    let secret = named(&docs, "Secret", "fleet")[0];
    let redis_url = str_at(secret, &["stringData", "S2S_REDIS_URL"]).unwrap();
    let password = str_at(secret, &["stringData", "REDIS_PASSWORD"]).unwrap();
    assert!(
        redis_url.starts_with(&format!("redis://:{password}@")),
        "{redis_url}"
    );
    let mut vars: HashMap<String, String> = [
        "BC_TENANT_ID",
        "BC_CLIENT_ID",
        "BC_CLIENT_SECRET",
        "ERP_SYNC_PASSWORD",
        "ADMIN_API_KEY",
    ]
    .map(|name| (name.to_owned(), "value-1".to_owned()))
    .into();
    vars.insert("S2S_REDIS_URL".to_owned(), redis_url.to_owned());
    let config = Config::from_yaml_str(yaml, &Source::inline("fleet/configmap.yaml", vars))
        .unwrap_or_else(|e| panic!("{e}"));
    let cluster = config.cluster.as_ref().expect("cluster");
    assert!(!format!("{cluster:?}").contains(password), "{cluster:?}");

    // The URL names the overlay's Redis Service and port.
    let service = docs
        .iter()
        .find(|(file, doc)| {
            file.parent().unwrap().ends_with("fleet") && str_at(doc, &["kind"]) == Some("Service")
        })
        .map(|(_, doc)| doc)
        .expect("Redis Service");
    let name = str_at(service, &["metadata", "name"]).unwrap();
    let port = at(service, &["spec", "ports"]).unwrap()[0]["port"]
        .as_u64()
        .unwrap();
    assert!(
        cluster
            .redis
            .redacted()
            .contains(&format!("@{name}:{port}/")),
        "{}",
        cluster.redis.redacted()
    );

    // Business Central's per-app limits, once for the fleet.
    let route = &config.routes[0];
    assert_eq!(route.max_concurrent, Some(5));
    assert_eq!(route.max_queue, Some(95));
    let rate = route
        .upstream_rate_limit
        .as_ref()
        .expect("upstream_rate_limit");
    assert_eq!((rate.requests, rate.per.as_secs()), (6000, 300));

    // The proxy reads the URL from the Secret; Redis its password from the same Secret.
    let patch = named(&docs, "Deployment", "fleet")[0];
    let env = &at(patch, &["spec", "template", "spec", "containers"]).unwrap()[0]["env"][0];
    assert_eq!(str_at(env, &["name"]), Some("S2S_REDIS_URL"));
    let secret_name = str_at(secret, &["metadata", "name"]).unwrap();
    assert_eq!(
        str_at(env, &["valueFrom", "secretKeyRef", "name"]),
        Some(secret_name)
    );
    let redis = named(&docs, "StatefulSet", "fleet")[0];
    let pod = at(redis, &["spec", "template", "spec"]).unwrap();
    let container = &at(pod, &["containers"]).unwrap()[0];
    let args: Vec<&str> = at(container, &["args"])
        .unwrap()
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--requirepass", "$(REDIS_PASSWORD)"]),
        "{args:?}"
    );
    assert_eq!(
        at(container, &["securityContext", "readOnlyRootFilesystem"]),
        Some(&Value::Bool(true))
    );
    assert_eq!(
        at(pod, &["securityContext", "runAsNonRoot"]),
        Some(&Value::Bool(true))
    );

    // Only the proxy's pods reach Redis.
    let policy = named(&docs, "NetworkPolicy", "fleet")[0];
    let proxy_label = at(
        named(&docs, "Deployment", "kubernetes")[0],
        &["spec", "template", "metadata", "labels"],
    )
    .unwrap();
    let from = &at(policy, &["spec", "ingress"]).unwrap()[0]["from"][0];
    assert_eq!(at(from, &["podSelector", "matchLabels"]), Some(proxy_label));
}

#[test]
fn systemd_unit_is_sandboxed_and_reloads_with_sighup() {
    let unit =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd/s2s-proxy.service")).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for directive in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "TimeoutStopSec=40",
    ] {
        assert!(lines.contains(&directive), "{directive} missing");
    }
}

#[test]
fn image_runs_as_non_root_with_a_health_check() {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("\nUSER 65532:65532\n"));
    assert!(dockerfile.contains("\nEXPOSE 8080 9090\n"));
    assert!(dockerfile.contains(r#""healthcheck", "--url", "http://127.0.0.1:9090/healthz""#));
}
