//! End-to-end tests of `s2s-proxy init` (README "Quick start", docs/operations.md "Command
//! line"): the binary writes `proxy.yaml` and `s2s-proxy.env` into a temp dir,
//! non-interactively, with answers piped in, and through a pseudo-terminal; `check` accepts
//! what it wrote and `run` serves it with the env file's variables (token authority and
//! upstream pointed at the in-process fakes: the only two lines a test changes).

mod support;

#[path = "support/cli.rs"]
#[allow(dead_code)]
mod cli;

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cli::{BIN, Running, TempDir, command, free_port, run_to_end};
use support::{FakeIdp, FakeUpstream, basic, send};

const TENANT: &str = "5f0c8e1a-3b2d-4c6e-9a7f-0d1e2f3a4b5c";
const CLIENT: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
/// An Entra-shaped secret value (`~`, `.`, `_`, `-`), planted to be looked for.
const SECRET: &str = "Xq8Q~InitCaNaRy.sEcReT_value-12345678ab";

fn init_args<'a>(dir: &'a Path, product: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "init",
        "--non-interactive",
        "--product",
        product,
        "--tenant-id",
        TENANT,
        "--client-id",
        CLIENT,
        "--client-name",
        "erp-sync",
        "--dir",
        dir.to_str().unwrap(),
    ];
    // A flag given in `extra` replaces the default's value (clap refuses repeats).
    let mut rest = extra.iter().peekable();
    while let Some(&flag) = rest.next() {
        let value = rest.next_if(|v| !v.starts_with("--")).copied();
        match (args.iter().position(|a| *a == flag), value) {
            (Some(at), Some(value)) => args[at + 1] = value,
            (_, value) => args.extend([flag].into_iter().chain(value)),
        }
    }
    args
}

/// Runs `init --non-interactive` with `secret` on stdin.
async fn init(dir: &Path, product: &str, extra: &[&str], secret: &str) -> cli::Outcome {
    with_stdin(
        command(init_args(dir, product, extra)),
        format!("{secret}\n").as_bytes(),
    )
    .await
}

/// Like `run_to_end` with input, for runs that may exit before reading it (a usage error,
/// an existing file): a closed pipe is then expected, not a failure.
async fn with_stdin(mut command: tokio::process::Command, input: &[u8]) -> cli::Outcome {
    use tokio::io::AsyncWriteExt as _;
    command.stdin(Stdio::piped());
    let mut child = command.spawn().expect("spawn s2s-proxy");
    let mut pipe = child.stdin.take().expect("stdin piped");
    match pipe.write_all(input).await {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(error) => panic!("writing stdin: {error}"),
    }
    drop(pipe);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("s2s-proxy did not finish within a minute")
        .expect("wait for s2s-proxy");
    cli::Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The env file's `NAME=value` lines (init writes these values bare).
fn env_vars(dir: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(dir.join("s2s-proxy.env"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l.split_once('=').expect("NAME=value");
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn non_interactive_business_central_config_is_checked_and_served() {
    let dir = TempDir::new("init-bc");
    let out = init(dir.path(), "business-central", &[], SECRET).await;
    assert_eq!(out.code, Some(0), "{out:?}");

    let vars = env_vars(dir.path());
    assert_eq!(vars["BC_CLIENT_SECRET"], SECRET);
    let password = vars["ERP_SYNC_PASSWORD"].clone();
    assert!(password.len() >= 40, "weak password {password:?}");
    #[cfg(unix)]
    assert_eq!(mode(&dir.path().join("s2s-proxy.env")), 0o600);

    // The password is shown once; the client secret never; proxy.yaml holds neither.
    assert_eq!(out.stdout.matches(&password).count(), 1, "{}", out.stdout);
    assert!(!out.all().contains(SECRET), "{}", out.all());
    let yaml = read(dir.path(), "proxy.yaml");
    assert!(
        !yaml.contains(SECRET) && !yaml.contains(&password),
        "{yaml}"
    );
    assert!(yaml.contains("${BC_CLIENT_SECRET}") && yaml.contains("${ERP_SYNC_PASSWORD}"));
    for next in [
        "set -a; .",
        "s2s-proxy check --config",
        "s2s-proxy doctor --config",
        "s2s-proxy run --config",
    ] {
        assert!(out.stdout.contains(next), "{next} missing:\n{}", out.stdout);
    }

    // `check` accepts it with the env file's variables, and says which are missing without.
    let config = dir.path().join("proxy.yaml");
    let mut check = command(["check", "--config"]);
    check.arg(&config).envs(&vars);
    let checked = run_to_end(check, None).await;
    assert_eq!(checked.code, Some(0), "{checked:?}");
    assert!(checked.stdout.contains(&format!(
        "https://api.businesscentral.dynamics.com/v2.0/{TENANT}/Production/"
    )));
    assert!(
        checked
            .stdout
            .contains("https://api.businesscentral.dynamics.com/.default")
    );
    let mut bare = command(["check", "--config"]);
    bare.arg(&config);
    let refused = run_to_end(bare, None).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("BC_CLIENT_SECRET"),
        "{}",
        refused.stderr
    );

    // `run` serves it: authority and upstream pointed at the fakes, all else as written.
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let (addr, admin) = (free_port(), free_port());
    let served = point_at_fakes(&yaml, &idp, &upstream)
        .replace("listen: 127.0.0.1:8080", &format!("listen: {addr}"))
        .replace("listen: 127.0.0.1:9090", &format!("listen: {admin}"));
    std::fs::write(&config, served).unwrap();
    let mut cmd = command(["run", "--config"]);
    cmd.arg(&config).envs(&vars);
    let mut proxy = Running::spawn(cmd);
    proxy.wait_until_accepting(addr).await;

    let ok = send(
        addr,
        "GET",
        "/bc/api/v2.0/companies",
        &[("authorization", &basic("erp-sync", &password))],
        "",
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let seen = upstream.requests();
    assert_eq!(
        seen[0].target,
        format!("/v2.0/{TENANT}/Production/api/v2.0/companies")
    );
    assert!(
        seen[0]
            .header("authorization")
            .unwrap()
            .starts_with("Bearer tok-")
    );
    let form: HashMap<_, _> = idp.requests()[0].form.iter().cloned().collect();
    assert_eq!(form["client_id"], CLIENT);
    assert_eq!(form["client_secret"], SECRET);
    assert_eq!(
        form["scope"],
        "https://api.businesscentral.dynamics.com/.default"
    );
    assert_eq!(
        idp.requests()[0].path,
        format!("/{TENANT}/oauth2/v2.0/token")
    );

    let wrong = send(
        addr,
        "GET",
        "/bc/api/v2.0/companies",
        &[("authorization", &basic("erp-sync", "guess"))],
        "",
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(upstream.count(), 1);
    drop(proxy);
}

/// The written YAML with the credential's authority set to `idp` and the route's preset
/// replaced by a URL on `upstream` with Business Central's path.
fn point_at_fakes(yaml: &str, idp: &FakeIdp, upstream: &FakeUpstream) -> String {
    let preset = yaml
        .lines()
        .find(|l| l.trim_start().starts_with("upstream: { businesscentral:"))
        .expect("a businesscentral preset");
    let patched = yaml
        .replace(
            "    type: client_secret\n",
            &format!(
                "    type: client_secret\n    authority: {}\n",
                idp.authority()
            ),
        )
        .replace(
            preset,
            &format!(
                "    upstream: {}/v2.0/{TENANT}/Production/",
                upstream.base()
            ),
        );
    assert_ne!(patched, yaml);
    patched
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_after_init_reads_the_env_file() {
    let dir = TempDir::new("init-doctor");
    assert_eq!(
        init(dir.path(), "business-central", &[], SECRET).await.code,
        Some(0)
    );
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        point_at_fakes(&read(dir.path(), "proxy.yaml"), &idp, &upstream),
    )
    .unwrap();

    // What `init` runs in-process when the operator accepts its offer.
    let loaded =
        s2s_proxy::init::load_with_env_file(&config, &dir.path().join("s2s-proxy.env")).unwrap();
    let (report, ok) = s2s_proxy::doctor::run(&loaded).await;
    assert!(ok, "{report}");
    assert!(
        report.contains("/bc/") && !report.contains(SECRET),
        "{report}"
    );
    let form: HashMap<_, _> = idp.requests()[0].form.iter().cloned().collect();
    assert_eq!(form["client_secret"], SECRET);
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn finance_operations_and_dataverse_configs_pass_check() {
    let cases = [
        (
            "finance-operations",
            "https://contoso.operations.dynamics.com/",
            "/fo/",
            "https://contoso.operations.dynamics.com/data/",
            "https://contoso.operations.dynamics.com/.default",
            "FO_CLIENT_SECRET",
        ),
        (
            "dataverse",
            "https://contoso.crm4.dynamics.com",
            "/dataverse/",
            "https://contoso.crm4.dynamics.com/api/data/v9.2/",
            "https://contoso.crm4.dynamics.com/.default",
            "DATAVERSE_CLIENT_SECRET",
        ),
    ];
    for (product, url, prefix, upstream, scope, secret_var) in cases {
        let dir = TempDir::new("init-product");
        let out = init(dir.path(), product, &["--url", url], SECRET).await;
        assert_eq!(out.code, Some(0), "{out:?}");
        let vars = env_vars(dir.path());
        assert_eq!(vars[secret_var], SECRET);
        assert!(!read(dir.path(), "proxy.yaml").contains(SECRET));
        let mut check = command(["check", "--config"]);
        check.arg(dir.path().join("proxy.yaml")).envs(&vars);
        let checked = run_to_end(check, None).await;
        assert_eq!(checked.code, Some(0), "{checked:?}");
        let row = checked
            .stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{}", checked.stdout));
        assert!(row.contains(upstream) && row.contains(scope), "{row}");
    }
}

#[tokio::test]
async fn never_overwrites_without_force() {
    let dir = TempDir::new("init-force");
    assert_eq!(
        init(dir.path(), "business-central", &[], SECRET).await.code,
        Some(0)
    );
    let (yaml, env) = (
        read(dir.path(), "proxy.yaml"),
        read(dir.path(), "s2s-proxy.env"),
    );

    let again = init(
        dir.path(),
        "business-central",
        &["--environment", "Sandbox"],
        "other~secret",
    )
    .await;
    assert_eq!(again.code, Some(1), "{again:?}");
    assert!(
        again.stderr.contains("already exist") && again.stderr.contains("--force"),
        "{}",
        again.stderr
    );
    assert_eq!(read(dir.path(), "proxy.yaml"), yaml);
    assert_eq!(read(dir.path(), "s2s-proxy.env"), env);

    // One existing file is enough to refuse; the other is not created.
    std::fs::remove_file(dir.path().join("proxy.yaml")).unwrap();
    let one = init(dir.path(), "business-central", &[], SECRET).await;
    assert_eq!(one.code, Some(1), "{one:?}");
    assert!(!dir.path().join("proxy.yaml").exists());

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let env_path = dir.path().join("s2s-proxy.env");
        std::fs::set_permissions(&env_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let forced = init(
        dir.path(),
        "business-central",
        &["--environment", "Sandbox", "--force"],
        "other~secret",
    )
    .await;
    assert_eq!(forced.code, Some(0), "{forced:?}");
    assert!(read(dir.path(), "proxy.yaml").contains("environment: \"Sandbox\""));
    assert_eq!(env_vars(dir.path())["BC_CLIENT_SECRET"], "other~secret");
    #[cfg(unix)]
    assert_eq!(mode(&dir.path().join("s2s-proxy.env")), 0o600);
}

#[tokio::test]
async fn a_guid_pasted_as_the_secret_is_warned_about() {
    let dir = TempDir::new("init-guid-secret");
    let secret_id = "7d5e1f2a-0b3c-4d6e-8f9a-1b2c3d4e5f60";
    let out = init(dir.path(), "business-central", &[], secret_id).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("warning:"), "{}", out.stderr);
    assert!(out.stderr.contains("AADSTS7000215"), "{}", out.stderr);
    assert!(out.stderr.contains("not its Value"), "{}", out.stderr);
    assert!(!out.all().contains(secret_id));

    let fine = TempDir::new("init-value-secret");
    let out = init(fine.path(), "business-central", &[], SECRET).await;
    assert!(!out.stderr.contains("AADSTS7000215"), "{}", out.stderr);
}

#[tokio::test]
async fn bad_values_are_usage_errors_and_write_nothing() {
    let cases: [(&str, &[&str], &str); 8] = [
        (
            "business-central",
            &["--tenant-id", "not-a-guid"],
            "--tenant-id",
        ),
        ("business-central", &["--client-id", "app-1"], "--client-id"),
        (
            "business-central",
            &["--environment", "Prod env"],
            "--environment",
        ),
        (
            "dataverse",
            &["--url", "http://contoso.crm4.dynamics.com"],
            "https://",
        ),
        (
            "dataverse",
            &["--url", "https://contoso.crm4.dynamics.com/api/data/v9.2/"],
            "has a path",
        ),
        ("dataverse", &[], "--url"),
        (
            "dataverse",
            &["--environment", "Production"],
            "--environment is for Business Central",
        ),
        (
            "business-central",
            &["--url", "https://contoso.crm4.dynamics.com"],
            "--url is for",
        ),
    ];
    for (product, extra, expected) in cases {
        let dir = TempDir::new("init-usage");
        let out = init(dir.path(), product, extra, SECRET).await;
        assert_eq!(out.code, Some(2), "{extra:?}: {out:?}");
        assert!(out.stderr.contains(expected), "{extra:?}: {}", out.stderr);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{extra:?} wrote files"
        );
    }

    // A missing flag is a usage error too; an empty secret is an input error (1).
    let dir = TempDir::new("init-missing");
    let mut cmd = command([
        "init",
        "--non-interactive",
        "--product",
        "dataverse",
        "--dir",
    ]);
    cmd.arg(dir.path());
    let missing = with_stdin(cmd, b"x\n").await;
    assert_eq!(missing.code, Some(2), "{missing:?}");
    assert!(missing.stderr.contains("--tenant-id"), "{}", missing.stderr);
    let empty = init(dir.path(), "business-central", &[], "").await;
    assert_eq!(empty.code, Some(1), "{empty:?}");
    assert!(empty.stderr.contains("client secret"), "{}", empty.stderr);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn interactive_answers_can_be_piped_in() {
    let dir = TempDir::new("init-piped");
    let script = format!(
        "3\n{TENANT}\n{CLIENT}\n{SECRET}\nhttps://contoso.crm4.dynamics.com/api/data/v9.2\n\
         https://contoso.crm4.dynamics.com\n\nn\n"
    );
    let mut cmd = command(["init", "--dir"]);
    cmd.arg(dir.path());
    let out = run_to_end(cmd, Some(script.as_bytes())).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("has a path") && out.stdout.contains("Try again"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("Run `s2s-proxy doctor` on it now? [Y/n]"),
        "{}",
        out.stdout
    );
    assert!(!out.all().contains(SECRET));
    let vars = env_vars(dir.path());
    assert_eq!(vars["DATAVERSE_CLIENT_SECRET"], SECRET);
    assert!(
        read(dir.path(), "proxy.yaml")
            .contains("dataverse: { url: \"https://contoso.crm4.dynamics.com\" }")
    );
}

// ---------------------------------------------------------------------------------------
// Through a pseudo-terminal
// ---------------------------------------------------------------------------------------

/// The terminal side of a child running on a pseudo-terminal: everything it printed (and
/// the terminal echoed), collected by a reader thread.
struct Terminal {
    writer: std::fs::File,
    seen: Arc<Mutex<Vec<u8>>>,
    child: std::process::Child,
}

impl Terminal {
    fn spawn(args: &[&str]) -> Self {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let open_slave = || {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
                .open(name.to_str().unwrap())
                .expect("open the pty slave")
        };
        let mut command = std::process::Command::new(BIN);
        command
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("S2S_PROXY_CONFIG")
            .stdin(Stdio::from(open_slave()))
            .stdout(Stdio::from(open_slave()))
            .stderr(Stdio::from(open_slave()));
        let child = command.spawn().expect("spawn s2s-proxy on a pty");
        drop(command); // closes our copies of the slave: EOF/EIO once the child exits
        let master = std::fs::File::from(master);
        let writer = master.try_clone().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut reader = master;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            writer,
            seen,
            child,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// Waits (at most 30 s) until the `n`th occurrence of `text` has been printed.
    fn wait_for(&self, text: &str, n: usize) {
        let start = Instant::now();
        while self.text().matches(text).count() < n {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "waited for {text:?} (#{n}); the terminal shows:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the `n`th `prompt`, then types `answer` and Enter.
    fn answer(&mut self, prompt: &str, n: usize, answer: &str) {
        self.wait_for(prompt, n);
        self.writer
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(unix)]
#[test]
fn interactive_on_a_terminal_hides_the_secret_and_asks_again_after_a_typo() {
    let dir = TempDir::new("init-pty");
    let mut term = Terminal::spawn(&["init", "--dir", dir.path().to_str().unwrap()]);
    term.answer("Product [1]: ", 1, "");
    term.answer("Directory (tenant) ID: ", 1, "5f0c8e1a-3b2d-4c6e-9a7f");
    term.wait_for("is not a tenant ID", 1);
    term.answer("Directory (tenant) ID: ", 2, TENANT);
    term.answer(
        "Application (client) ID of the app registration: ",
        1,
        CLIENT,
    );
    term.answer("(typing is hidden): ", 1, SECRET);
    term.answer("Business Central environment [Production]: ", 1, "Sandbox");
    term.answer(
        "Name of the calling client (its Basic user name) [erp-sync]: ",
        1,
        "",
    );
    term.answer("Run `s2s-proxy doctor` on it now? [Y/n]: ", 1, "n");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = term.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{}", term.text());
        std::thread::sleep(Duration::from_millis(20));
    };
    let shown = term.text();
    assert!(status.success(), "{status}\n{shown}");

    // Ordinary answers echo; the secret does not, and echo is back on after it.
    assert!(shown.contains(CLIENT), "{shown}");
    assert!(!shown.contains(SECRET), "the secret was echoed:\n{shown}");
    let after_secret = &shown[shown.find("(typing is hidden): ").unwrap()..];
    assert!(after_secret.contains("[Production]: Sandbox"), "{shown}");

    let vars = env_vars(dir.path());
    assert_eq!(vars["BC_CLIENT_SECRET"], SECRET);
    assert!(shown.contains(&vars["ERP_SYNC_PASSWORD"]), "{shown}");
    let yaml = read(dir.path(), "proxy.yaml");
    assert!(
        yaml.contains("environment: \"Sandbox\"") && yaml.contains(TENANT),
        "{yaml}"
    );
}
