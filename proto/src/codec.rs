//! The length-prefixed frame codec.
//!
//! A frame on the wire is a 4-byte big-endian body length followed by the body, one protobuf
//! [`Frame`]. Decoding is two steps: [`check`] looks only at the prefix and says whether a whole
//! frame is buffered (or that it never will be, because it is over the limit); only then does
//! [`decode`] split the body off and parse it ([`decode_slice`] parses it where it lies, for a
//! reader with the bytes in a buffer of its own). So an oversized length is refused before a single
//! byte is allocated for it, and "need more bytes" (`Ok(None)`) is never confused with
//! "malformed" (`Err`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::v1::Frame;

/// Bytes in the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Default limit for frames the server sends (snapshots can be large): 16 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Default limit for frames a client sends (Hello, Fetch, Ack): 64 KiB.
pub const DEFAULT_MAX_CLIENT_FRAME_LEN: usize = 64 * 1024;

/// Why a buffer does not hold a valid frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announces a body longer than the limit. The stream cannot be resynchronised.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced body length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The body is not a valid protobuf `Frame`.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
}

/// Looks at the front of `buf` and returns the body length of the first frame if all of it is
/// buffered, `Ok(None)` if more bytes are needed, or [`DecodeError::TooLarge`].
pub fn check(buf: &[u8], max: usize) -> Result<Option<usize>, DecodeError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    Ok((buf.len() - PREFIX_LEN >= len).then_some(len))
}

/// How many more bytes must arrive before [`decode`] can make progress on `buf`: used by readers
/// to reserve exactly what the current frame needs (already bounded by [`check`]).
pub fn wanted(buf: &[u8]) -> usize {
    match buf.first_chunk::<PREFIX_LEN>() {
        None => PREFIX_LEN - buf.len(),
        Some(prefix) => {
            let total = PREFIX_LEN + u32::from_be_bytes(*prefix) as usize;
            total.saturating_sub(buf.len())
        }
    }
}

/// Removes one frame from the front of `buf` and decodes it. `Ok(None)`: need more bytes, `buf`
/// untouched. A frame whose `kind` is a case this version does not know decodes with
/// `kind == None`; receivers skip it.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, DecodeError> {
    let Some(len) = check(buf, max)? else {
        return Ok(None);
    };
    buf.advance(PREFIX_LEN);
    let body = buf.split_to(len).freeze();
    Ok(Some(Frame::decode(body)?))
}

/// Decodes the frame at the front of `buf` without taking anything out of it: the frame and the
/// bytes it used, or `Ok(None)` if more bytes are needed. For readers that hold the bytes in a
/// slice of their own (a read buffer) rather than a [`BytesMut`].
pub fn decode_slice(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(len) = check(buf, max)? else {
        return Ok(None);
    };
    let frame = Frame::decode(&buf[PREFIX_LEN..PREFIX_LEN + len])?;
    Ok(Some((frame, PREFIX_LEN + len)))
}

/// Appends `frame`, length-prefixed, to `out`.
pub fn encode_into(frame: &Frame, out: &mut BytesMut) {
    let len = frame.encoded_len();
    out.reserve(PREFIX_LEN + len);
    // A frame can never reach 4 GiB: every sender limits frames far below that.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    frame
        .encode(out)
        .expect("BytesMut grows, so encoding cannot run out of space");
}

/// Encodes `frame`, length-prefixed, into a new buffer.
pub fn encode(frame: &Frame) -> Bytes {
    let mut out = BytesMut::new();
    encode_into(frame, &mut out);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Ack, Selector, frame::Kind};

    fn ack(version: u64) -> Frame {
        Ack {
            selector: Some(Selector { epoch: 7, version }),
        }
        .into()
    }

    #[test]
    fn round_trip_and_partial_input() {
        let bytes = encode(&ack(42));
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(
                decode(&mut buf, 1024)
                    .expect("a prefix is not malformed")
                    .is_none()
            );
            assert_eq!(buf.len(), cut, "need-more-bytes leaves the buffer alone");
            let expect = if cut < PREFIX_LEN {
                PREFIX_LEN - cut
            } else {
                bytes.len() - cut
            };
            assert_eq!(wanted(&buf), expect);
        }
        let mut buf = BytesMut::from(&bytes[..]);
        buf.extend_from_slice(&encode(&ack(43)));
        let (first, used) = decode_slice(&buf, 1024).unwrap().unwrap();
        assert_eq!(
            (first, used),
            (ack(42), bytes.len()),
            "a slice is read, not consumed"
        );
        assert_eq!(decode_slice(&bytes[..bytes.len() - 1], 1024).unwrap(), None);
        assert_eq!(decode(&mut buf, 1024).unwrap(), Some(ack(42)));
        assert_eq!(decode(&mut buf, 1024).unwrap(), Some(ack(43)));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        match check(&buf, 1024) {
            Err(DecodeError::TooLarge { len, max }) => {
                assert_eq!((len, max), (u32::MAX as usize, 1024));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // Exactly at the limit is fine.
        let mut at_limit = BytesMut::from(&[0, 0, 4, 0][..]);
        assert!(decode(&mut at_limit, 1024).unwrap().is_none());
    }

    #[test]
    fn garbage_body_is_malformed() {
        // Field 1, wire type 2 (length-delimited), length 10, but only 2 bytes follow.
        let mut buf = BytesMut::from(&[0, 0, 0, 4, 0x0a, 0x0a, 0x01, 0x02][..]);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_oneof_case_decodes_without_kind() {
        // Field 99 (a frame kind from the future), length-delimited, empty.
        let body = [0x9a, 0x06, 0x00];
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
        let frame = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(frame.kind, None);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        // Ack { selector { epoch: 7, version: 1 }, field 15: varint 1 }
        let mut body = Vec::new();
        ack(1).encode(&mut body).unwrap();
        // Append an unknown field 15 inside the Ack: rebuild by hand.
        let Some(Kind::Ack(a)) = ack(1).kind else {
            unreachable!()
        };
        let mut inner = a.encode_to_vec();
        inner.extend_from_slice(&[0x78, 0x01]);
        let mut framed = vec![0x4a, inner.len() as u8];
        framed.extend_from_slice(&inner);
        let decoded = Frame::decode(&framed[..]).unwrap();
        assert_eq!(decoded, ack(1));
        assert_ne!(body, framed);
    }
}
