//! Socket framing: a 4-byte big-endian length N, then N bytes of MessagePack.
//! The decoder is a pure function of the bytes received so far, so it is
//! tested (and fuzzed) without sockets.

use bytes::{Buf, BytesMut};

pub const HEADER_BYTES: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {declared} bytes exceeds the limit of {limit} bytes")]
    TooLarge { declared: usize, limit: usize },
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    limit: usize,
}

impl FrameDecoder {
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }

    /// Takes one whole frame's payload off the front of `buf`, if there is one.
    /// A declared length over the limit is an error before any payload is
    /// buffered, so a hostile prefix never makes the reader allocate.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        if buf.len() < HEADER_BYTES {
            return Ok(None);
        }
        let declared = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if declared > self.limit {
            return Err(FrameError::TooLarge {
                declared,
                limit: self.limit,
            });
        }
        if buf.len() < HEADER_BYTES + declared {
            buf.reserve(HEADER_BYTES + declared - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_BYTES);
        Ok(Some(buf.split_to(declared)))
    }

    /// Called at end of stream: leftover bytes mean a frame was cut short.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), FrameError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: buf.len(),
            })
        }
    }
}

/// Appends one frame (header and payload) to `out`.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("frames are far below 4 GiB: this is a bug");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_decode_whole() {
        let mut wire = Vec::new();
        encode_frame(b"hello", &mut wire);
        encode_frame(b"", &mut wire);
        encode_frame(&[7u8; 300], &mut wire);
        let dec = FrameDecoder::new(1024);
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f.to_vec());
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f.to_vec());
            }
            assert_eq!(
                got,
                vec![b"hello".to_vec(), vec![], vec![7u8; 300]],
                "cut at {cut}"
            );
            assert!(dec.finish(&buf).is_ok());
        }
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let dec = FrameDecoder::new(16);
        let mut buf = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF][..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge {
                declared: u32::MAX as usize,
                limit: 16
            })
        );
        let mut buf = BytesMut::from(&[0, 0, 0, 10, 1, 2][..]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(dec.finish(&buf), Err(FrameError::Truncated { buffered: 6 }));
    }
}
