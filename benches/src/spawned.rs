//! A `vane serve` a bench tool starts for itself: a fresh data directory, loopback ports, logs at
//! `warn`, killed when dropped. `ofrep-load`, `clone-load`, `write-load` and `cluster-load`
//! measure against one (or several).

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
    /// The admin API, with the token the server made.
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
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls).expect("tls dir");
        for file in std::fs::read_dir(peer.data().join("tls")).expect("peer's tls dir") {
            let file = file.expect("a file");
            std::fs::copy(file.path(), tls.join(file.file_name())).expect("copied");
        }
        SpawnedVane::start_in(dir, vane, port, extra).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        vane: &Path,
        port: u16,
        extra: &[String],
    ) -> SpawnedVane {
        let http = format!("127.0.0.1:{port}");
        let listen = format!("127.0.0.1:{}", port + 1);
        let child = Command::new(vane)
            .arg("--data")
            .arg(dir.path())
            .args(["serve", "--no-quic", "--listen", &listen, "--http", &http])
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
        let token = std::fs::read_to_string(dir.path().join("admin-token")).expect("admin token");
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

    /// SIGKILL: gone at once, nothing flushed, no GoAway.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SpawnedVane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
