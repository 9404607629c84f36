//! What the process-level tests share: the `vane` binary as a child process, started and
//! stopped (politely or with SIGKILL) the way people and supervisors do.

#![allow(dead_code)] // each test binary uses its own part of this

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const PATIENCE: Duration = Duration::from_secs(30);

/// `vane --data DATA`, logging warnings only, ignoring any admin token in the environment.
pub fn vane(data: &Path) -> Command {
    vane_via(&[], data)
}

/// The same, run by `wrapper` (`ip netns exec NS`, which then execs `vane`).
pub fn vane_via(wrapper: &[&str], data: &Path) -> Command {
    let bin = env!("CARGO_BIN_EXE_vane");
    let mut cmd = match wrapper.split_first() {
        None => Command::new(bin),
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin);
            cmd
        }
    };
    cmd.arg("--data")
        .arg(data)
        .env_remove("VANE_ADMIN_TOKEN")
        .env("VANE_LOG", "warn");
    cmd
}

/// A child process whose stdout lines arrive on a channel.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        // The server's log, when a test is being looked into: VANE_TEST_SERVER_LOG=1.
        let log = match std::env::var_os("VANE_TEST_SERVER_LOG") {
            Some(_) => Stdio::inherit(),
            None => Stdio::null(),
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    pub fn line(&self) -> String {
        self.lines
            .recv_timeout(PATIENCE)
            .expect("a line of output in time")
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    fn wait_exit(&mut self, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit after {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the exit status once it has exited.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.wait_exit("SIGTERM")
    }

    /// SIGKILL: no shutdown, no GoAway, nothing flushed that was not already.
    pub fn kill9(&mut self) {
        self.signal("-KILL");
        self.wait_exit("SIGKILL");
    }

    /// The process's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the process is alive");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A started server and where it listens.
pub struct Served {
    pub process: Running,
    /// `HOST:PORT` of the protocol listener.
    pub protocol: String,
    /// `http://HOST:PORT`.
    pub http: String,
}

/// `vane serve` on ephemeral loopback ports.
pub fn serve(data: &Path) -> Served {
    serve_loopback(data, &[])
}

/// The same, with more arguments.
pub fn serve_loopback(data: &Path, extra: &[&str]) -> Served {
    let mut args = vec!["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    serve_with(vane(data), &args)
}

/// The admin API of the server on `data`, with the token it made.
pub fn admin(data: &Path, served: &Served) -> vane_server::api::client::AdminClient {
    let token = std::fs::read_to_string(data.join("admin-token")).expect("admin token");
    vane_server::api::client::AdminClient::new(served.http.clone(), token.trim())
}

/// Creates `env` with a server key; returns the key's secret.
pub async fn env_with_key(admin: &vane_server::api::client::AdminClient, env: &str) -> String {
    admin.create_env(env).await.expect("environment created");
    admin
        .create_key(env, vane_server::keys::KeyKind::Server)
        .await
        .expect("key created")
        .secret
}

/// Runs `cmd` (a `vane --data …` command, or one that execs it) with `serve` and `args`, and
/// waits until it is ready.
pub fn serve_with(mut cmd: Command, args: &[&str]) -> Served {
    cmd.arg("serve").args(args);
    let process = Running::spawn(cmd);
    let banner = process.line();
    // "vane X serving: protocol 127.0.0.1:P (QUIC and TCP+TLS), HTTP http://127.0.0.1:Q"
    let protocol = banner
        .split("protocol ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .expect("protocol address in banner")
        .to_owned();
    let http = banner
        .split("HTTP ")
        .nth(1)
        .expect("HTTP URL in banner")
        .to_owned();
    wait_ready(&http);
    Served {
        process,
        protocol,
        http,
    }
}

pub fn wait_ready(http: &str) {
    let deadline = Instant::now() + PATIENCE;
    let addr = http.trim_start_matches("http://");
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("server at {http} never became ready");
}
