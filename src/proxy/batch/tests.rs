use http::HeaderValue;
use proptest::prelude::*;

use super::*;

const UPSTREAM: &str = "https://org.crm.test/api/data/v9.2/";
const PUBLIC: &str = "http://proxy.test:8080";

fn batch(content_type: &'static str, path: &str) -> Result<Option<Batch>, BatchError> {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let api_key = HeaderName::from_static("x-api-key");
    let context = RequestContext {
        path,
        route_prefix: "/crm/",
        upstream_url: UPSTREAM,
        upstream_authority: "org.crm.test",
        public_base: Some(PUBLIC),
        other_prefixes: &["/crm/", "/crm/admin/", "/bc/"],
        policy: RequestPolicy {
            api_key_header: &api_key,
            allow_underscores: false,
            strip: &[],
        },
    };
    Batch::for_request(&Method::POST, &headers, &context)
}

/// Translates `input` fed in pieces of `size` bytes.
fn translate(content_type: &'static str, input: &[u8], size: usize) -> Result<String, BatchError> {
    let mut batch = batch(content_type, "/crm/$batch")?.expect("a batch");
    let mut out = BytesMut::new();
    for chunk in input.chunks(size.max(1)) {
        batch.push(chunk, &mut out)?;
        assert!(batch.buffered() <= 64 * 1024 + 16);
    }
    batch.finish(&mut out)?;
    Ok(String::from_utf8(out.to_vec()).unwrap())
}

const MULTIPART: &str = "multipart/mixed; boundary=batch_1";

fn multipart(parts: &str) -> String {
    format!("--batch_1\r\n{parts}--batch_1--\r\n")
}

fn http_part(request: &str) -> String {
    format!(
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{request}\r\n"
    )
}

#[test]
fn only_post_to_a_batch_resource_is_a_batch() {
    assert!(batch(MULTIPART, "/crm/$batch").unwrap().is_some());
    assert!(
        batch(MULTIPART, "/crm/api/v2.0/%24BATCH")
            .unwrap()
            .is_some()
    );
    assert!(batch(MULTIPART, "/crm/accounts").unwrap().is_none());
    assert!(batch(MULTIPART, "/crm/$batchx").unwrap().is_none());
    assert_eq!(
        batch("text/plain", "/crm/$batch").unwrap_err(),
        BatchError::UnsupportedType
    );
    assert_eq!(
        batch("multipart/mixed", "/crm/$batch").unwrap_err(),
        BatchError::UnsupportedType
    );
    assert!(batch("application/json", "/crm/$batch").unwrap().is_some());
}

#[test]
fn part_headers_lose_caller_credentials_and_identity() {
    let body = multipart(&http_part(
        "GET accounts(1) HTTP/1.1\r\nAuthorization: Basic ZXJwOnB3\r\nX-API-Key: k\r\n\
         Proxy-Authorization: x\r\nX-Forwarded-For: 1.2.3.4\r\nX-MS-CLIENT-PRINCIPAL-NAME: a\r\n\
         x_forwarded_for: 5.6.7.8\r\nTrue-Client-IP: 1.1.1.1\r\nHost: proxy.test:8080\r\n\
         If-Match: W/\"1\"\r\nPrefer: return=representation\r\n\r\n",
    ));
    for size in [1, 2, 7, 64, usize::MAX] {
        let out = translate(MULTIPART, body.as_bytes(), size).unwrap();
        for gone in [
            "Authorization",
            "X-API-Key",
            "Forwarded",
            "PRINCIPAL",
            "x_forwarded",
            "True-Client",
            "proxy.test",
        ] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        assert!(out.contains("Host: org.crm.test\r\n"), "{out}");
        assert!(out.contains("If-Match: W/\"1\"\r\nPrefer: return=representation\r\n\r\n"));
        assert!(out.starts_with("--batch_1\r\nContent-Type: application/http\r\n"));
        assert!(out.ends_with("--batch_1--\r\n"));
    }
}

#[test]
fn part_urls_on_the_proxy_base_are_translated() {
    let cases = [
        (
            "http://proxy.test:8080/crm/accounts(1)?$select=name",
            "https://org.crm.test/api/data/v9.2/accounts(1)?$select=name",
        ),
        (
            "HTTP://PROXY.test:8080/crm/accounts(1)",
            "https://org.crm.test/api/data/v9.2/accounts(1)",
        ),
        ("/crm/accounts(1)", "/api/data/v9.2/accounts(1)"),
        ("/CRM/accounts(1)", "/api/data/v9.2/accounts(1)"),
        ("accounts(1)", "accounts(1)"),
        ("$1/contacts", "$1/contacts"),
        (
            "https://org.crm.test:443/api/data/v9.2/tasks",
            "https://org.crm.test:443/api/data/v9.2/tasks",
        ),
    ];
    for (url, expected) in cases {
        let body = multipart(&http_part(&format!("GET {url} HTTP/1.1\r\n\r\n")));
        let out = translate(MULTIPART, body.as_bytes(), 3).unwrap();
        assert!(
            out.contains(&format!("\r\nGET {expected} HTTP/1.1\r\n")),
            "{url}: {out}"
        );
    }
}

#[test]
fn part_urls_outside_the_route_refuse_the_batch() {
    for url in [
        "http://proxy.test:8080/bc/items",
        "http://proxy.test:8081/crm/accounts",
        "https://other.test/api/data/v9.2/accounts",
        "https://org.crm.test/api/data/v9.1/accounts",
        "//org.crm.test/api/data/v9.2/accounts",
        "/bc/items",
        "/api/data/v9.2/accounts",
        "/crm/admin/users",
        "/crm/Admin(1)",
        "admin/users",
        "../bc/items",
        "/crm/%2e%2e/bc/items",
        "accounts/%2F..",
        "file:///etc/passwd",
        "javascript:alert(1)",
    ] {
        let body = multipart(&http_part(&format!(
            "GET accounts HTTP/1.1\r\n\r\n\r\n--batch_1\r\n{}",
            http_part(&format!("GET {url} HTTP/1.1\r\n\r\n"))
        )));
        let error = translate(MULTIPART, body.as_bytes(), usize::MAX).unwrap_err();
        assert!(
            matches!(error, BatchError::OutsideRoute | BatchError::BadUrl(_)),
            "{url}: {error:?}"
        );
    }
}

#[test]
fn change_sets_are_followed_and_malformed_shapes_refused() {
    let changeset = "Content-Type: multipart/mixed; boundary=\"cs_2\"\r\n\r\n--cs_2\r\n\
         Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
         POST /crm/accounts HTTP/1.1\r\nContent-Type: application/json\r\nX-API-Key: k\r\n\r\n\
         {\"name\":\r\n--cs_2x is text\"}\r\n--cs_2\r\n\
         Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\n\
         PATCH $1 HTTP/1.1\r\nIf-Match: *\r\n\r\n{}\r\n--cs_2--\r\n";
    let body = multipart(changeset);
    let out = translate(MULTIPART, body.as_bytes(), 5);
    // `--cs_2x` at a line start is not this multipart's delimiter: refused.
    assert!(matches!(out, Err(BatchError::Malformed(_))), "{out:?}");
    let body = multipart(&changeset.replace("\r\n--cs_2x", "\r\n\"cs_2x"));
    let out = translate(MULTIPART, body.as_bytes(), 5).unwrap();
    assert!(
        out.contains("POST /api/data/v9.2/accounts HTTP/1.1\r\n"),
        "{out}"
    );
    assert!(out.contains("PATCH $1 HTTP/1.1\r\nIf-Match: *\r\n\r\n{}\r\n--cs_2--\r\n"));
    assert!(!out.contains("X-API-Key"));

    for bad in [
        // Not application/http.
        "Content-Type: text/plain\r\n\r\nGET http://evil/ HTTP/1.1\r\n\r\n\r\n".to_owned(),
        http_part("GET accounts HTTP/1.1\r\nAuthorization: x\r\n y\r\n\r\n"),
        http_part("GET accounts\r\n\r\n"),
        http_part("GET accounts HTTP/1.1\r\nBad Name: x\r\n\r\n"),
        http_part("GET accounts HTTP/1.1\rX: y\r\n\r\n"),
        "Content-Type: application/http\r\nContent-Transfer-Encoding: base64\r\n\r\nR0VU\r\n"
            .to_owned(),
        "Content-Type: application/http\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            .to_owned(),
    ] {
        let body = multipart(&bad);
        assert!(
            matches!(
                translate(MULTIPART, body.as_bytes(), usize::MAX),
                Err(BatchError::Malformed(_))
            ),
            "{bad}"
        );
    }
    // Truncated: no closing delimiter.
    let body = format!(
        "--batch_1\r\n{}",
        http_part("GET accounts HTTP/1.1\r\n\r\n")
    );
    assert!(translate(MULTIPART, body.as_bytes(), usize::MAX).is_err());
}

#[test]
fn preamble_and_epilogue_are_dropped() {
    let body = format!(
        "preamble GET http://evil/ HTTP/1.1\r\n{}epilogue\r\n--batch_1\r\nmore",
        multipart(&http_part("GET accounts HTTP/1.1\r\n\r\n"))
    );
    let out = translate(MULTIPART, body.as_bytes(), 4).unwrap();
    assert!(
        out.starts_with("--batch_1\r\n") && out.ends_with("--batch_1--\r\n"),
        "{out}"
    );
}

const JSON: &str = "application/json";

#[test]
fn json_batches_lose_credentials_and_get_upstream_urls() {
    let body = r#"{"requests":[{"id":"1","method":"get","url":"http://proxy.test:8080/crm/accounts?$top=1","headers":{"Authorization":"Basic eA==","x-api-key":"k","accept":"application/json","X-Forwarded-Host":"a"}},
      {"id":"2","atomicityGroup":"g","method":"post","URL":"/crm/accounts","headers":{"content-type":"application/json","If-Match":"*"},"body":{"url":"http://elsewhere/","headers":{"Authorization":"kept: not a header"}}},
      {"id":"3","method":"get","u\u0072l":"$2/contacts","dependsOn":["2"]}]}"#;
    for size in [1, 3, 16, usize::MAX] {
        let out = translate(JSON, body.as_bytes(), size).unwrap();
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        let requests = value["requests"].as_array().unwrap();
        assert_eq!(requests.len(), 3);
        assert_eq!(
            requests[0]["url"],
            "https://org.crm.test/api/data/v9.2/accounts?$top=1"
        );
        assert_eq!(
            requests[0]["headers"],
            serde_json::json!({"accept":"application/json"})
        );
        assert_eq!(requests[1]["URL"], "/api/data/v9.2/accounts");
        assert_eq!(
            requests[1]["headers"],
            serde_json::json!({"content-type":"application/json","If-Match":"*"})
        );
        // Bodies are the inner request's business, not headers or URLs of the batch.
        assert_eq!(requests[1]["body"]["url"], "http://elsewhere/");
        assert_eq!(requests[2]["url"], "$2/contacts");
    }
}

#[test]
fn json_batches_outside_the_route_or_malformed_are_refused() {
    for body in [
        r#"{"requests":[{"id":"1","method":"get","url":"accounts"},{"id":"2","method":"get","url":"http://proxy.test:8080/bc/items"}]}"#,
        r#"{"requests":[{"id":"1","method":"get","Url":"https://evil.test/x"}]}"#,
        r#"{"requests":[{"id":"1","method":"get","url":"../bc/x"}]}"#,
        r#"{"requests":[{"id":"1","method":"get","url":5}]}"#,
        r#"{"requests":[{"id":"1","headers":"Authorization: x"}]}"#,
        r#"{"requests":{"id":"1"}}"#,
        r#"{"requests":["x"]}"#,
        r#"{"requests":[]} {"requests":[]}"#,
        r#"{"requests":[],}"#,
        r#"/* */{"requests":[]}"#,
        r#"{"requests":[{"id":"1"}]"#,
    ] {
        assert!(translate(JSON, body.as_bytes(), 2).is_err(), "{body}");
    }
}

// Generated batches: any boundary, change sets, part headers and URLs, arriving in any
// split. The output (what the upstream receives) never holds a caller credential or a
// proxy URL, and each request is there exactly once, in order.

const CREDENTIALS: [&str; 6] = [
    "Authorization: Basic CANARYcred",
    "authorization: Bearer CANARYcred",
    "X-API-Key: CANARYcred",
    "Proxy-Authorization: CANARYcred",
    "X-Forwarded-For: CANARYcred",
    "X_Api_Key: CANARYcred",
];
const KEPT: [&str; 4] = [
    "If-Match: W/\"7\"",
    "Prefer: odata.maxpagesize=5",
    "OData-Version: 4.0",
    "Content-ID: 9",
];

fn url_for(kind: u8, n: usize) -> (String, String) {
    match kind % 4 {
        0 => (
            format!("http://proxy.test:8080/crm/e({n})"),
            format!("{UPSTREAM}e({n})"),
        ),
        1 => (format!("/crm/e({n})"), format!("/api/data/v9.2/e({n})")),
        2 => (format!("e({n})"), format!("e({n})")),
        _ => (format!("{UPSTREAM}e({n})"), format!("{UPSTREAM}e({n})")),
    }
}

prop_compose! {
    fn request()(kind in any::<u8>(), headers in proptest::collection::vec(0..10usize, 0..6),
                 body in "[a-z {}\":,]{0,30}") -> (u8, Vec<usize>, String) {
        (kind, headers, body)
    }
}

fn request_text(n: usize, (kind, headers, body): &(u8, Vec<usize>, String)) -> String {
    let (url, _) = url_for(*kind, n);
    let mut text = format!("PATCH {url} HTTP/1.1\r\n");
    for &h in headers {
        let line = if h < CREDENTIALS.len() {
            CREDENTIALS[h]
        } else {
            KEPT[h - CREDENTIALS.len()]
        };
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text.push_str(body);
    text
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn generated_multipart_batches_reach_the_upstream_clean_and_whole(
        boundary in "[A-Za-z0-9_'()+,./:=?-]{1,40}",
        groups in proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(request(), 1..4)), 1..4),
        mime_credential in any::<bool>(),
    ) {
        let inner = format!("{boundary}_cs");
        let mut body = String::new();
        let mut n = 0;
        let mut expected = Vec::new();
        for (changeset, requests) in &groups {
            if *changeset {
                body.push_str(&format!(
                    "--{boundary}\r\nContent-Type: multipart/mixed; boundary=\"{inner}\"\r\n\r\n"));
            }
            for request in requests {
                let delimiter = if *changeset { &inner } else { &boundary };
                body.push_str(&format!("--{delimiter}\r\n"));
                body.push_str("Content-Type: application/http\r\n");
                if mime_credential {
                    body.push_str("Authorization: Basic CANARYcred\r\n");
                }
                body.push_str("Content-Transfer-Encoding: binary\r\n\r\n");
                body.push_str(&request_text(n, request));
                body.push_str("\r\n");
                expected.push(url_for(request.0, n).1);
                n += 1;
            }
            if *changeset {
                body.push_str(&format!("--{inner}--\r\n"));
            }
        }
        body.push_str(&format!("--{boundary}--\r\n"));

        let content_type: &'static str =
            Box::leak(format!("multipart/mixed; boundary=\"{boundary}\"").into_boxed_str());
        let whole = translate(content_type, body.as_bytes(), usize::MAX).unwrap();
        prop_assert!(!whole.contains("CANARY"), "{}", whole);
        prop_assert!(!whole.contains("proxy.test"), "{}", whole);
        let lines: Vec<&str> = whole.lines().filter(|l| l.starts_with("PATCH ")).collect();
        let urls: Vec<String> = lines
            .iter()
            .map(|l| l.split(' ').nth(1).unwrap().to_owned())
            .collect();
        prop_assert_eq!(&urls, &expected);
        for kept in KEPT {
            prop_assert_eq!(body.matches(kept).count(), whole.matches(kept).count());
        }
        // Split at every byte: the same output.
        for at in 0..body.len() {
            let mut batch = batch(content_type, "/crm/$batch").unwrap().unwrap();
            let mut out = BytesMut::new();
            batch.push(&body.as_bytes()[..at], &mut out).unwrap();
            batch.push(&body.as_bytes()[at..], &mut out).unwrap();
            batch.finish(&mut out).unwrap();
            prop_assert_eq!(std::str::from_utf8(&out).unwrap(), whole.as_str());
        }
    }

    #[test]
    fn generated_json_batches_reach_the_upstream_clean_and_whole(
        requests in proptest::collection::vec(request(), 1..6),
        chunk in 1..40usize,
    ) {
        let mut entries = Vec::new();
        let mut expected = Vec::new();
        for (n, (kind, headers, body)) in requests.iter().enumerate() {
            let (url, translated) = url_for(*kind, n);
            let mut map = serde_json::Map::new();
            for &h in headers {
                let line = if h < CREDENTIALS.len() { CREDENTIALS[h] } else { KEPT[h - CREDENTIALS.len()] };
                let (name, value) = line.split_once(": ").unwrap();
                map.insert(name.to_owned(), value.into());
            }
            entries.push(serde_json::json!({
                "id": n.to_string(), "method": "patch", "url": url,
                "headers": map, "body": {"text": body},
            }));
            expected.push(translated);
        }
        let body = serde_json::json!({"requests": entries}).to_string();
        let whole = translate(JSON, body.as_bytes(), usize::MAX).unwrap();
        prop_assert!(!whole.contains("CANARY") && !whole.contains("proxy.test"), "{}", whole);
        let value: serde_json::Value = serde_json::from_str(&whole).unwrap();
        let urls: Vec<&str> = value["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["url"].as_str().unwrap())
            .collect();
        prop_assert_eq!(urls, expected.iter().map(String::as_str).collect::<Vec<_>>());
        prop_assert_eq!(translate(JSON, body.as_bytes(), chunk).unwrap(), whole.as_str());
        for at in 0..body.len() {
            let mut batch = batch(JSON, "/crm/$batch").unwrap().unwrap();
            let mut out = BytesMut::new();
            batch.push(&body.as_bytes()[..at], &mut out).unwrap();
            batch.push(&body.as_bytes()[at..], &mut out).unwrap();
            batch.finish(&mut out).unwrap();
            prop_assert_eq!(std::str::from_utf8(&out).unwrap(), whole.as_str());
        }
    }
}
