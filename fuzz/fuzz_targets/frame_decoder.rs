//! Fuzzes the socket's frame decoder and the request decoding behind it.
//!
//! The first input byte picks where the rest of the input is split into two
//! reads; the rest is the byte stream a client sent. Every complete frame is
//! decoded as a `WireRequest` the way the socket transport does it: errors are
//! expected, panics are bugs. Invariants checked:
//! - no frame is longer than the limit;
//! - the frames, re-encoded, are exactly the bytes they were cut from;
//! - the outcome (frames, then an oversized header, a cut-short frame or a
//!   clean end) is the same whether the stream arrives in one read, in two
//!   reads split anywhere, or one byte at a time.
//!
//! Run with `cargo fuzz run frame_decoder` from the repository root.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rankd_client::frame::{encode_frame, FrameDecoder, FrameError, HEADER_BYTES};
use rankd_client::wire::{WireId, WireRequest};

/// The daemon's default `--max-frame-bytes`.
const LIMIT: usize = 1 << 20;

/// What a connection made of the stream: its frames, then how it ended
/// (`None`: every byte was part of a whole frame).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<Vec<u8>>,
    end: Option<FrameError>,
}

/// Feeds `reads` to a decoder as successive socket reads, taking off every
/// whole frame after each, like the socket's reader loop.
fn feed<'a>(reads: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let decoder = FrameDecoder::new(LIMIT);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for read in reads {
        buf.extend_from_slice(read);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame.to_vec()),
                Ok(None) => break,
                // The connection is closed at the first oversized header.
                Err(e) => {
                    assert!(
                        matches!(e, FrameError::TooLarge { declared, limit } if declared > limit && limit == LIMIT),
                        "decode may only fail on an oversized frame: {e:?}"
                    );
                    return Outcome { frames, end: Some(e) };
                }
            }
        }
    }
    let end = decoder.finish(&buf).err();
    if let Some(e) = &end {
        assert_eq!(*e, FrameError::Truncated { buffered: buf.len() });
    }
    Outcome { frames, end }
}

/// Decodes one frame as the socket transport does; must never panic.
fn decode_request(frame: &[u8]) {
    match rmp_serde::from_slice::<WireRequest>(frame) {
        Ok(req) => {
            // What decodes re-encodes, and decodes to the same bytes again
            // (compared as bytes, since features may hold NaN).
            let bytes = rmp_serde::to_vec_named(&req).expect("a decoded request encodes");
            let again: WireRequest =
                rmp_serde::from_slice(&bytes).expect("an encoded request decodes");
            let bytes_again = rmp_serde::to_vec_named(&again).expect("a decoded request encodes");
            assert_eq!(bytes, bytes_again, "request encoding is not stable: {req:?}");
        }
        Err(_) => {
            // The transport then looks for just the id to address its error.
            let _ = rmp_serde::from_slice::<WireId>(frame);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let cut = selector as usize * stream.len() / 255;
    let (head, tail) = stream.split_at(cut);

    let whole = feed([stream]);
    let split = feed([head, tail]);
    assert_eq!(whole, split, "splitting the stream at {cut} changed the frames");
    let bytewise = feed(stream.chunks(1));
    assert_eq!(whole, bytewise, "feeding the stream a byte at a time changed the frames");

    let mut reencoded = Vec::with_capacity(stream.len());
    for frame in &whole.frames {
        assert!(frame.len() <= LIMIT, "frame of {} bytes over the limit", frame.len());
        encode_frame(frame, &mut reencoded);
    }
    assert!(
        stream.starts_with(&reencoded),
        "the frames are not the bytes they were cut from"
    );
    match &whole.end {
        None => assert_eq!(reencoded.len(), stream.len(), "bytes left over at a clean end"),
        Some(FrameError::Truncated { buffered }) => {
            assert_eq!(reencoded.len() + buffered, stream.len());
        }
        Some(FrameError::TooLarge { declared, .. }) => {
            let header = &stream[reencoded.len()..];
            assert!(header.len() >= HEADER_BYTES);
            let got = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            assert_eq!(got as usize, *declared);
        }
    }

    for frame in &whole.frames {
        decode_request(frame);
    }
});
