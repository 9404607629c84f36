//! Frames over any byte stream: the async reading and writing around [`vane_proto::codec`], used
//! by both the client and the server on QUIC streams and TLS connections alike.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vane_proto::codec::{self, DecodeError};
use vane_proto::v1::Frame;

/// Most bytes reserved for one read, so a peer announcing a large frame and sending it slowly
/// does not make us allocate all of it up front.
const READ_CHUNK: usize = 16 * 1024;

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The stream failed, or ended in the middle of a frame.
    #[error("transport: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a valid frame; the stream cannot continue.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads length-prefixed frames from a stream, holding at most one partial frame.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    max: usize,
}

impl FrameReader {
    /// A reader that refuses frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameReader {
            buf: BytesMut::new(),
            max,
        }
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between frames.
    ///
    /// Cancel-safe: bytes read before a cancellation stay buffered for the next call.
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = codec::decode(&mut self.buf, self.max)? {
                return Ok(Some(frame));
            }
            self.buf.reserve(codec::wanted(&self.buf).min(READ_CHUNK));
            if r.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "stream ended inside a frame ({} bytes buffered)",
                        self.buf.len()
                    ),
                )
                .into());
            }
        }
    }

    /// Releases the buffer's memory when nothing is buffered (an idle connection keeps none).
    pub fn shrink_if_idle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }
}

/// Encodes `frame` and writes it, flushing so it leaves now.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> io::Result<()> {
    write_encoded(w, &codec::encode(frame)).await
}

/// Writes an already-encoded frame (shared by every session of an environment) and flushes.
pub async fn write_encoded<W: AsyncWrite + Unpin>(w: &mut W, bytes: &Bytes) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use vane_proto::v1::{Ack, Selector};

    #[tokio::test]
    async fn reads_frames_split_anywhere() {
        let frame: Frame = Ack {
            selector: Some(Selector {
                epoch: 1,
                version: 2,
            }),
        }
        .into();
        let one = codec::encode(&frame);
        let mut wire = Vec::new();
        wire.extend_from_slice(&one);
        wire.extend_from_slice(&one);
        // A reader that yields one byte at a time.
        let (mut tx, mut rx) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move { tx.write_all(&wire).await });
        let mut reader = FrameReader::new(1024);
        assert_eq!(reader.read(&mut rx).await.unwrap(), Some(frame.clone()));
        assert_eq!(reader.read(&mut rx).await.unwrap(), Some(frame));
        writer.await.unwrap().unwrap();
        assert!(reader.read(&mut rx).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let (mut tx, mut rx) = tokio::io::duplex(64);
        tx.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        drop(tx);
        let err = FrameReader::new(1024).read(&mut rx).await.unwrap_err();
        assert!(matches!(err, ReadError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof));
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_from_its_prefix() {
        let (mut tx, mut rx) = tokio::io::duplex(64);
        tx.write_all(&[0, 1, 0, 0]).await.unwrap();
        let err = FrameReader::new(1024).read(&mut rx).await.unwrap_err();
        assert!(matches!(
            err,
            ReadError::Decode(DecodeError::TooLarge { len: 65536, .. })
        ));
    }
}
