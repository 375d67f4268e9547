//! The proxy in front of real OData software: `odatapy` 5.3.0 (PyPI; a Python port of
//! Apache Olingo) serving 1,200 products with ETags, server-driven paging and `$batch`
//! (tests/odata/server.py). Through a `rewrite_links: true` route the client pages,
//! creates, PATCHes with `If-Match` and sends multipart and JSON batches whose part URLs
//! are written on the proxy's base; every link it sees points at the proxy and every
//! entity arrives exactly once.
//!
//! Needs `python3` with `odatapy==5.3.0` (`.ci/run` installs it); without it each test
//! prints why and passes without running.

mod support;

use std::collections::HashSet;
use std::process::Stdio;

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The running service: killed when dropped.
struct OData {
    _child: Child,
    port: u16,
}

async fn start_odata() -> Option<OData> {
    let import = Command::new("python3")
        .args([
            "-c",
            "import odatapy; assert odatapy.__version__ == '5.3.0'",
        ])
        .output()
        .await;
    if !import.is_ok_and(|out| out.status.success()) {
        eprintln!(
            "SKIPPED: real OData tests need python3 with odatapy 5.3.0 \
             (python3 -m pip install odatapy==5.3.0)"
        );
        return None;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/odata/server.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(60), lines.next_line())
        .await
        .expect("the OData service starts within a minute")
        .unwrap()
        .expect("the OData service prints its port");
    let port = line.strip_prefix("PORT ").unwrap().parse().unwrap();
    Some(OData {
        _child: child,
        port,
    })
}

async fn proxy_for(idp: &FakeIdp, odata: &OData) -> ProxyHandle {
    let yaml = format!(
        r#"
server:
  listen: 127.0.0.1:0
{credential}clients:
  erp:
    basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }}
  scanner:
    api_key: ${{SCANNER_KEY}}
routes:
  - prefix: /shop/
    upstream: http://127.0.0.1:{port}/shop/
    credential: bc
    clients: [erp, scanner]
    rewrite_links: true
"#,
        credential = bc_credential_yaml(TENANT, &idp.authority()),
        port = odata.port,
    );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    idp.wait_for_calls(1).await;
    proxy
}

/// Every absolute URL in `text` is on the proxy's base.
fn assert_links_on_proxy(text: &str, public: &str, upstream_port: u16) {
    assert!(
        !text.contains(&format!(":{upstream_port}")),
        "an upstream link reached the client: {text}"
    );
    for (at, _) in text.match_indices("http") {
        let rest = &text[at..];
        if rest.starts_with("http://") || rest.starts_with("https://") {
            assert!(rest.starts_with(public), "link off the proxy: {rest}");
        }
    }
}

async fn get(proxy: &ProxyHandle, target: &str, extra: &[(&str, &str)]) -> Answer {
    let (name, value) = erp();
    let mut headers = vec![(name, value.as_str()), ("accept", "application/json")];
    headers.extend_from_slice(extra);
    send(proxy.addr, "GET", target, &headers, "").await
}

#[tokio::test]
async fn paging_create_and_etag_patch_against_real_odata() {
    let Some(odata) = start_odata().await else {
        return;
    };
    let idp = FakeIdp::start().await;
    let proxy = proxy_for(&idp, &odata).await;
    let public = format!("http://{}/shop/", proxy.addr);

    // Server-driven paging: 12 pages of 100, followed through the rewritten nextLinks.
    let mut target = "/shop/Products".to_owned();
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let answer = get(&proxy, &target, &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_links_on_proxy(&answer.text(), &public, odata.port);
        let body = answer.json();
        assert!(
            body["@odata.context"]
                .as_str()
                .unwrap()
                .starts_with(&public)
        );
        ids.extend(
            body["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["ID"].as_i64().unwrap()),
        );
        pages += 1;
        match body["@odata.nextLink"].as_str() {
            Some(next) => {
                let rest = next.strip_prefix(&public).expect("nextLink on the proxy");
                target = format!("/shop/{rest}");
            }
            None => break,
        }
    }
    assert_eq!(pages, 12);
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 1200, "every entity exactly once");
    assert_eq!(unique.len(), 1200);

    // Create: Location and the body's links point at the proxy.
    let (name, value) = erp();
    let created = send(
        proxy.addr,
        "POST",
        "/shop/Products",
        &[(name, &value), ("content-type", "application/json")],
        r#"{"ID":9001,"Name":"created"}"#,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(
        created.header("location"),
        Some(format!("{public}Products(9001)").as_str())
    );
    assert_links_on_proxy(&created.text(), &public, odata.port);

    // PATCH with the entity's ETag; a stale ETag is refused by the server.
    let product = get(&proxy, "/shop/Products(7)", &[]).await;
    let etag = product.header("etag").unwrap().to_owned();
    let patch = |if_match: String| {
        let value = value.clone();
        async move {
            send(
                proxy.addr,
                "PATCH",
                "/shop/Products(7)",
                &[
                    ("authorization", &value),
                    ("content-type", "application/json"),
                    ("if-match", &if_match),
                ],
                r#"{"Name":"patched"}"#,
            )
            .await
        }
    };
    let answer = patch(etag.clone()).await;
    assert!(matches!(answer.status, 200 | 204), "{}", answer.text());
    assert_eq!(patch(etag).await.status, 412);
    let product = get(&proxy, "/shop/Products(7)", &[]).await;
    assert_eq!(product.json()["Name"], "patched");
    proxy.shutdown().await;
}

#[tokio::test]
async fn multipart_and_json_batches_against_real_odata() {
    let Some(odata) = start_odata().await else {
        return;
    };
    let idp = FakeIdp::start().await;
    let proxy = proxy_for(&idp, &odata).await;
    let public = format!("http://{}/shop/", proxy.addr);
    let (name, basic) = erp();

    // Parts written the way clients that only know the proxy write them, with the
    // caller's credentials copied into each (as `@odata/client` and `o.js` do).
    let part = |request: String| {
        format!(
            "--batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{request}\r\n"
        )
    };
    let body = format!(
        "{}{}--batch_1\r\nContent-Type: multipart/mixed; boundary=changeset_1\r\n\r\n\
         --changeset_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
         POST /shop/Products HTTP/1.1\r\nContent-Type: application/json\r\nAuthorization: {basic}\r\n\r\n\
         {{\"ID\":9100,\"Name\":\"in a change set\"}}\r\n\
         --changeset_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\n\
         PATCH Products(8) HTTP/1.1\r\nContent-Type: application/json\r\nIf-Match: W/\"1\"\r\nX-API-Key: {API_KEY}\r\n\r\n\
         {{\"Name\":\"patched in a batch\"}}\r\n--changeset_1--\r\n--batch_1--\r\n",
        part(format!(
            "GET {public}Products(1) HTTP/1.1\r\nAccept: application/json\r\nAuthorization: {basic}\r\n\r\n"
        )),
        part("GET /shop/Products?$top=3 HTTP/1.1\r\nAccept: application/json\r\n\r\n".to_owned()),
    );
    let answer = send(
        proxy.addr,
        "POST",
        "/shop/$batch",
        &[
            (name, &basic),
            ("content-type", "multipart/mixed; boundary=batch_1"),
        ],
        body,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let text = answer.text();
    assert_links_on_proxy(&text, &public, odata.port);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert_eq!(text.matches("HTTP/1.1 201 Created").count(), 1, "{text}");
    assert!(
        text.contains(&format!("Location: {public}Products(9100)")),
        "{text}"
    );
    // Products(1), then Products?$top=3 (1, 2, 3): each entity once per request.
    assert_eq!(text.matches("\"ID\":1,").count(), 2, "{text}");
    assert_eq!(text.matches("\"ID\":3,").count(), 1, "{text}");
    assert_eq!(text.matches("\"ID\":9100,").count(), 1, "{text}");
    // Status lines only: the server's random boundaries may contain any digits.
    assert!(
        !text.contains("HTTP/1.1 404") && !text.contains("HTTP/1.1 412"),
        "{text}"
    );
    let patched = get(&proxy, "/shop/Products(8)", &[]).await;
    assert_eq!(patched.json()["Name"], "patched in a batch");

    // JSON batch: absolute proxy URL, absolute path, relative; credentials in headers.
    let body = serde_json::json!({"requests": [
        {"id": "1", "method": "get", "url": format!("{public}Products(2)"),
         "headers": {"accept": "application/json", "authorization": basic}},
        {"id": "2", "method": "get", "url": "/shop/Products(3)", "headers": {"x-api-key": API_KEY}},
        {"id": "3", "method": "post", "url": "Products", "atomicityGroup": "g",
         "headers": {"content-type": "application/json"}, "body": {"ID": 9200, "Name": "json"}},
    ]})
    .to_string();
    let answer = send(
        proxy.addr,
        "POST",
        "/shop/$batch",
        &[(name, &basic), ("content-type", "application/json")],
        body,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_links_on_proxy(&answer.text(), &public, odata.port);
    let responses = answer.json()["responses"].as_array().unwrap().clone();
    assert_eq!(responses.len(), 3);
    let mut statuses: Vec<i64> = responses
        .iter()
        .map(|r| r["status"].as_i64().unwrap())
        .collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 201], "{}", answer.text());
    let created = get(&proxy, "/shop/Products(9200)", &[]).await;
    assert_eq!(created.status, 200);

    // A part outside the route: refused whole, nothing created.
    let body = serde_json::json!({"requests": [
        {"id": "1", "method": "post", "url": "Products", "headers": {"content-type": "application/json"},
         "body": {"ID": 9300, "Name": "must not exist"}},
        {"id": "2", "method": "get", "url": "http://127.0.0.1:1/elsewhere"},
    ]})
    .to_string();
    let answer = send(
        proxy.addr,
        "POST",
        "/shop/$batch",
        &[(name, &basic), ("content-type", "application/json")],
        body,
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert_eq!(get(&proxy, "/shop/Products(9300)", &[]).await.status, 404);
    proxy.shutdown().await;
}
