//! Layering of the configuration: `src/config` is data and imports nothing above it (no
//! token, proxy, server, inbound or upstream code); the leaf modules it shares with the
//! pipeline import nothing of the crate. Checked over the `crate::` paths in the sources.
//! And a reload, which runs off the serving threads, changes nothing once shutdown began.

mod support;

#[path = "support/cli.rs"]
#[allow(dead_code)]
mod cli;

use std::path::{Path, PathBuf};

use cli::TempDir;
use support::{CLIENT_SECRET, FakeIdp, FakeUpstream, PASSWORD, admin_yaml, spawn_ops_proxy};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every module a file names with `crate::…`, comments left out.
fn crate_modules(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).expect("read source");
    let mut modules = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '{')
                .collect();
            modules.push(name);
        }
    }
    modules
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn config_imports_nothing_above_it() {
    let mut files = Vec::new();
    sources(&root().join("config"), &mut files);
    assert!(files.len() > 5, "{files:?}");
    let allowed = [
        "config",
        "secret",
        "header_names",
        "civil_date",
        "test_support",
    ];
    for file in files {
        for module in crate_modules(&file) {
            assert!(
                allowed.contains(&module.as_str()),
                "{} uses crate::{module}; configuration validation must stay pure (file \
                 contents belong to src/preflight.rs)",
                file.display()
            );
        }
    }
}

#[test]
fn the_shared_leaf_modules_import_nothing_of_the_crate() {
    for leaf in ["header_names.rs", "civil_date.rs"] {
        let modules = crate_modules(&root().join(leaf));
        assert!(modules.is_empty(), "{leaf} uses crate::{modules:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_ends_after_shutdown_began_changes_nothing() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let dir = TempDir::new("archconfig-reload");
    dir.write("bc_secret", CLIENT_SECRET);
    dir.write("erp_password", PASSWORD);
    dir.write("scanner_key", support::API_KEY);
    let yaml = admin_yaml(&idp, &upstream)
        .replace("${BC_SECRET}", "${file:bc_secret}")
        .replace("${ERP_PASSWORD}", "${file:erp_password}")
        .replace("${SCANNER_KEY}", "${file:scanner_key}");
    let path = dir.write("proxy.yaml", &yaml);
    let loaded = s2s_proxy::Config::load(&path).expect("valid file");
    let proxy = spawn_ops_proxy(loaded, Some(&path)).await;
    idp.wait_for_calls(1).await;
    // While serving, the file reloads.
    assert!(proxy.reload.reload().is_ok());

    let reload = proxy.reload.clone();
    proxy.handle.shutdown().await;
    assert!(matches!(
        reload.reload(),
        Err(s2s_proxy::ReloadError::Draining)
    ));
}
