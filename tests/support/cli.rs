//! Driving the `s2s-proxy` binary from tests: a temporary directory that removes itself,
//! one-shot runs with a time limit, and long-running children (`run`, `dev`) behind a
//! guard that kills them when the test ends, however it ends.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_s2s-proxy");

/// Longest a one-shot command (`check`, `token`, `hash-secret`) may take.
const ONE_SHOT_LIMIT: Duration = Duration::from_secs(60);

/// A fresh directory under the system temp dir, removed with everything in it on drop.
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub(crate) fn new(label: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "s2s-proxy-cli-{}-{label}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // A leftover from a crashed run with the same pid would hold stale files.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub(crate) fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The binary with `args`, isolated from the caller's environment where it matters: no
/// `$S2S_PROXY_CONFIG` unless a test sets it, `info` logs whatever `RUST_LOG` says.
pub(crate) fn command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("S2S_PROXY_CONFIG")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// How a one-shot run ended.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// `None` when ended by a signal.
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Outcome {
    /// stdout and stderr together, for "never printed anywhere" assertions.
    pub(crate) fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `command` to completion (at most a minute), feeding `stdin` if given.
pub(crate) async fn run_to_end(mut command: Command, stdin: Option<&[u8]>) -> Outcome {
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    // kill_on_drop: if the time limit drops the future, the child dies with it.
    let mut child = command.spawn().expect("spawn s2s-proxy");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin piped");
        pipe.write_all(bytes).await.expect("write stdin");
        drop(pipe); // EOF
    }
    let output = tokio::time::timeout(ONE_SHOT_LIMIT, child.wait_with_output())
        .await
        .expect("s2s-proxy did not finish within a minute")
        .expect("wait for s2s-proxy");
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A long-running child (`run`, `dev`). Its output is collected as it arrives; dropping
/// the guard kills the process.
pub(crate) struct Running {
    child: Child,
    pid: u32,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    pub(crate) fn spawn(mut command: Command) -> Self {
        let mut child = command.spawn().expect("spawn s2s-proxy");
        let pid = child.id().expect("child has a pid");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            tokio::spawn(collect(
                child.stdout.take().expect("stdout"),
                stdout.clone(),
            )),
            tokio::spawn(collect(
                child.stderr.take().expect("stderr"),
                stderr.clone(),
            )),
        ];
        Self {
            child,
            pid,
            stdout,
            stderr,
            readers,
        }
    }

    pub(crate) fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends a signal by name (`TERM`, `INT`) with kill(1).
    pub(crate) fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// Polls (bounded) until `addr` accepts TCP connections; fails early, with the
    /// child's output, if the child exits first.
    pub(crate) async fn wait_until_accepting(&mut self, addr: SocketAddr) {
        for _ in 0..400 {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drain_readers().await;
                panic!(
                    "s2s-proxy exited with {status} before accepting on {addr}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            if TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "s2s-proxy did not accept on {addr} within 10 s\nstderr:\n{}",
            self.stderr()
        );
    }

    /// Waits (at most `limit`) for the process to exit; its output is complete afterwards.
    pub(crate) async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for s2s-proxy"),
            Err(_) => panic!(
                "s2s-proxy did not exit within {limit:?}\nstderr:\n{}",
                self.stderr()
            ),
        };
        self.drain_readers().await;
        status
    }

    async fn drain_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Harmless if it already exited; tokio reaps the zombie.
        let _ = self.child.start_kill();
        for reader in &self.readers {
            reader.abort();
        }
    }
}

async fn collect(pipe: impl AsyncRead + Unpin, into: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut text = into.lock().unwrap();
        text.push_str(&line);
        text.push('\n');
    }
}

/// A loopback port that was free a moment ago: bound to port 0, read, released.
pub(crate) fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind port 0");
    listener.local_addr().expect("local addr")
}

/// An unsigned JWS compact token (`alg: none`) carrying `claims`: the CLI decodes claims
/// without verifying, so the signature part only has to be present.
pub(crate) fn unsigned_jwt(claims: &serde_json::Value) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode("not-a-signature")
    )
}

/// The cells of a `check` table row: columns are separated by at least two spaces.
pub(crate) fn cells(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|cell| !cell.is_empty())
        .collect()
}

/// The value of a `name   value` line printed by `token`.
pub(crate) fn field<'a>(output: &'a str, name: &str) -> Option<&'a str> {
    output.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.starts_with(' ').then(|| rest.trim())
    })
}
