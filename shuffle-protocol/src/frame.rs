//! The one frame codec: how control messages and data blocks share a byte stream.
//!
//! A frame is a 5-byte header — the payload length as a little-endian `u32` and
//! a [`FrameKind`] byte — followed by the payload. Control messages travel as
//! postcard in [`FrameKind::Request`] and [`FrameKind::Response`] frames; blocks
//! travel untouched in [`FrameKind::Block`] frames, so payload bytes never pass
//! through serde.
//!
//! [`FrameDecoder`] is the decoder both sides use, sans-IO: it says where the
//! next bytes read from the stream should go and how many to read at most, and
//! hands out whole frames. It reads headers (and small frames) through a small
//! staging buffer and every larger payload into a buffer of its own, sized by
//! the header but allocated only as the payload's bytes arrive, so a stored
//! block never pins more memory than its own length and a header announcing
//! 16 MiB with nothing behind it costs at most [`FIRST_PAYLOAD_ALLOCATION`].

use bytes::{Buf, Bytes, BytesMut};

use crate::ProtocolError;

/// Bytes of the frame header: `u32` payload length + `u8` kind.
pub const FRAME_HEADER_LEN: usize = 5;

/// Largest frame payload accepted, 16 MiB. A block holds at most
/// [`crate::MAX_BLOCK_RAW_LEN`] (8 MiB) of records plus its header, and the
/// largest control messages (a `MapEnd` naming [`crate::MAX_PARTITIONS`]
/// partitions, a `PartitionEnd` naming [`crate::MAX_MAPS`] maps) are kept
/// below it by those limits; anything larger is a broken or hostile peer.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Bytes read into the staging buffer at a time while no large payload is
/// under way: a frame header plus a small frame or the start of a large one.
/// Small, because whatever of a large payload lands here is copied once into
/// the payload's own buffer.
pub const STAGING_READ: usize = 4096;

/// Payloads up to this size are copied out of the staging buffer instead of
/// getting a buffer read in place: control messages and tiny blocks.
pub const SMALL_FRAME: usize = 1024;

/// The first allocation for a large payload: the whole payload up to 128 KiB
/// (a 64 KiB block with its header fits, so typical blocks are read in place
/// with no reallocation); larger payloads double from here as their bytes
/// arrive, never beyond their announced length.
pub const FIRST_PAYLOAD_ALLOCATION: usize = 128 * 1024;

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

/// One decoded frame. A block payload is a buffer of its own, exactly its length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload, without the frame header.
    pub payload: Bytes,
}

/// The header announcing a payload of `len` bytes of `kind`, or an error if
/// `len` exceeds [`MAX_FRAME_LEN`].
pub fn encode_frame_header(kind: FrameKind, len: usize) -> Result<[u8; FRAME_HEADER_LEN], ProtocolError> {
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge { len, max: MAX_FRAME_LEN });
    }
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[..4].copy_from_slice(&(len as u32).to_le_bytes());
    header[4] = kind as u8;
    Ok(header)
}

/// A whole frame (header and payload) as one buffer; for control messages and tests.
pub fn encode_frame(kind: FrameKind, payload: &[u8]) -> Result<Bytes, ProtocolError> {
    let header = encode_frame_header(kind, payload.len())?;
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(out.freeze())
}

/// A large payload being received into its own buffer.
#[derive(Debug)]
struct Payload {
    kind: FrameKind,
    /// Announced length.
    len: usize,
    buf: BytesMut,
}

/// Decodes frames from a byte stream without doing I/O itself.
///
/// The I/O loop around it is: take a frame out with [`FrameDecoder::next_frame`]
/// while there is one; otherwise read at most `limit` bytes into the buffer
/// [`FrameDecoder::read_buf`] returns (growing its capacity first by
/// [`FrameDecoder::next_allocation`] bytes, which a server accounts in its
/// memory budget before reading), and call `next_frame` again.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Headers and small frames; at most a few KiB.
    staging: BytesMut,
    /// The large payload under way, if any.
    payload: Option<Payload>,
    /// Largest payload accepted.
    max_len: usize,
    /// Set after an error: the stream cannot be resynchronised.
    failed: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder accepting payloads up to `max_len` (at most [`MAX_FRAME_LEN`]).
    pub fn new(max_len: usize) -> Self {
        Self { staging: BytesMut::new(), payload: None, max_len: max_len.min(MAX_FRAME_LEN), failed: false }
    }

    /// Takes the next complete frame out, if one has arrived. `Ok(None)` is
    /// the expected "read more" condition; an error means the stream is
    /// broken (an oversized or unknown frame) and is final.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if self.failed {
            return Err(ProtocolError::MalformedMessage {
                what: "frame stream",
                reason: "an earlier frame was invalid".into(),
            });
        }
        loop {
            if let Some(p) = &self.payload {
                // Until its buffer exists, a payload's first bytes wait in the staging buffer.
                if p.buf.capacity() == 0 && self.staging.len() >= p.len {
                    let (kind, len) = (p.kind, p.len);
                    self.payload = None;
                    let payload = Bytes::copy_from_slice(&self.staging[..len]);
                    self.staging.advance(len);
                    return Ok(Some(Frame { kind, payload }));
                }
                if p.buf.len() < p.len {
                    return Ok(None);
                }
                let p = self.payload.take().expect("checked above");
                return Ok(Some(Frame { kind: p.kind, payload: p.buf.freeze() }));
            }
            if self.staging.len() < FRAME_HEADER_LEN {
                return Ok(None);
            }
            let s = &self.staging;
            let len = u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize;
            let kind = match FrameKind::try_from(s[4]) {
                Ok(kind) => kind,
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            };
            if len > self.max_len {
                self.failed = true;
                return Err(ProtocolError::FrameTooLarge { len, max: self.max_len });
            }
            if len <= SMALL_FRAME {
                if self.staging.len() < FRAME_HEADER_LEN + len {
                    return Ok(None);
                }
                self.staging.advance(FRAME_HEADER_LEN);
                // Copied out, so a small frame never pins the staging buffer.
                let payload = Bytes::copy_from_slice(&self.staging[..len]);
                self.staging.advance(len);
                return Ok(Some(Frame { kind, payload }));
            }
            self.staging.advance(FRAME_HEADER_LEN);
            self.payload = Some(Payload { kind, len, buf: BytesMut::new() });
        }
    }

    /// Bytes of capacity the next [`FrameDecoder::read_buf`] call will allocate
    /// (0 when the current buffer has room).
    pub fn next_allocation(&self) -> usize {
        match &self.payload {
            Some(p) if p.buf.capacity() == 0 => p.len.min(FIRST_PAYLOAD_ALLOCATION),
            Some(p) if p.buf.capacity() == p.buf.len() => Self::grown_capacity(p) - p.buf.capacity(),
            Some(_) => 0,
            None if self.staging.capacity() - self.staging.len() < STAGING_READ => STAGING_READ,
            None => 0,
        }
    }

    fn grown_capacity(p: &Payload) -> usize {
        (p.buf.capacity() * 2).clamp(FIRST_PAYLOAD_ALLOCATION.min(p.len), p.len)
    }

    /// Where the next bytes from the stream go, and at most how many to read
    /// (never past the end of the payload under way, so the next frame's
    /// header lands in the staging buffer). Allocates what
    /// [`FrameDecoder::next_allocation`] announced.
    pub fn read_buf(&mut self) -> (&mut BytesMut, usize) {
        if let Some(p) = &mut self.payload {
            if p.buf.capacity() == 0 {
                let mut buf = BytesMut::with_capacity(p.len.min(FIRST_PAYLOAD_ALLOCATION));
                let staged = self.staging.len().min(p.len);
                buf.extend_from_slice(&self.staging[..staged]);
                self.staging.advance(staged);
                p.buf = buf;
            } else if p.buf.capacity() == p.buf.len() {
                // Grow by a fresh exact allocation: `BytesMut::reserve` may overshoot.
                let mut grown = BytesMut::with_capacity(Self::grown_capacity(p));
                grown.extend_from_slice(&p.buf);
                p.buf = grown;
            }
            let limit = (p.len - p.buf.len()).min(p.buf.capacity() - p.buf.len());
            return (&mut p.buf, limit);
        }
        if self.staging.capacity() - self.staging.len() < STAGING_READ {
            self.staging.reserve(STAGING_READ);
        }
        (&mut self.staging, STAGING_READ)
    }

    /// Bytes of memory held for partly received frames.
    pub fn buffered_capacity(&self) -> usize {
        self.staging.capacity() + self.payload.as_ref().map_or(0, |p| p.buf.capacity())
    }

    /// Bytes of a partly received frame (0 between frames): a stream that
    /// ends with this above zero was cut inside a frame.
    pub fn partial_len(&self) -> usize {
        self.staging.len() + self.payload.as_ref().map_or(0, |p| FRAME_HEADER_LEN + p.buf.len())
    }

    /// Whether nothing of a next frame has arrived: a stream may end here cleanly.
    pub fn is_between_frames(&self) -> bool {
        self.partial_len() == 0
    }

    /// Feeds `bytes` as if read from the stream, for tests and fuzzing.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Vec<Frame>, ProtocolError> {
        let mut frames = Vec::new();
        loop {
            while let Some(frame) = self.next_frame()? {
                frames.push(frame);
            }
            if bytes.is_empty() {
                return Ok(frames);
            }
            let (buf, limit) = self.read_buf();
            let n = limit.min(bytes.len());
            buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn oversized_frame_is_rejected_from_its_header_alone() {
        let mut header = ((MAX_FRAME_LEN as u32) + 1).to_le_bytes().to_vec();
        header.push(FrameKind::Block as u8);
        let err = FrameDecoder::default().feed(&header).unwrap_err();
        assert_eq!(err, ProtocolError::FrameTooLarge { len: MAX_FRAME_LEN + 1, max: MAX_FRAME_LEN });
        assert!(encode_frame_header(FrameKind::Block, MAX_FRAME_LEN + 1).is_err());
    }

    #[test]
    fn unknown_kind_is_rejected_and_the_stream_stays_failed() {
        let mut d = FrameDecoder::default();
        assert_eq!(d.feed(&[0, 0, 0, 0, 9]).unwrap_err(), ProtocolError::UnknownFrameKind(9));
        assert!(d.feed(&encode_frame(FrameKind::Request, b"x").unwrap()).is_err());
    }

    #[test]
    fn partial_frame_waits_for_more_bytes() {
        let frame = encode_frame(FrameKind::Request, b"hello").unwrap();
        let mut d = FrameDecoder::default();
        assert!(d.feed(&frame[..7]).unwrap().is_empty());
        assert_eq!(d.partial_len(), 7);
        let frames = d.feed(&frame[7..]).unwrap();
        assert_eq!(frames[0].payload, Bytes::from_static(b"hello"));
        assert_eq!(d.partial_len(), 0);
    }

    #[test]
    fn a_header_announcing_16_mib_allocates_only_the_first_chunk() {
        let mut d = FrameDecoder::default();
        let header = encode_frame_header(FrameKind::Block, MAX_FRAME_LEN).unwrap();
        assert!(d.feed(&header).unwrap().is_empty());
        assert!(d.buffered_capacity() <= STAGING_READ + FIRST_PAYLOAD_ALLOCATION, "{}", d.buffered_capacity());
        // As bytes arrive, capacity follows them (doubling), not the announced length.
        d.feed(&vec![7u8; 300_000]).unwrap();
        assert!(d.buffered_capacity() <= STAGING_READ + 512 * 1024, "{}", d.buffered_capacity());
    }

    #[test]
    fn a_block_payload_gets_a_buffer_of_exactly_its_length() {
        let payload = vec![1u8; 65_000];
        let wire = encode_frame(FrameKind::Block, &payload).unwrap();
        let mut d = FrameDecoder::default();
        assert!(d.feed(&wire[..wire.len() - 1]).unwrap().is_empty());
        let staging = d.staging.capacity();
        assert_eq!(d.buffered_capacity(), staging + 65_000, "no slack behind the block");
        let frames = d.feed(&wire[wire.len() - 1..]).unwrap();
        assert_eq!(frames[0].payload, Bytes::from(payload));
    }

    #[test]
    fn next_allocation_announces_growth_before_it_happens() {
        let mut d = FrameDecoder::default();
        let header = encode_frame_header(FrameKind::Block, 1 << 20).unwrap();
        d.feed(&header).unwrap();
        assert_eq!(d.next_allocation(), FIRST_PAYLOAD_ALLOCATION);
        d.feed(&vec![0u8; FIRST_PAYLOAD_ALLOCATION]).unwrap();
        let before = d.buffered_capacity();
        let announced = d.next_allocation();
        assert_eq!(announced, FIRST_PAYLOAD_ALLOCATION, "doubling");
        let (_, limit) = d.read_buf();
        assert!(limit > 0);
        assert_eq!(d.buffered_capacity(), before + announced);
    }

    proptest! {
        #[test]
        fn frames_round_trip_whatever_the_read_sizes(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 1..8),
            chunk in 1usize..5000,
        ) {
            let mut wire = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                let kind = [FrameKind::Request, FrameKind::Response, FrameKind::Block][i % 3];
                wire.extend_from_slice(&encode_frame(kind, p).unwrap());
            }
            let mut d = FrameDecoder::default();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                out.extend(d.feed(piece).unwrap().into_iter().map(|f| f.payload.to_vec()));
            }
            prop_assert_eq!(out, payloads);
            prop_assert_eq!(d.partial_len(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = FrameDecoder::default().feed(&bytes);
        }
    }
}
