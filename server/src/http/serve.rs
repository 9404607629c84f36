//! Serving the router on its listener, with the limits a public HTTP port needs: a request's
//! headers must arrive in time ([`HttpLimits`]: a slowloris client is closed, not kept),
//! accept errors back off (as the protocol listener's do), and shutdown lets requests in flight finish for a bounded time.
//! HTTP/1.1 only, on hyper directly (`axum::serve` has no header timeout).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tracing::debug;

use super::HttpLimits;

/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown` resolves; over TLS with `tls` (`--http-tls`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = crate::server::accept(&listener, "HTTP") => accepted,
        };
        let _ = sock.set_nodelay(true);
        // Handlers and layers see who is asking (the admin token's failure limit is per
        // source), as axum's `ConnectInfo`.
        let service = app.clone().map_request(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req
        });
        let service = TowerToHyperService::new(service);
        let (http, watcher) = (http.clone(), graceful.watcher());
        let Some(tls) = tls.clone() else {
            let conn = watcher.watch(http.serve_connection(TokioIo::new(sock), service));
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "HTTP connection ended");
                }
            });
            continue;
        };
        // The handshake has the time the headers have.
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(handshake_timeout, tls.accept(sock)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return debug!(%peer, error = %e, "HTTPS handshake failed"),
                Err(_) => return debug!(%peer, "HTTPS handshake timed out"),
            };
            let conn = watcher.watch(http.serve_connection(TokioIo::new(stream), service));
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "HTTPS connection ended");
            }
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("HTTP requests still open after the drain; closing them");
    }
}
