//! A real `redis-server` on a free loopback port for fleet mode tests: no persistence,
//! killed on drop, restartable on the same port (outage tests). Standard library only,
//! so the crate's unit tests include this file too.
//!
//! Needs `redis-server` on PATH (`.ci/run` installs it): without it the starters return
//! `None` and the test prints that it skipped; under CI (`CI` set) a missing one fails.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary: `REDIS_SERVER` when set, else `redis-server` from `PATH`.
fn binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

/// Whether `redis-server` runs; under CI a missing one fails.
fn installed() -> bool {
    let runs = Command::new(binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !runs {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is required in CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: install redis-server to run the fleet mode tests");
    }
    runs
}

/// A running `redis-server` on 127.0.0.1.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// Extra arguments (TLS); with TLS the plain port is off and `port` is the TLS port.
    extra: Vec<String>,
    tls: bool,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a plain server on a free port and waits until it answers PING; `None` when
    /// `redis-server` is not installed (outside CI).
    pub fn start() -> Option<Self> {
        Self::launch(Vec::new(), false)
    }

    /// Starts a plain server that requires `password` (`requirepass`).
    pub fn start_with_password(password: &str) -> Option<Self> {
        Self::launch(vec!["--requirepass".to_owned(), password.to_owned()], false)
    }

    /// Starts a TLS-only server (`rediss://`) with the given PEM files; waits until it
    /// accepts connections.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Option<Self> {
        let extra = vec![
            "--tls-cert-file".to_owned(),
            cert.display().to_string(),
            "--tls-key-file".to_owned(),
            key.display().to_string(),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        Self::launch(extra, true)
    }

    fn launch(extra: Vec<String>, tls: bool) -> Option<Self> {
        if !installed() {
            return None;
        }
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("s2s-proxy-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create redis dir");
        let mut server = Self {
            port,
            extra,
            tls,
            dir,
            child: None,
        };
        server.restart();
        Some(server)
    }

    /// `redis://127.0.0.1:PORT` (or `rediss://localhost:PORT` with TLS: the name the
    /// test certificate is issued for).
    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts (again) on the same port, empty, and waits until it is ready.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port.to_string();
        let mut command = Command::new(binary());
        command.current_dir(&self.dir).args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]);
        if self.tls {
            command.args(["--port", "0", "--tls-port", &port]);
        } else {
            command.args(["--port", &port]);
        }
        let child = command
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = if self.tls {
                TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok()
            } else {
                // Without the password a server that requires one answers NOAUTH.
                self.command(&["PING"])
                    .is_some_and(|answer| answer == "+PONG" || answer.starts_with("-NOAUTH"))
            };
            if ready {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("redis-server exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One command over a fresh plain connection; the first line of the answer (RESP),
    /// or `None` when nothing answers.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte).ok()? == 1 {
            if byte[0] == b'\n' {
                break;
            }
            answer.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&answer).trim_end().to_owned();
        (!line.is_empty()).then_some(line)
    }

    /// An integer reply (`ZCARD`, `EXISTS`, …).
    pub fn integer(&self, args: &[&str]) -> Option<i64> {
        self.command(args)?.strip_prefix(':')?.parse().ok()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}
