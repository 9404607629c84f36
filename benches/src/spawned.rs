//! A `vane serve` (or `vane relay`) a bench tool starts for itself: a fresh data directory,
//! loopback ports, logs at `warn`, killed when dropped. `ofrep-load`, `clone-load`, `write-load`,
//! `cluster-load` and `relay-load` measure against one (or several).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vane_server::api::client::AdminClient;

/// The server process and its data directory.
#[derive(Debug)]
pub struct SpawnedVane {
    child: Child,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub http: String,
    /// `127.0.0.1:PORT` of the protocol listener (TCP+TLS; QUIC is off).
    pub listen: String,
    /// The admin API, with the token the server made (a relay has none: only `/readyz` and
    /// `/metrics` answer).
    pub admin: AdminClient,
}

impl SpawnedVane {
    /// Starts `vane serve --no-quic` from the binary `vane` with HTTP on `port` and the protocol
    /// on `port + 1`, plus `extra` arguments, and waits (up to 30 s) until it is ready.
    pub async fn start(vane: &Path, port: u16, extra: &[String]) -> SpawnedVane {
        SpawnedVane::start_in(tempfile::tempdir().expect("temp dir"), vane, port, extra).await
    }

    /// Another node of `peer`'s cluster (give both the same `--store`): the same certificates,
    /// so a client trusts either, in a data directory of its own.
    pub async fn start_like(
        peer: &SpawnedVane,
        vane: &Path,
        port: u16,
        extra: &[String],
    ) -> SpawnedVane {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_tls(peer, dir.path());
        SpawnedVane::start_in(dir, vane, port, extra).await
    }

    /// `vane relay --no-quic` of `upstream` (trusting `origin`'s CA, and serving `origin`'s
    /// certificate, so a client trusts either), mirroring the environment of `sdk_key`, with
    /// HTTP on `port` and the protocol on `port + 1`; waits until it is ready.
    pub async fn start_relay(
        origin: &SpawnedVane,
        upstream: &str,
        sdk_key: &str,
        vane: &Path,
        port: u16,
    ) -> SpawnedVane {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_tls(origin, dir.path());
        let ca = origin.data().join("tls/ca.pem");
        let args: Vec<String> = [
            "relay",
            "--no-quic",
            "--connect-rate",
            "0",
            "--upstream",
            upstream,
            "--upstream-transport",
            "tcp",
            "--upstream-ca",
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([ca.display().to_string()])
        .collect();
        let mut cmd = Command::new(vane);
        cmd.env("VANE_SDK_KEYS", sdk_key);
        SpawnedVane::launch(cmd, dir, port, &args, &[]).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        vane: &Path,
        port: u16,
        extra: &[String],
    ) -> SpawnedVane {
        let serve = ["serve".to_owned(), "--no-quic".to_owned()];
        SpawnedVane::launch(Command::new(vane), dir, port, &serve, extra).await
    }

    /// Runs `cmd --data DIR ARGS --listen … --http … EXTRA` and waits until it is ready.
    async fn launch(
        mut cmd: Command,
        dir: tempfile::TempDir,
        port: u16,
        args: &[String],
        extra: &[String],
    ) -> SpawnedVane {
        let http = format!("127.0.0.1:{port}");
        let listen = format!("127.0.0.1:{}", port + 1);
        let child = cmd
            .arg("--data")
            .arg(dir.path())
            .args(args)
            .args(["--listen", &listen, "--http", &http])
            .args(extra)
            .env("VANE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("vane starts");
        let base = format!("http://{http}");
        let ops = AdminClient::new(&base, "");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ops.ready().await.unwrap_or(false) {
            assert!(Instant::now() < deadline, "vane became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap_or_default();
        SpawnedVane {
            admin: AdminClient::new(&base, token.trim()),
            child,
            dir,
            http: base,
            listen,
        }
    }

    /// Its data directory.
    pub fn data(&self) -> &Path {
        self.dir.path()
    }

    /// The PEM its clients trust (`DATA/tls/ca.pem`).
    pub fn ca(&self) -> String {
        std::fs::read_to_string(self.data().join("tls/ca.pem")).expect("CA")
    }

    /// Creates the environment `load` with the boolean flag `load` (on, serving true) and a
    /// server key, through its admin API; returns the key's secret.
    pub async fn load_env(&self) -> String {
        self.admin.create_env("load").await.expect("environment");
        let flag = vane_core::model::Flag::boolean("load", true, true);
        self.admin
            .put_flag("load", "load", &flag)
            .await
            .expect("flag");
        self.admin
            .create_key("load", vane_server::keys::KeyKind::Server)
            .await
            .expect("key")
            .secret
    }

    /// SIGKILL: gone at once, nothing flushed, no GoAway.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `peer`'s certificates into `dir/tls`.
fn copy_tls(peer: &SpawnedVane, dir: &Path) {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).expect("tls dir");
    for file in std::fs::read_dir(peer.data().join("tls")).expect("peer's tls dir") {
        let file = file.expect("a file");
        std::fs::copy(file.path(), tls.join(file.file_name())).expect("copied");
    }
}

impl Drop for SpawnedVane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
