//! Tests of the demo issuer and sample upstream over real loopback sockets.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::*;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
}

async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let response = client.request(request).await.expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Answer {
        status,
        headers,
        text: String::from_utf8(bytes.to_vec()).expect("utf-8"),
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but unreserved characters (RFC 3986 §2.3).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn request_token(services: &DevServices, secret: &str, scope: &str) -> Answer {
    send(
        Method::POST,
        &services.token_url(),
        &[("content-type", "application/x-www-form-urlencoded")],
        &form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &services.client_id),
            ("client_secret", secret),
            ("scope", scope),
        ]),
    )
    .await
}

async fn token(services: &DevServices) -> String {
    let answer = request_token(
        services,
        services.client_secret().expose(),
        &services.scope(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    answer.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

fn claims_of(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("claims part");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
}

async fn get(url: &str, bearer: Option<&str>) -> Answer {
    let authorization = bearer.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = authorization
        .iter()
        .map(|a| ("authorization", a.as_str()))
        .collect();
    send(Method::GET, url, &headers, "").await
}

fn is_uuid_like(value: &Value) -> bool {
    value.as_str().is_some_and(|s| {
        s.len() == 36 && s.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
    })
}

#[tokio::test]
async fn issued_token_is_a_verifiable_entra_shaped_jwt_that_the_upstream_accepts() {
    let services = start_services().await.expect("start");
    let answer = request_token(
        &services,
        services.client_secret().expose(),
        &services.scope(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.headers["cache-control"], "no-store");
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    let token = body["access_token"].as_str().expect("token");

    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().expect("header"))
            .expect("base64url"),
    )
    .expect("json");
    assert_eq!(header, json!({"alg": "ES256", "typ": "JWT", "kid": "dev"}));
    let claims = claims_of(token);
    assert_eq!(claims["aud"], services.upstream_origin());
    assert_eq!(
        claims["iss"],
        format!("{}/{}/v2.0", services.authority(), DEV_TENANT)
    );
    assert_eq!(claims["tid"], DEV_TENANT);
    assert_eq!(claims["appid"], DEV_CLIENT_ID);
    assert_eq!(claims["azp"], DEV_CLIENT_ID);
    assert_eq!(claims["roles"], json!(["API.ReadWrite.All"]));
    assert!(is_uuid_like(&claims["oid"]) && claims["oid"] == claims["sub"]);
    let iat = claims["iat"].as_u64().expect("iat");
    assert_eq!(claims["nbf"].as_u64(), Some(iat));
    assert_eq!(claims["exp"].as_u64(), Some(iat + 3599));
    assert_eq!(services.tokens_issued(), 1);

    let companies = format!("{}api/v2.0/companies", services.upstream_base_url());
    let answer = get(&companies, Some(token)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json()["value"][0]["name"], "CRONUS USA, Inc.");
    services.shutdown().await;
}

#[tokio::test]
async fn secret_with_tilde_is_accepted_in_the_body_and_by_basic_auth() {
    let services = start_services().await.expect("start");
    let secret = services.client_secret().expose().to_owned();
    assert!(secret.contains('~'));
    // `client_secret_basic`: id and secret are form-urlencoded before base64 (RFC 6749 §2.3.1).
    let basic = STANDARD.encode(format!(
        "{}:{}",
        encode(&services.client_id),
        encode(&secret)
    ));
    let answer = send(
        Method::POST,
        &services.token_url(),
        &[("authorization", &format!("Basic {basic}"))],
        &form(&[
            ("grant_type", "client_credentials"),
            ("scope", &services.scope()),
        ]),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(services.tokens_issued(), 1);
}

#[tokio::test]
async fn issuer_errors_look_like_entra() {
    let services = start_services().await.expect("start");
    let scope = services.scope();

    let answer = request_token(&services, "not-the-secret", &scope).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let body = answer.json();
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([7000215]));
    let description = body["error_description"].as_str().expect("description");
    assert!(description.starts_with("AADSTS7000215: Invalid client secret provided."));
    assert!(!description.contains(services.client_secret().expose()));
    assert!(is_uuid_like(&body["trace_id"]) && is_uuid_like(&body["correlation_id"]));
    assert_eq!(
        answer.headers["x-ms-request-id"],
        body["trace_id"].as_str().expect("id")
    );

    let missing = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", DEV_CLIENT_ID),
        ("scope", &scope),
    ]);
    let answer = send(Method::POST, &services.token_url(), &[], &missing).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.json()["error"], "invalid_client");

    let unknown = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", "11111111-2222-3333-4444-555555555555"),
        ("client_secret", services.client_secret().expose()),
        ("scope", &scope),
    ]);
    let answer = send(Method::POST, &services.token_url(), &[], &unknown).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"], "unauthorized_client");
    assert_eq!(answer.json()["error_codes"], json!([700016]));

    let secret = services.client_secret().expose().to_owned();
    let answer = request_token(&services, &secret, &services.upstream_origin()).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"], "invalid_scope");
    assert_eq!(answer.json()["error_codes"], json!([70011]));

    let answer = request_token(&services, &secret, "https://elsewhere.example/.default").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"], "invalid_resource");

    let other_tenant = services
        .token_url()
        .replace(DEV_TENANT, "contoso.onmicrosoft.com");
    let body = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", DEV_CLIENT_ID),
        ("client_secret", &secret),
        ("scope", &scope),
    ]);
    let answer = send(Method::POST, &other_tenant, &[], &body).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error_codes"], json!([90002]));

    let answer = get(&services.token_url(), None).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.json()["error_codes"], json!([900561]));

    assert_eq!(services.tokens_issued(), 0);
}

#[tokio::test]
async fn upstream_rejects_missing_tampered_expired_and_foreign_tokens() {
    let services = start_services().await.expect("start");
    let url = format!("{}api/v2.0/companies", services.upstream_base_url());
    let expect_401 = |answer: Answer, what: &str| {
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "{what}: {}",
            answer.text
        );
        let challenge = answer.headers["www-authenticate"].to_str().expect("ascii");
        assert!(
            challenge.starts_with("Bearer error=\"invalid_token\""),
            "{what}: {challenge}"
        );
        assert_eq!(
            answer.json(),
            json!({"error": {"code": "Authentication_InvalidCredentials",
                "message": "The server has rejected the client credentials."}}),
            "{what}"
        );
    };

    expect_401(get(&url, None).await, "no token");
    let basic = send(
        Method::GET,
        &url,
        &[("authorization", "Basic ZGVtbzpkZW1v")],
        "",
    )
    .await;
    expect_401(basic, "basic");

    let good = token(&services).await;
    let parts: Vec<&str> = good.split('.').collect();
    let mut claims = claims_of(&good);
    claims["roles"] = json!(["Everything.All"]);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    expect_401(get(&url, Some(&tampered)).await, "tampered claims");
    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("signature");
    signature[10] ^= 1;
    let bad_signature = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        URL_SAFE_NO_PAD.encode(signature)
    );
    expect_401(get(&url, Some(&bad_signature)).await, "bad signature");
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    expect_401(get(&url, Some(&unsigned)).await, "alg none");

    let now = unix_now();
    let audience = services.upstream_origin();
    let expired = services
        .issuer
        .sign(&services.issuer.claims(&audience, now - 7200, now - 1))
        .expect("sign");
    expect_401(get(&url, Some(&expired)).await, "expired");
    let foreign = services
        .issuer
        .sign(
            &services
                .issuer
                .claims("https://api.businesscentral.dynamics.com", now, now + 600),
        )
        .expect("sign");
    expect_401(get(&url, Some(&foreign)).await, "other audience");

    // Another issuer's key, same claims.
    let other = start_services().await.expect("start");
    let forged = other
        .issuer
        .sign(&services.issuer.claims(&audience, now, now + 600))
        .expect("sign");
    expect_401(get(&url, Some(&forged)).await, "other key");

    assert_eq!(get(&url, Some(&good)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn companies_page_with_absolute_next_links_and_customers_carry_etags() {
    let services = start_services().await.expect("start");
    let token = token(&services).await;
    let api = format!("{}api/v2.0", services.upstream_base_url());

    let page1 = get(&format!("{api}/companies"), Some(&token)).await;
    assert_eq!(page1.status, StatusCode::OK);
    assert_eq!(page1.headers["odata-version"], "4.0");
    let page1 = page1.json();
    assert_eq!(
        page1["@odata.context"],
        format!("{api}/$metadata#companies")
    );
    let names: Vec<&str> = page1["value"]
        .as_array()
        .expect("value")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["CRONUS USA, Inc.", "CRONUS International Ltd."]);
    assert_eq!(page1["value"][0]["businessProfileId"], "");
    assert!(is_uuid_like(&page1["value"][0]["id"]));
    let next = page1["@odata.nextLink"].as_str().expect("nextLink");
    assert_eq!(
        next,
        format!("{api}/companies?{}", upstream::second_page_query())
    );

    let page2 = get(next, Some(&token)).await.json();
    assert_eq!(page2["value"].as_array().expect("value").len(), 1);
    assert!(page2.get("@odata.nextLink").is_none());

    let small = send(
        Method::GET,
        &format!("{api}/companies"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("prefer", "odata.maxpagesize=1"),
        ],
        "",
    )
    .await;
    assert_eq!(small.headers["preference-applied"], "odata.maxpagesize=1");
    assert_eq!(small.json()["value"].as_array().expect("value").len(), 1);

    let company = page1["value"][0]["id"].as_str().expect("id");
    let customers = get(
        &format!("{api}/companies({company})/customers"),
        Some(&token),
    )
    .await;
    assert_eq!(customers.status, StatusCode::OK);
    let customers = customers.json();
    let customers = customers["value"].as_array().expect("value");
    assert_eq!(customers.len(), 2);
    assert!(customers.iter().all(|c| {
        c["@odata.etag"]
            .as_str()
            .is_some_and(|e| e.starts_with("W/\""))
    }));

    for path in [
        "companies(00000000-0000-0000-0000-000000000000)/customers",
        "items",
    ] {
        let answer = get(&format!("{api}/{path}"), Some(&token)).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(answer.json()["error"]["code"], "BadRequest_NotFound");
    }
    let answer = get(
        &format!("{}/elsewhere", services.upstream_origin()),
        Some(&token),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);

    let post = send(
        Method::POST,
        &format!("{api}/companies"),
        &[("authorization", &format!("Bearer {token}"))],
        "{}",
    )
    .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn echo_reports_what_arrived_but_never_the_raw_token() {
    let services = start_services().await.expect("start");
    let token = token(&services).await;
    let target = "/v2.0/x/ODataV4/Company('CRONUS%20USA')/echo?$filter=a%20eq%20'b'&x=%2F";
    let answer = send(
        Method::PATCH,
        &format!("{}{target}", services.upstream_origin()),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("if-match", "W/\"JzE4OzE7MDA7Jw==\""),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ],
        "hello",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let signature = token.rsplit('.').next().expect("signature");
    assert!(!answer.text.contains(&token) && !answer.text.contains(signature));

    let echo = answer.json();
    assert_eq!(echo["method"], "PATCH");
    assert_eq!(echo["target"], target);
    assert_eq!(echo["body_length"], 5);
    assert_eq!(
        echo["body_sha256"],
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    assert_eq!(echo["headers"]["if-match"], "W/\"JzE4OzE7MDA7Jw==\"");
    assert_eq!(echo["headers"]["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
    let authorization = echo["headers"]["authorization"].as_str().expect("summary");
    assert!(
        authorization.starts_with(&format!(
            "Bearer <verified ES256 token: aud={}, appid={DEV_CLIENT_ID}, roles=[API.ReadWrite.All], expires in ",
            services.upstream_origin()
        )),
        "{authorization}"
    );
    let listed = echo["header_list"].as_array().expect("header_list");
    assert_eq!(
        listed
            .iter()
            .filter(|pair| pair[0] == "x-forwarded-for")
            .count(),
        2
    );
}

#[tokio::test]
async fn built_in_config_points_at_the_running_services_and_keeps_secrets_in_variables() {
    let services = start_services().await.expect("start");
    let listen: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    let config = services.config_source(listen);
    let secret = services.client_secret().expose();
    assert!(!config.yaml.contains(secret));
    assert!(!format!("{config:?}").contains(secret));
    assert_eq!(config.variables["DEV_CLIENT_SECRET"], secret);
    assert_eq!(config.variables["DEV_API_KEY"], DEV_API_KEY);

    let yaml: Value = serde_yaml_ng::from_str(&config.yaml).expect("yaml");
    assert_eq!(yaml["server"]["listen"], "127.0.0.1:8080");
    let demo = &yaml["credentials"]["demo"];
    assert_eq!(demo["type"], "client_secret");
    assert_eq!(demo["tenant_id"], DEV_TENANT);
    assert_eq!(demo["client_id"], DEV_CLIENT_ID);
    assert_eq!(demo["authority"], services.authority());
    assert_eq!(demo["client_secret"], "${DEV_CLIENT_SECRET}");
    assert!(demo.get("token_url").is_none());
    assert_eq!(
        yaml["clients"]["demo"]["basic"],
        json!({"username": "demo",
            "password": Secret::new("demo-password").digest().to_config_form()})
    );
    assert_eq!(yaml["clients"]["scanner"]["api_key"], "${DEV_API_KEY}");
    assert_eq!(
        yaml["routes"],
        json!([{"prefix": "/bc/", "upstream": services.upstream_base_url(),
            "credential": "demo", "scope": services.scope(), "clients": ["demo", "scanner"],
            "rewrite_links": true}])
    );
    // The credential's Entra endpoint is the issuer's token URL.
    assert_eq!(
        format!("{}/{DEV_TENANT}/oauth2/v2.0/token", services.authority()),
        services.token_url()
    );
}

#[tokio::test]
async fn banner_uses_the_real_ports() {
    let services = start_services().await.expect("start");
    let proxy: SocketAddr = "127.0.0.1:41234".parse().expect("addr");
    let admin: SocketAddr = "127.0.0.1:41235".parse().expect("addr");
    let text = banner(&services, proxy, Some(admin));
    for line in [
        "curl -u demo:demo-password http://127.0.0.1:41234/bc/api/v2.0/companies",
        "curl -H 'X-API-Key: demo-key' http://127.0.0.1:41234/bc/api/v2.0/echo",
        "curl -i http://127.0.0.1:41234/bc/api/v2.0/companies",
        "curl -i -u demo:wrong http://127.0.0.1:41234/bc/api/v2.0/companies",
        "curl -i --path-as-is -u demo:demo-password 'http://127.0.0.1:41234/bc/../admin'",
        "$skiptoken=",
        "links in answers are rewritten to http://127.0.0.1:41234/bc/",
        "status page      http://127.0.0.1:41235/",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(text.contains(&services.token_url()));
    assert!(!text.contains(services.client_secret().expose()));
}

#[tokio::test]
async fn demo_refuses_non_loopback_addresses() {
    let error = run("0.0.0.0:8080".parse().expect("addr"))
        .await
        .expect_err("refused");
    assert!(matches!(error, DevError::NotLoopback(_)));
}

#[tokio::test]
async fn shutdown_closes_both_listeners() {
    let services = start_services().await.expect("start");
    let addrs = [services.issuer_addr, services.upstream_addr];
    services.shutdown().await;
    for addr in addrs {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr}"
        );
    }
}
