//! Canary sweep: planted secrets never appear in logs (at TRACE), response bodies or
//! response headers — plain, base64 or URL-encoded.

mod support;

use base64::Engine;
use support::*;

const ISSUED_TOKEN: &str = "at_CANARY_91bd";

fn forms(secret: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    vec![
        secret.to_owned(),
        b64.encode(secret),
        secret.replace('~', "%7E").replace('+', "%2B"),
        // Basic credentials embed the secret after "user:"; check that encoding too.
        b64.encode(format!("erp:{secret}")),
    ]
}

#[test]
fn no_secret_or_token_reaches_logs_or_responses() {
    let (seen, capture) = capture_logs(async {
        let mut seen = String::new();
        let idp = FakeIdp::start_with(IdpMode::IssueToken(ISSUED_TOKEN.into())).await;
        let upstream = FakeUpstream::start().await;
        let proxy = spawn_proxy(config(&standard_yaml(&idp, &upstream), standard_vars())).await;
        idp.wait_for_calls(1).await;
        let good = basic("erp", PASSWORD);
        let wrong = basic("erp", &format!("{PASSWORD}x"));
        let requests: Vec<Vec<(&str, &str)>> = vec![
            vec![("authorization", good.as_str())],
            vec![("authorization", wrong.as_str())],
            vec![("x-api-key", API_KEY)],
            vec![("x-api-key", "ak_CANARY_0c2eWRONG")],
            vec![
                ("authorization", good.as_str()),
                ("authorization", wrong.as_str()),
            ],
        ];
        for headers in &requests {
            let answer = send(proxy.addr, "GET", "/bc/x?$filter=a", headers, "").await;
            seen.push_str(&format!("{:?}\n{}\n", answer.headers, answer.text()));
        }
        // A failing identity provider: its error flows into logs and the 503 body.
        idp.set_mode(IdpMode::invalid_client());
        upstream.respond(|_| {
            http::Response::builder()
                .status(401)
                .body(Default::default())
                .unwrap()
        });
        let answer = send(proxy.addr, "GET", "/bc/x", &[("authorization", &good)], "").await;
        seen.push_str(&answer.text());
        // The upstream did receive the token (so the sweep is meaningful).
        assert!(
            upstream
                .requests()
                .iter()
                .any(|r| r.header("authorization") == Some(&format!("Bearer {ISSUED_TOKEN}")))
        );
        proxy.shutdown().await;
        seen
    });
    let logs = capture.text();
    assert!(
        logs.contains("Request."),
        "access log lines expected:\n{logs}"
    );
    let everything = format!("{logs}\n{seen}");
    for canary in [CLIENT_SECRET, PASSWORD, API_KEY, ISSUED_TOKEN] {
        for form in forms(canary) {
            assert!(
                !everything.contains(&form),
                "{canary} leaked as {form}:\n{everything}"
            );
        }
    }
    assert!(
        !logs.contains("CANARY"),
        "a canary fragment leaked:\n{logs}"
    );
}
