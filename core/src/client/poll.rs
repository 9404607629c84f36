//! Snapshot polling, the third transport: when neither QUIC nor TCP+TLS gets through (networks
//! that pass only HTTP(S)), the client reads `GET /sdk/v1/snapshot` from the server's HTTP
//! listener with `If-None-Match`, and keeps trying to stream between polls.
//!
//! One request per poll, `Connection: close`, HTTP/1.1 written by hand over the TCP (and, for
//! `https://`, TLS) the client already has: an HTTP client library would cost the mobile
//! library more than this does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vane_proto::v1 as pb;

use super::Details;
use crate::eval::Context;
#[cfg(feature = "rules")]
use crate::model::{Flag, Segment};
use crate::protocol::{self, Selector};

/// The largest snapshot body read.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// What a poll brought.
#[derive(Debug)]
pub(crate) enum Polled {
    /// Nothing changed since the ETag sent.
    NotModified,
    /// The environment as it stands, and the ETag to send next time.
    Snapshot(pb::Snapshot, Option<String>),
}

/// Where and how to poll.
#[derive(Debug, Clone)]
pub(crate) struct Poller {
    host: String,
    port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    sdk_key: String,
    /// Evaluated mode: the context, as JSON text.
    context: Option<String>,
}

impl Poller {
    /// A poller of `base` (`http://HOST:PORT` or `https://HOST:PORT`); `tls` is the client's
    /// TLS configuration, used for `https`, verifying `server_name`.
    pub(crate) fn new(
        base: &str,
        tls: &Arc<rustls::ClientConfig>,
        server_name: &ServerName<'static>,
        sdk_key: &str,
    ) -> Result<Poller, String> {
        let (secure, rest) = if let Some(rest) = base.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = base.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("HTTP endpoint {base:?} is not http:// or https://"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("HTTP endpoint {base:?} has no port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("HTTP endpoint {base:?}: bad port"))?;
        let tls = secure.then(|| {
            let mut config = (**tls).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            (Arc::new(config), server_name.clone())
        });
        Ok(Poller {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            tls,
            sdk_key: sdk_key.to_owned(),
            context: None,
        })
    }

    /// Polls for evaluated values for `context` (mobile keys) instead of rules.
    pub(crate) fn evaluated(&mut self, context: &Context) {
        self.context = Some(context.to_json().to_string());
    }

    /// One poll, within `timeout`.
    pub(crate) async fn poll(
        &self,
        etag: Option<&str>,
        timeout: Duration,
    ) -> Result<Polled, String> {
        tokio::time::timeout(timeout, self.poll_inner(etag))
            .await
            .map_err(|_| format!("polling timed out after {timeout:?}"))?
    }

    async fn poll_inner(&self, etag: Option<&str>) -> Result<Polled, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("polling {}:{}: {e}", self.host, self.port))?;
        let answer = match &self.tls {
            None => self.exchange(tcp, etag).await?,
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("polling over TLS: {e}"))?;
                self.exchange(tls, etag).await?
            }
        };
        parse(&answer)
    }

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        etag: Option<&str>,
    ) -> Result<Vec<u8>, String> {
        let mut path = "/sdk/v1/snapshot".to_owned();
        if let Some(ctx) = &self.context {
            path.push_str("?context=");
            percent_encode(ctx, &mut path);
        }
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nX-API-Key: {}\r\nAccept: application/json\r\nConnection: close\r\n",
            self.host, self.port, self.sdk_key
        );
        if let Some(tag) = etag {
            request.push_str(&format!("If-None-Match: {tag}\r\n"));
        }
        request.push_str("\r\n");
        let io = |e: std::io::Error| format!("polling: {e}");
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        stream.flush().await.map_err(io)?;
        let mut answer = Vec::new();
        let read = (&mut stream)
            .take(MAX_BODY as u64 + 64 * 1024)
            .read_to_end(&mut answer)
            .await;
        // A TLS peer that closes without close_notify still sent the whole answer.
        if let Err(e) = read
            && answer.is_empty()
        {
            return Err(io(e));
        }
        Ok(answer)
    }
}

fn percent_encode(text: &str, out: &mut String) {
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
}

/// The snapshot's JSON, as the server's `SdkSnapshot` writes it.
#[derive(Debug, serde::Deserialize)]
struct Body {
    version: u64,
    epoch: String,
    #[cfg(feature = "rules")]
    #[serde(default)]
    flags: Option<Vec<Flag>>,
    #[cfg(feature = "rules")]
    #[serde(default)]
    segments: Option<Vec<Segment>>,
    #[serde(default)]
    values: Option<BTreeMap<String, Details>>,
}

/// Reads an HTTP/1.1 answer: `304`, or `200` with the snapshot (as a protocol Snapshot, so the
/// flags are checked and applied as a streamed one is).
fn parse(answer: &[u8]) -> Result<Polled, String> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("polling: the answer has no end of headers")?;
    let head = std::str::from_utf8(&answer[..end]).map_err(|_| "polling: headers not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .ok_or("polling: no status line")?;
    let mut etag = None;
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "etag" => etag = Some(value.trim().to_owned()),
                "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
    }
    let body = &answer[end + 4..];
    match status {
        "304" => return Ok(Polled::NotModified),
        "200" => {}
        other => {
            let text = String::from_utf8_lossy(body);
            return Err(format!("polling: HTTP {other}: {}", text.trim()));
        }
    }
    if chunked {
        return Err("polling: a chunked answer (the snapshot endpoint sends a length)".into());
    }
    // From text, like the cache file: one instantiation of the flag model's deserializer, not
    // one per input type (each is ~40 KB of the mobile library).
    let body = std::str::from_utf8(body).map_err(|_| "polling: the snapshot is not UTF-8")?;
    let body: Body =
        serde_json::from_str(body).map_err(|e| format!("polling: the snapshot: {e}"))?;
    let epoch = protocol::parse_epoch_hex(&body.epoch)
        .ok_or_else(|| format!("polling: epoch {:?}", body.epoch))?;
    let selector = Selector {
        epoch,
        version: body.version,
    };
    let values = body
        .values
        .unwrap_or_default()
        .into_iter()
        .map(|(key, d)| pb::EvaluatedFlag {
            key,
            value: d.value.as_ref().map(Into::into),
            variant: d.variant.unwrap_or_default(),
            reason: crate::convert::reason_to_wire(d.reason).into(),
            error_code: d
                .error_code
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default(),
            version: 0,
        })
        .collect();
    #[cfg(feature = "rules")]
    let (flags, segments) = (
        body.flags
            .unwrap_or_default()
            .iter()
            .map(Into::into)
            .collect(),
        body.segments
            .unwrap_or_default()
            .iter()
            .map(Into::into)
            .collect(),
    );
    // A build without rules mode reads values only (what a mobile key is sent).
    #[cfg(not(feature = "rules"))]
    let (flags, segments) = (Vec::new(), Vec::new());
    let snapshot = pb::Snapshot {
        selector: Some(selector.into()),
        flags,
        segments,
        values,
        reason: pb::SnapshotReason::NoSelector.into(),
    };
    Ok(Polled::Snapshot(snapshot, etag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_snapshots_or_not_modified() {
        let body = r#"{"environment":"prod","version":7,"epoch":"00000000000000ab",
            "flags":[{"key":"a","on":true,"variants":{"on":true,"off":false},"off_variant":"off","fallthrough":{"variant":"on"}}],
            "segments":[]}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nETag: \"x-7\"\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let Polled::Snapshot(s, tag) = parse(answer.as_bytes()).unwrap() else {
            panic!("a snapshot");
        };
        assert_eq!(tag.as_deref(), Some("\"x-7\""));
        assert_eq!(s.selector.unwrap().version, 7);
        assert_eq!(s.flags.len(), 1);
        assert!(matches!(
            parse(b"HTTP/1.1 304 Not Modified\r\netag: \"x-7\"\r\n\r\n").unwrap(),
            Polled::NotModified
        ));
        let refused = parse(b"HTTP/1.1 401 Unauthorized\r\n\r\n{\"error\":{}}").unwrap_err();
        assert!(refused.contains("401"), "{refused}");
    }

    #[test]
    fn contexts_are_percent_encoded() {
        let mut out = String::new();
        percent_encode(r#"{"key":"u 1"}"#, &mut out);
        assert_eq!(out, "%7B%22key%22%3A%22u%201%22%7D");
    }
}
