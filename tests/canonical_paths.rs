//! Route matching on one canonical path (docs/request-handling.md, SECURITY.md "Routing
//! and path safety"): a client of `/bc/` must never reach what the nested route
//! `/bc/admin/` owns on the same upstream, whatever spelling of `admin` it sends. Real
//! sockets, raw request bytes, and assertions on what the fake upstream received.

mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use s2s_proxy::fuzzing::{lenient_view, reaches};
use support::*;

/// The nested route's upstream path; the parent's is `/bc-up/`.
const ADMIN_UP: &str = "/bc-up/admin/";
const USERS_UP: &str = "/crm-up/api/data/v9.2/systemusers/";

/// `erp` may use `/bc/` and `/crm/`, `admin` only the routes nested in them, on the same
/// upstream paths.
fn nested_yaml(idp: &FakeIdp, upstream: &FakeUpstream) -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:0
{credential}clients:
  erp:
    basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }}
  admin:
    basic: {{ username: admin, password: "${{ERP_PASSWORD}}" }}
routes:
  - prefix: /bc/
    upstream: {base}/bc-up/
    credential: bc
    clients: [erp]
  - prefix: /bc/admin/
    upstream: {base}{ADMIN_UP}
    credential: bc
    clients: [admin]
  - prefix: /crm/
    upstream: {base}/crm-up/api/data/v9.2/
    credential: bc
    clients: [erp]
  - prefix: /crm/systemusers/
    upstream: {base}{USERS_UP}
    credential: bc
    clients: [admin]
"#,
        credential = bc_credential_yaml(TENANT, &idp.authority()),
        base = upstream.base(),
    )
}

async fn setup() -> (FakeIdp, FakeUpstream, ProxyHandle) {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_proxy(config(&nested_yaml(&idp, &upstream), standard_vars())).await;
    idp.wait_for_calls(1).await;
    (idp, upstream, proxy)
}

/// `GET target` as `user`, sent byte for byte; the status and what the upstream received
/// for it.
async fn get_as(
    user: &str,
    proxy: &ProxyHandle,
    upstream: &FakeUpstream,
    target: &str,
) -> (u16, Vec<String>) {
    let before = upstream.count();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: proxy\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
        basic(user, PASSWORD)
    );
    let response = raw(proxy.addr, request.as_bytes()).await;
    let seen = upstream.requests()[before..]
        .iter()
        .map(|r| r.target.clone())
        .collect();
    (raw_status(&response), seen)
}

/// Whether an upstream target is at or under `base`, as the most lenient upstream reads it.
fn lands_in(target: &str, base: &str) -> bool {
    reaches(&lenient_view(target), base)
}

#[tokio::test]
async fn the_reviewed_spellings_never_reach_the_nested_route_as_the_parent_client() {
    let (_idp, upstream, proxy) = setup().await;
    for (target, status) in [
        ("/bc/admin", 403),
        ("/bc/admin(1)", 403),
        ("/bc/ADMIN/x", 403),
        ("/bc//admin/x", 400),
        ("/bc/admin;x/x", 400),
        ("/bc/admin./x", 400),
        ("/bc/%u0061dmin/x", 400),
        ("/bc/..;/bc/admin/x", 400),
        ("/bc/x/..;/admin/x", 400),
        ("/bc/admin/..;/x", 400),
        ("/crm/systemusers", 403),
        (
            "/crm/systemusers(00000000-0000-0000-0000-000000000001)",
            403,
        ),
    ] {
        let (got, seen) = get_as("erp", &proxy, &upstream, target).await;
        assert_eq!(got, status, "{target}");
        assert!(seen.is_empty(), "{target} reached {seen:?}");
    }
    assert_eq!(upstream.count(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn unlisted_spellings_are_refused_or_belong_to_the_nested_route() {
    let (_idp, upstream, proxy) = setup().await;
    for (target, status) in [
        // Case and escapes mixed.
        ("/bc/%41DmIn/x", 403),
        ("/bc/Adm%49n/x", 403),
        ("/bc/%61%64%6d%69%6e/x", 403),
        ("/BC/%61DMIN", 403),
        ("/%62c/admin/x", 403),
        ("/bc/ADMIN(1)", 403),
        ("/bc/admin%28'x'%29", 403),
        ("/bc/Admin?$top=1", 403),
        ("/bc/admin/?$top=1", 403),
        // A backend that decodes before it splits off the query reads these as `admin`.
        ("/bc/admin%3F/x", 403),
        ("/bc/admin%23x", 403),
        // .NET folds ı, İ (and ſ, K) into ASCII letters when it ignores case.
        ("/bc/adm%C4%B1n/x", 403),
        ("/bc/ADM%C4%B0N", 403),
        // Windows strips trailing dots and spaces, however they are written.
        ("/bc/admin%2e/x", 400),
        ("/bc/admin%2E", 400),
        ("/bc/admin.", 400),
        ("/bc/admin%20/x", 400),
        ("/bc/admin%20", 400),
        ("/bc/admin.%20./x", 400),
        ("/bc/ADMIN.../x", 400),
        // Matrix parameters in any encoding, and `%u` in any case.
        ("/bc/admin%3bx/x", 400),
        ("/bc/admin%3B/x", 400),
        ("/bc/.;/admin/x", 400),
        ("/bc/%U0061dmin/x", 400),
        ("/bc/%u0041DMIN", 400),
        ("/bc/%%36%31dmin/x", 400),
        // Empty segments anywhere, dot segments in any encoding, separators.
        ("/bc/x//admin/x", 400),
        ("//bc/admin/x", 400),
        ("/bc/admin/%2e%2e/x", 400),
        ("/bc/%2e/admin/x", 400),
        ("/bc/x/%2E%2e/admin/x", 400),
        ("/bc/admin%2fx", 400),
        ("/bc/admin%5Cx", 400),
        ("/bc\\admin\\x", 400),
        // Raw bytes outside printable ASCII: dotless i, C1 NEL, U+2028, a bidi override.
        ("/bc/adm\u{131}n/x", 400),
        ("/bc/admin\u{85}/x", 400),
        ("/bc/admin\u{2028}/x", 400),
        ("/bc/\u{202e}nimda/x", 400),
        ("/bc/x?q=\u{202e}nimda", 400),
        ("/bc/x?q=caf\u{e9}", 400),
        ("/crm/SystemUsers", 403),
        ("/crm/%73ystemusers(1)", 403),
        ("/crm/systemusers%28%27x%27%29", 403),
        ("/crm/systemusers./x", 400),
    ] {
        let (got, seen) = get_as("erp", &proxy, &upstream, target).await;
        assert_eq!(got, status, "{target}");
        assert!(seen.is_empty(), "{target} reached {seen:?}");
    }
    assert_eq!(upstream.count(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_parent_client_keeps_everything_else_under_its_route() {
    let (_idp, upstream, proxy) = setup().await;
    for (target, forwarded) in [
        ("/bc/administrators/x", "/bc-up/administrators/x"),
        ("/bc/admins", "/bc-up/admins"),
        ("/bc/x/admin/y", "/bc-up/x/admin/y"),
        ("/bc/admin-x", "/bc-up/admin-x"),
        ("/bc/adm%C4%B2n", "/bc-up/adm%C4%B2n"),
        ("/bc/%7Euser/%41", "/bc-up/~user/A"),
        (
            "/bc/Company('CRONUS%20USA')/x?$filter=a%20eq%20'%41'",
            "/bc-up/Company('CRONUS%20USA')/x?$filter=a%20eq%20'%41'",
        ),
        ("/bc/100%25/%2541dmin", "/bc-up/100%25/%2541dmin"),
        ("/bc", "/bc-up"),
        ("/BC?$top=1", "/bc-up?$top=1"),
        ("/crm/systemusersx", "/crm-up/api/data/v9.2/systemusersx"),
        ("/crm/accounts(1)", "/crm-up/api/data/v9.2/accounts(1)"),
    ] {
        let (status, seen) = get_as("erp", &proxy, &upstream, target).await;
        assert_eq!(status, 200, "{target}");
        assert_eq!(seen, [forwarded], "{target}");
        assert!(!lands_in(forwarded, ADMIN_UP) && !lands_in(forwarded, USERS_UP));
    }
    // The nested route's client has no business on the parent route.
    let (status, seen) = get_as("admin", &proxy, &upstream, "/bc/x").await;
    assert_eq!((status, seen.len()), (403, 0));
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_nested_client_reaches_its_route_in_every_legitimate_spelling() {
    let (_idp, upstream, proxy) = setup().await;
    for (target, forwarded) in [
        ("/bc/admin", "/bc-up/admin"),
        ("/bc/admin?$top=1", "/bc-up/admin?$top=1"),
        ("/bc/admin(1)", "/bc-up/admin(1)"),
        ("/bc/admin(1)/x", "/bc-up/admin(1)/x"),
        ("/bc/admin%28'x'%29", "/bc-up/admin%28'x'%29"),
        ("/bc/admin/", ADMIN_UP),
        ("/bc/ADMIN/x", "/bc-up/admin/x"),
        ("/bc/%61dmin/x", "/bc-up/admin/x"),
        ("/bc/Adm%C4%B1n/x", "/bc-up/admin/x"),
        ("/bc/admin/%7Euser", "/bc-up/admin/~user"),
        (
            "/bc/admin/Company('CRONUS%20USA')/x%41?a=%41",
            "/bc-up/admin/Company('CRONUS%20USA')/xA?a=%41",
        ),
        ("/crm/systemusers", "/crm-up/api/data/v9.2/systemusers"),
        (
            "/crm/SystemUsers?$select=fullname",
            "/crm-up/api/data/v9.2/systemusers?$select=fullname",
        ),
        (
            "/crm/systemusers(00000000-0000-0000-0000-000000000001)",
            "/crm-up/api/data/v9.2/systemusers(00000000-0000-0000-0000-000000000001)",
        ),
        (
            "/crm/systemusers/$count",
            "/crm-up/api/data/v9.2/systemusers/$count",
        ),
    ] {
        let (status, seen) = get_as("admin", &proxy, &upstream, target).await;
        assert_eq!(status, 200, "{target}");
        assert_eq!(seen, [forwarded], "{target}");
    }
    proxy.shutdown().await;
}

/// One character of `name`, spelt any way some upstream would still read as it, or as
/// something close to it.
fn spelling(c: char) -> BoxedStrategy<String> {
    let upper = c.to_ascii_uppercase();
    let mut spellings = vec![
        c.to_string(),
        c.to_string(),
        upper.to_string(),
        format!("%{:02x}", c as u8),
        format!("%{:02X}", upper as u8),
        format!("%u{:04x}", c as u8),
    ];
    match c {
        'i' => spellings.extend(["%C4%B1", "%c4%b0", "\u{131}", "\u{130}"].map(String::from)),
        's' => spellings.extend(["%C5%BF", "\u{17f}"].map(String::from)),
        _ => {}
    }
    prop::sample::select(spellings).boxed()
}

/// `/bc/…admin…` or `/crm/…systemusers…`, in some spelling, with what may surround it.
fn nested_target() -> impl Strategy<Value = String> {
    let name = |name: &str| {
        name.chars()
            .map(spelling)
            .collect::<Vec<_>>()
            .prop_map(|chars| chars.concat())
    };
    let route = prop_oneof![
        (Just("/bc/"), name("admin")),
        (Just("/crm/"), name("systemusers")),
    ];
    let before = prop::sample::select(vec![
        "", "", "/", "./", "%2e/", "x/../", "..;/", ".;/", "x;/../", "\\", "x\\..\\", "%2F",
    ]);
    let after = prop::sample::select(vec![
        "",
        "/",
        "/x",
        "(1)",
        "(1)/x",
        "%28'x'%29",
        "%3Fx",
        "%23x",
        ".",
        "%2e",
        "%2E/x",
        "%20",
        "%20/x",
        ".%20",
        ";",
        ";x/x",
        "%3b/x",
        "/..;/x",
        "//x",
        "\\x",
        "%2Fx",
        "%5Cx",
        "s",
        "x/y",
        "%C2%A0",
        "\u{2028}",
        "\u{85}",
        "/%2e%2e/x",
        "?$top=1",
        "/?x=\u{e9}",
        "%00",
    ]);
    (route, before, after)
        .prop_map(|((prefix, name), before, after)| format!("{prefix}{before}{name}{after}"))
}

#[test]
fn a_parent_route_client_never_reaches_a_nested_route_in_any_generated_spelling() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_idp, upstream, proxy) = runtime.block_on(setup());
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 384,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&nested_target(), |target| {
        let (status, seen) = runtime.block_on(get_as("erp", &proxy, &upstream, &target));
        prop_assert!(matches!(status, 200 | 400 | 403), "{target}: {status}");
        prop_assert_eq!(seen.len(), usize::from(status == 200), "{}", target);
        for forwarded in &seen {
            prop_assert!(
                !lands_in(forwarded, ADMIN_UP) && !lands_in(forwarded, USERS_UP),
                "{} reached {} ({})",
                target,
                forwarded,
                lenient_view(forwarded)
            );
        }
        Ok(())
    });
    runtime.block_on(proxy.shutdown());
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
