//! `workload_identity`: settings from the webhook's variables (YAML fields win), and the
//! federated token file read again for every request.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;
use crate::config::{Config, CredentialKind, Source};
use crate::token::fake::{self, FakeServer, Request};

fn load(fields: &str, variables: &[(&str, &str)]) -> Result<WorkloadIdentity, String> {
    let yaml = format!(
        "credentials:\n  aks:\n    type: workload_identity\n{fields}clients:\n  c:\n    \
         networks: [10.0.0.0/8]\nroutes:\n  - prefix: /crm/\n    \
         upstream: https://contoso.crm4.dynamics.com/api/data/v9.2/\n    credential: aks\n    \
         clients: [c]\n"
    );
    let variables: HashMap<String, String> = variables
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let config = Config::from_yaml_str(&yaml, &Source::inline("proxy.yaml", variables))
        .map_err(|e| e.to_string())?;
    match &config.credentials[0].kind {
        CredentialKind::WorkloadIdentity(w) => Ok(w.clone()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn settings_come_from_the_webhook_variables_and_yaml_overrides_them() {
    let env = [
        ("AZURE_TENANT_ID", "tenant-from-env"),
        ("AZURE_CLIENT_ID", "client-from-env"),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            "/var/run/secrets/azure/tokens/azure-identity-token",
        ),
        ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
    ];
    let w = load("", &env).unwrap();
    assert_eq!(
        w.endpoint.url().to_string(),
        "https://login.microsoftonline.com/tenant-from-env/oauth2/v2.0/token"
    );
    assert_eq!(w.client_id, "client-from-env");
    let w = load("    client_id: yaml-client\n    cloud: china\n", &env).unwrap();
    assert_eq!(w.client_id, "yaml-client");
    assert_eq!(
        w.endpoint.url().to_string(),
        "https://login.chinacloudapi.cn/tenant-from-env/oauth2/v2.0/token"
    );
    let error = load("", &[]).unwrap_err();
    for variable in [
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_FEDERATED_TOKEN_FILE",
    ] {
        assert!(error.contains(variable), "{error}");
    }
}

#[tokio::test]
async fn the_federated_token_file_is_read_for_every_request() {
    let server = FakeServer::spawn(Arc::new(|_: &Request| {
        (200, fake::token_body("eyJ.wi.sig"))
    }))
    .await;
    let dir = crate::test_support::TempDir::new("wi");
    let file = dir.write("azure-identity-token", "k8s.jwt.one\n");
    let settings = WorkloadIdentity {
        endpoint: crate::config::TokenEndpoint::Generic {
            url: server.url("/t/oauth2/v2.0/token").parse().unwrap(),
        },
        client_id: "wi-client".to_owned(),
        token_file: file.clone(),
    };
    let source = WorkloadIdentitySource::new("aks", &settings, fake::http()).unwrap();
    let scope = "https://contoso.crm4.dynamics.com/.default";
    source.fetch(Some(scope)).await.unwrap();
    std::fs::write(&file, "k8s.jwt.two").unwrap();
    source.fetch(Some(scope)).await.unwrap();
    let requests = server.requests();
    let assertions: Vec<String> = requests
        .iter()
        .map(|r| r.field("client_assertion").unwrap())
        .collect();
    assert_eq!(assertions, ["k8s.jwt.one", "k8s.jwt.two"]);
    let form = requests[0].form();
    assert!(form.contains(&("grant_type".to_owned(), "client_credentials".to_owned())));
    assert!(form.contains(&("client_id".to_owned(), "wi-client".to_owned())));
    assert!(form.contains(&("scope".to_owned(), scope.to_owned())));
    assert!(form.contains(&(
        "client_assertion_type".to_owned(),
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned()
    )));

    std::fs::remove_file(&file).unwrap();
    let error = source.fetch(Some(scope)).await.unwrap_err();
    assert!(error.to_string().contains("cannot read"), "{error}");
}
