//! Arbitrary bytes as a stream of frames, and every frame's payload as a
//! request and as a response: no input may panic or loop.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shuffle_protocol::{Request, Response, decode_frame};

fuzz_target!(|data: &[u8]| {
    // Feed the input in two pieces to exercise partial frames.
    let split = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    let mut buf = BytesMut::from(&data[..split]);
    let mut fed_rest = false;
    loop {
        match decode_frame(&mut buf) {
            Ok(Some(frame)) => {
                let _ = Request::decode(&frame.payload);
                let _ = Response::decode(&frame.payload);
            }
            Ok(None) if !fed_rest => {
                buf.extend_from_slice(&data[split..]);
                fed_rest = true;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
