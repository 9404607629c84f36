//! Damaged data directories: the server refuses to start, saying what is wrong, instead of
//! starting empty or failing every write later.

use vane_server::keys::KeyKind;
use vane_server::server::Server;

use crate::harness::TestServer;

/// A server that ran with an environment and a few changes, then stopped.
async fn used_directory() -> TestServer {
    let mut server = TestServer::start().await;
    server.env_with_key("prod", KeyKind::Server).await;
    for value in [true, false, true] {
        server.put_bool("prod", "a", value).await;
    }
    server.stop().await;
    server
}

/// Starting on the directory again: the error, from binding or from loading.
async fn start_error(server: &TestServer) -> String {
    let mut config = server.config.clone();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.http = "127.0.0.1:0".parse().unwrap();
    let bound = match Server::bind(config).await {
        Ok(bound) => bound,
        Err(e) => return format!("{e:#}"),
    };
    match bound.run(std::future::pending()).await {
        Ok(()) => panic!("the server ran on a damaged directory"),
        Err(e) => format!("{e:#}"),
    }
}

fn sql(server: &TestServer, statement: &str) {
    let db = rusqlite::Connection::open(server.dir.path().join("vane.db")).unwrap();
    db.execute_batch(statement).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_behind_its_change_log_is_refused() {
    let server = used_directory().await;
    sql(&server, "UPDATE environments SET version = version - 2;");
    let error = start_error(&server).await;
    assert!(
        error
            .contains("environment \"prod\" is at version 1, but its change log ends at version 3"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_log_with_a_hole_is_refused() {
    let server = used_directory().await;
    sql(&server, "DELETE FROM changes WHERE version = 2;");
    let error = start_error(&server).await;
    assert!(error.contains("skips from version 1 to 3"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_database_in_a_used_directory_is_refused() {
    let server = used_directory().await;
    std::fs::write(server.dir.path().join("vane.db"), b"").unwrap();
    for wal in ["vane.db-wal", "vane.db-shm"] {
        let _ = std::fs::remove_file(server.dir.path().join(wal));
    }
    let error = start_error(&server).await;
    assert!(
        error.contains("refusing to start with no environments"),
        "{error}"
    );

    std::fs::remove_file(server.dir.path().join("vane.db")).unwrap();
    let error = start_error(&server).await;
    assert!(error.contains("is missing or empty"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_not_one_is_refused_with_its_path() {
    let server = used_directory().await;
    std::fs::write(server.dir.path().join("vane.db"), [0x5a; 8192]).unwrap();
    let error = start_error(&server).await;
    assert!(error.contains("vane.db"), "{error}");
    assert!(error.contains("not a database"), "{error}");
}
