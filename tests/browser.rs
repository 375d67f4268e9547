//! The status page (docs/operations.md "Status page") rendered by a real browser: headless
//! Chromium loads `GET /` from a proxy with a healthy route and a route whose credential
//! the identity provider refuses (AADSTS7000215), runs the page's script under the page's
//! own `Content-Security-Policy`, and the test reads the resulting DOM. The Test button is
//! pressed through the page's deep link `/?test=<prefix>`, which calls the same function.
//!
//! Needs `chromium` on PATH (`.ci/run` installs it): without it the tests print
//! `SKIPPED`, and fail when `CI` is set.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::{
    FakeIdp, FakeUpstream, IdpMode, OpsProxy, admin_yaml, config, eventually, get,
    spawn_admin_proxy, spawn_ops_proxy, standard_vars,
};

/// Whether `chromium` runs; under CI a missing one fails.
fn chromium_installed() -> bool {
    let runs = std::process::Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "chromium is required in CI (.ci/run installs it)"
    );
    eprintln!("SKIPPED: install chromium to run the status page browser tests");
    false
}

/// A fresh, empty Chromium profile directory; removed when dropped.
struct Profile(PathBuf);

impl Profile {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "s2s-proxy-browser-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs headless Chromium on `url` with `extra` arguments (`--dump-dom` or
/// `--screenshot=…`); returns its stdout. Chromium is killed through its own child handle
/// if it outlives the timeout.
async fn chromium(url: &str, extra: &[&str]) -> String {
    let profile = Profile::new();
    let mut command = tokio::process::Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("chromium starts");
    // On timeout the dropped future drops the child, which kills it (kill_on_drop).
    let output = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium's output");
    assert!(
        output.status.success(),
        "chromium failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 DOM")
}

/// The DOM Chromium renders for `path` on the admin listener.
async fn dom(proxy: &OpsProxy, path: &str) -> String {
    chromium(&format!("http://{}{path}", proxy.admin), &["--dump-dom"]).await
}

/// The text of the `<pre id="test-N">` element (the test output of route N).
fn test_output(dom: &str, index: usize) -> &str {
    let open = format!("<pre id=\"test-{index}\">");
    let start = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no {open} in {dom}"))
        + open.len();
    let end = start + dom[start..].find("</pre>").unwrap();
    &dom[start..end]
}

/// The standard admin configuration with `/bc/sandbox/` moved to a second credential
/// `bad` at `bad_idp`.
fn mixed_yaml(idp: &FakeIdp, bad_idp: &FakeIdp, upstream: &FakeUpstream) -> String {
    let bad = support::bc_credential_yaml(support::TENANT, &bad_idp.authority()).replacen(
        "credentials:\n  bc:",
        "  bad:",
        1,
    );
    let yaml = admin_yaml(idp, upstream)
        .replacen("clients:\n  erp:", &format!("{bad}clients:\n  erp:"), 1)
        .replacen(
            "credential: bc\n    clients: [erp]\n",
            "credential: bad\n    clients: [erp]\n",
            1,
        );
    assert!(yaml.contains("credential: bad"), "{yaml}");
    yaml
}

/// Waits until the routes' token states are `states`.
async fn wait_for_states(proxy: &OpsProxy, states: &[&str]) {
    eventually(Duration::from_secs(10), "token states", || async {
        let status: Value = get(proxy.admin, "/status.json").await.json();
        let now: Vec<&str> = status["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["token"]["state"].as_str().unwrap_or(""))
            .collect();
        (now == states).then_some(())
    })
    .await;
}

/// A proxy with `/bc/` healthy and `/bc/sandbox/` refused by its identity provider.
async fn mixed_proxy() -> (OpsProxy, FakeIdp, FakeIdp, FakeUpstream) {
    let idp = FakeIdp::start_with(IdpMode::IssueToken("tok-browser".to_owned())).await;
    let bad_idp = FakeIdp::start_with(IdpMode::invalid_client()).await;
    let upstream = FakeUpstream::start().await;
    let yaml = mixed_yaml(&idp, &bad_idp, &upstream);
    let proxy = spawn_ops_proxy(config(&yaml, standard_vars()), None).await;
    wait_for_states(&proxy, &["valid", "failed"]).await;
    (proxy, idp, bad_idp, upstream)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rendered_page_shows_each_route_and_the_failing_routes_aadsts_hint() {
    if !chromium_installed() {
        return;
    }
    let (proxy, _idp, _bad, _upstream) = mixed_proxy().await;
    let page = dom(&proxy, "/").await;
    assert!(page.contains("<b>/bc/</b>"), "{page}");
    assert!(page.contains("<b>/bc/sandbox/</b>"), "{page}");
    assert!(
        page.contains("<span class=\"valid\">valid</span>"),
        "{page}"
    );
    assert!(
        page.contains("<span class=\"failed\">failed</span>"),
        "{page}"
    );
    assert!(page.contains("AADSTS7000215"), "{page}");
    assert!(page.contains("secret value"), "no hint in {page}");
    // No test ran: the script ran under the CSP without writing any output.
    assert_eq!(test_output(&page, 0), "");
    assert_eq!(test_output(&page, 1), "");
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_test_deep_link_runs_the_routes_test_and_renders_its_steps() {
    if !chromium_installed() {
        return;
    }
    let (proxy, _idp, _bad, _upstream) = mixed_proxy().await;

    let healthy = dom(&proxy, "/?test=/bc/").await;
    let out = test_output(&healthy, 0);
    assert!(out.starts_with("PASS\n"), "{healthy}");
    assert!(out.contains("ok   "), "{out}");
    assert_eq!(test_output(&healthy, 1), "", "only the linked route runs");

    let failing = dom(&proxy, "/?test=%2Fbc%2Fsandbox%2F").await;
    let out = test_output(&failing, 1);
    assert!(out.starts_with("FAIL\n"), "{failing}");
    assert!(out.contains("FAIL "), "{out}");
    assert!(out.contains("AADSTS7000215"), "{out}");
    assert!(out.contains("hint: "), "{out}");
    assert_eq!(test_output(&failing, 0), "", "only the linked route runs");

    // Not a configured prefix, or markup: nothing runs and nothing is written.
    for link in [
        "/?test=/nope/",
        "/?test=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E",
        "/?test=",
    ] {
        let page = dom(&proxy, link).await;
        assert_eq!(test_output(&page, 0), "", "{link}");
        assert_eq!(test_output(&page, 1), "", "{link}");
        assert!(!page.contains("<img src=x"), "{page}");
    }
    proxy.handle.shutdown().await;
}

/// Screenshots of a healthy and a failing route, checked to be real PNG images. They go to
/// a temporary directory; with `S2S_PROXY_WRITE_SCREENSHOTS=1` they replace
/// `docs/status-healthy.png` and `docs/status-failing.png`:
/// `S2S_PROXY_WRITE_SCREENSHOTS=1 cargo test --test browser screenshots`.
#[tokio::test(flavor = "multi_thread")]
async fn screenshots() {
    if !chromium_installed() {
        return;
    }
    let scratch = Profile::new();
    let docs = if std::env::var_os("S2S_PROXY_WRITE_SCREENSHOTS").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
    } else {
        scratch.0.clone()
    };
    let shoot = |proxy: &OpsProxy, path: &str, file: &str| {
        let url = format!("http://{}{path}", proxy.admin);
        let target = docs.join(file);
        async move {
            let arg = format!("--screenshot={}", target.display());
            chromium(&url, &[&arg, "--window-size=1200,900", "--hide-scrollbars"]).await;
            let png = std::fs::read(&target)
                .unwrap_or_else(|e| panic!("{} not written: {e}", target.display()));
            assert!(
                png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
                "{} is not a rendered PNG ({} bytes)",
                target.display(),
                png.len()
            );
        }
    };

    let idp = FakeIdp::start_with(IdpMode::IssueToken("tok-browser".to_owned())).await;
    let upstream = FakeUpstream::start().await;
    let healthy = spawn_admin_proxy(&idp, &upstream).await;
    wait_for_states(&healthy, &["valid", "valid"]).await;
    shoot(&healthy, "/?test=/bc/", "status-healthy.png").await;
    healthy.handle.shutdown().await;

    let (failing, _idp, _bad, _upstream) = mixed_proxy().await;
    shoot(&failing, "/?test=/bc/sandbox/", "status-failing.png").await;
    failing.handle.shutdown().await;
}
