//! Arbitrary bytes as a stream of frames, and every frame's payload as a
//! request and as a response: no input may panic or loop, and the decoder
//! never holds more than its input plus one payload's first allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shuffle_protocol::{FrameDecoder, Request, Response, frame::FIRST_PAYLOAD_ALLOCATION};

fuzz_target!(|data: &[u8]| {
    // Feed the input in two pieces to exercise partial frames.
    let split = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    let mut decoder = FrameDecoder::default();
    for piece in [&data[..split], &data[split..]] {
        match decoder.feed(piece) {
            Ok(frames) => {
                for frame in frames {
                    let _ = Request::decode(&frame.payload);
                    let _ = Response::decode(&frame.payload);
                }
            }
            Err(_) => return,
        }
        assert!(decoder.buffered_capacity() <= 2 * data.len() + FIRST_PAYLOAD_ALLOCATION + 8192);
    }
});
