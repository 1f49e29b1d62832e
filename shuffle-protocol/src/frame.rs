//! The one frame codec: how control messages and data blocks share a byte stream.
//!
//! A frame is a 5-byte header — the payload length as a little-endian `u32` and
//! a [`FrameKind`] byte — followed by the payload. Control messages travel as
//! postcard in [`FrameKind::Request`] and [`FrameKind::Response`] frames; blocks
//! travel untouched in [`FrameKind::Block`] frames, so payload bytes never pass
//! through serde. The decoder is sans-IO: it looks at a buffer and either takes
//! one frame out of it, says it needs more bytes, or rejects the stream.

use bytes::{Buf, Bytes, BytesMut};

use crate::ProtocolError;

/// Bytes of the frame header: `u32` payload length + `u8` kind.
pub const FRAME_HEADER_LEN: usize = 5;

/// Largest frame payload accepted, 16 MiB. A block holds at most
/// [`crate::MAX_BLOCK_RAW_LEN`] (8 MiB) of records plus its header, and the
/// largest control message (a `MapEnd` naming a million partitions) is about
/// 12 MiB; anything larger is a broken or hostile peer, and refusing it before
/// buffering bounds the memory one stream can make us hold.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// What a frame's payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A postcard-encoded [`crate::Request`], client to server.
    Request = 1,
    /// A postcard-encoded [`crate::Response`], server to client.
    Response = 2,
    /// A block in the format of [`crate::block`], either direction.
    Block = 3,
}

impl TryFrom<u8> for FrameKind {
    type Error = ProtocolError;

    fn try_from(value: u8) -> Result<Self, ProtocolError> {
        match value {
            1 => Ok(Self::Request),
            2 => Ok(Self::Response),
            3 => Ok(Self::Block),
            other => Err(ProtocolError::UnknownFrameKind(other)),
        }
    }
}

/// One decoded frame; the payload shares the receive buffer's allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload, without the frame header.
    pub payload: Bytes,
}

/// The header announcing a payload of `len` bytes of `kind`.
///
/// Panics if `len` exceeds [`MAX_FRAME_LEN`]: encoders construct payloads
/// themselves and must respect the limit, so this is a programming error.
pub fn encode_frame_header(kind: FrameKind, len: usize) -> [u8; FRAME_HEADER_LEN] {
    assert!(len <= MAX_FRAME_LEN, "frame payload of {len} bytes exceeds MAX_FRAME_LEN");
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[..4].copy_from_slice(&(len as u32).to_le_bytes());
    header[4] = kind as u8;
    header
}

/// A whole frame (header and payload) as one buffer; for control messages and tests.
pub fn encode_frame(kind: FrameKind, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&encode_frame_header(kind, payload.len()));
    out.extend_from_slice(payload);
    out.freeze()
}

/// Takes the first frame out of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (an expected
/// condition: read more bytes and call again), and an error as soon as the
/// header shows a frame that can never be valid, before its payload arrives.
/// `buf` reserves room for the rest of a partly received frame, so the caller
/// can keep reading into it.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge { len, max: MAX_FRAME_LEN });
    }
    let kind = FrameKind::try_from(buf[4])?;
    if buf.len() < FRAME_HEADER_LEN + len {
        buf.reserve(FRAME_HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(FRAME_HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    Ok(Some(Frame { kind, payload }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn oversized_frame_is_rejected_from_its_header_alone() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&((MAX_FRAME_LEN as u32) + 1).to_le_bytes());
        buf.extend_from_slice(&[FrameKind::Block as u8]);
        assert_eq!(
            decode_frame(&mut buf),
            Err(ProtocolError::FrameTooLarge { len: MAX_FRAME_LEN + 1, max: MAX_FRAME_LEN })
        );
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0, 9][..]);
        assert_eq!(decode_frame(&mut buf), Err(ProtocolError::UnknownFrameKind(9)));
    }

    #[test]
    fn partial_frame_waits_for_more_bytes() {
        let frame = encode_frame(FrameKind::Request, b"hello");
        let mut buf = BytesMut::from(&frame[..7]);
        assert_eq!(decode_frame(&mut buf), Ok(None));
        buf.extend_from_slice(&frame[7..]);
        let decoded = decode_frame(&mut buf).unwrap().unwrap();
        assert_eq!(decoded.payload, Bytes::from_static(b"hello"));
        assert!(buf.is_empty());
    }

    proptest! {
        #[test]
        fn frames_round_trip_whatever_the_read_sizes(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
            chunk in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                let kind = [FrameKind::Request, FrameKind::Response, FrameKind::Block][i % 3];
                wire.extend_from_slice(&encode_frame(kind, p));
            }
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(frame) = decode_frame(&mut buf).unwrap() {
                    out.push(frame.payload.to_vec());
                }
            }
            prop_assert_eq!(out, payloads);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_frame(&mut buf) {}
        }
    }
}
