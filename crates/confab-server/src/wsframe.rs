//! WebSocket framing (RFC 6455), the server's side: the client's masked
//! frames decoded from the connection's input, and the header of each
//! frame the server sends (unmasked, never fragmented).
//!
//! The decoder holds nothing of its own but an unfinished fragmented
//! message: a frame is taken from the input once it is whole, and a frame
//! or message over the limit is refused by its header, before its payload
//! is read, so a client cannot make the server buffer more than the limit.

use bytes::{Buf, BytesMut};

pub(crate) const CONTINUATION: u8 = 0x0;
pub(crate) const TEXT: u8 = 0x1;
pub(crate) const BINARY: u8 = 0x2;
pub(crate) const CLOSE: u8 = 0x8;
pub(crate) const PING: u8 = 0x9;
pub(crate) const PONG: u8 = 0xA;

/// A whole frame (a whole message, for text and binary) from the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    Text(String),
    /// Binary messages are refused; their bytes are not kept.
    Binary,
    Ping(Vec<u8>),
    Pong,
    /// The client's close, with its status code if it gave one.
    Close(Option<u16>),
}

/// Why the client's input cannot be read on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// A frame or message over the limit (close 1009).
    TooBig,
    /// A text message that is not UTF-8 (close 1007).
    NotUtf8,
    /// Anything else RFC 6455 forbids (close 1002).
    Protocol(&'static str),
}

/// The largest payload of a control frame.
const MAX_CONTROL: u64 = 125;

pub(crate) struct Decoder {
    max_message: usize,
    /// A fragmented message under way: whether it is text, and its bytes
    /// so far (none kept for binary).
    open: Option<(bool, Vec<u8>)>,
    /// The bytes of the open message, binary ones included.
    open_len: u64,
}

struct Header {
    fin: bool,
    opcode: u8,
    len: u64,
    mask: [u8; 4],
    size: usize,
}

impl Decoder {
    pub(crate) fn new(max_message: usize) -> Decoder {
        Decoder {
            max_message,
            open: None,
            open_len: 0,
        }
    }

    /// The next whole frame in `input` (its bytes are consumed), or `None`
    /// until one is whole.
    pub(crate) fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            let Some(h) = header(input)? else {
                return Ok(None);
            };
            let control = h.opcode & 0x8 != 0;
            if control {
                if !h.fin {
                    return Err(FrameError::Protocol("a fragmented control frame"));
                }
                if h.len > MAX_CONTROL {
                    return Err(FrameError::Protocol("a control frame over 125 bytes"));
                }
            } else if self.open_len + h.len > self.max_message as u64 {
                return Err(FrameError::TooBig);
            }
            let len = h.len as usize;
            if input.len() < h.size + len {
                // Room for the rest of this frame, at most the limit.
                input.reserve(h.size + len - input.len());
                return Ok(None);
            }
            input.advance(h.size);
            let mut payload = input.split_to(len);
            unmask(&mut payload, h.mask);
            match h.opcode {
                TEXT | BINARY => {
                    if self.open.is_some() {
                        return Err(FrameError::Protocol(
                            "a new message inside a fragmented one",
                        ));
                    }
                    let text = h.opcode == TEXT;
                    if h.fin {
                        return complete(text, payload.to_vec()).map(Some);
                    }
                    let kept = if text { payload.to_vec() } else { Vec::new() };
                    self.open = Some((text, kept));
                    self.open_len = h.len;
                }
                CONTINUATION => {
                    let Some((text, mut bytes)) = self.open.take() else {
                        return Err(FrameError::Protocol("a continuation without a message"));
                    };
                    if text {
                        bytes.extend_from_slice(&payload);
                    }
                    if h.fin {
                        self.open_len = 0;
                        return complete(text, bytes).map(Some);
                    }
                    self.open = Some((text, bytes));
                    self.open_len += h.len;
                }
                CLOSE => {
                    return match payload.len() {
                        0 => Ok(Some(Frame::Close(None))),
                        1 => Err(FrameError::Protocol(
                            "a close frame with half a status code",
                        )),
                        _ => Ok(Some(Frame::Close(Some(payload.get_u16())))),
                    }
                }
                PING => return Ok(Some(Frame::Ping(payload.to_vec()))),
                PONG => return Ok(Some(Frame::Pong)),
                _ => return Err(FrameError::Protocol("an unknown opcode")),
            }
        }
    }
}

fn complete(text: bool, bytes: Vec<u8>) -> Result<Frame, FrameError> {
    match text {
        true => String::from_utf8(bytes)
            .map(Frame::Text)
            .map_err(|_| FrameError::NotUtf8),
        false => Ok(Frame::Binary),
    }
}

/// The header at the start of `input`, if it is all there.
fn header(input: &BytesMut) -> Result<Option<Header>, FrameError> {
    let [b0, b1, ..] = input[..] else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("an unmasked frame from a client"));
    }
    let (len, at) = match b1 & 0x7F {
        126 => match input.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match input.get(2..10) {
            Some(b) => {
                let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(FrameError::Protocol("a length with its top bit set"));
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let Some(mask) = input.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        len,
        mask: mask.try_into().expect("4 bytes"),
        size: at + 4,
    }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// The header of a final, unmasked frame the server sends: 2 to 10 bytes.
pub(crate) struct OutHeader {
    bytes: [u8; 10],
    len: u8,
}

impl OutHeader {
    /// A frame with this opcode and a payload of `len` bytes.
    pub(crate) fn new(opcode: u8, len: usize) -> OutHeader {
        let mut bytes = [0u8; 10];
        bytes[0] = 0x80 | opcode;
        let used = match len {
            n if n < 126 => {
                bytes[1] = n as u8;
                2
            }
            n if n <= usize::from(u16::MAX) => {
                bytes[1] = 126;
                bytes[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                4
            }
            n => {
                bytes[1] = 127;
                bytes[2..10].copy_from_slice(&(n as u64).to_be_bytes());
                10
            }
        };
        OutHeader { bytes, len: used }
    }
}

impl AsRef<[u8]> for OutHeader {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Append a final, unmasked frame with this opcode and payload.
pub(crate) fn put(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    let header = OutHeader::new(opcode, payload.len());
    out.reserve(header.as_ref().len() + payload.len());
    out.extend_from_slice(header.as_ref());
    out.extend_from_slice(payload);
}

/// Append a close frame with this status code and reason.
pub(crate) fn put_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    put(CLOSE, &payload, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's frame: masked, as RFC 6455 requires.
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = Vec::new();
        put(opcode, payload, &mut out);
        if !fin {
            out[0] &= 0x7F;
        }
        out[1] |= 0x80;
        let at = out.len() - payload.len();
        let mut masked = payload.to_vec();
        unmask(&mut masked, mask);
        out.truncate(at);
        out.extend_from_slice(&mask);
        out.extend_from_slice(&masked);
        out
    }

    fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        let mut input = BytesMut::from(bytes);
        let mut frames = Vec::new();
        loop {
            match d.decode(&mut input) {
                Ok(Some(f)) => frames.push(Ok(f)),
                Ok(None) => return frames,
                Err(e) => {
                    frames.push(Err(e));
                    return frames;
                }
            }
        }
    }

    #[test]
    fn frames_of_every_size_come_whole_in_any_pieces() {
        for len in [0, 5, 125, 126, 300, 65535, 65536, 70000] {
            let text = "é".repeat(len / 2) + &"a".repeat(len % 2);
            let bytes = client(true, TEXT, text.as_bytes());
            let mut d = Decoder::new(1 << 20);
            let mut input = BytesMut::new();
            // Byte by byte for the header, then in large pieces.
            for (i, chunk) in bytes.chunks(if len < 200 { 1 } else { 4093 }).enumerate() {
                assert_eq!(d.decode(&mut input), Ok(None), "piece {i}");
                input.extend_from_slice(chunk);
            }
            assert_eq!(d.decode(&mut input), Ok(Some(Frame::Text(text))));
            assert!(input.is_empty());
        }
    }

    #[test]
    fn fragments_make_one_message_with_control_frames_between() {
        let mut bytes = client(false, TEXT, b"hel");
        bytes.extend(client(true, PING, b"p"));
        bytes.extend(client(false, CONTINUATION, b"lo "));
        bytes.extend(client(true, CONTINUATION, "wörld".as_bytes()));
        bytes.extend(client(true, BINARY, &[1, 2, 3]));
        bytes.extend(client(true, CLOSE, &1000u16.to_be_bytes()));
        let mut d = Decoder::new(100);
        assert_eq!(
            decode_all(&mut d, &bytes),
            vec![
                Ok(Frame::Ping(b"p".to_vec())),
                Ok(Frame::Text("hello wörld".into())),
                Ok(Frame::Binary),
                Ok(Frame::Close(Some(1000))),
            ]
        );
    }

    #[test]
    fn too_big_is_refused_by_the_header() {
        let mut d = Decoder::new(10);
        let bytes = client(true, TEXT, &[b'a'; 11]);
        // The header alone is enough to refuse it.
        let mut input = BytesMut::from(&bytes[..6]);
        assert_eq!(d.decode(&mut input), Err(FrameError::TooBig));
        // Fragments count together.
        let mut d = Decoder::new(10);
        let mut bytes = client(false, TEXT, &[b'a'; 6]);
        bytes.extend(client(true, CONTINUATION, &[b'a'; 6]));
        assert_eq!(decode_all(&mut d, &bytes), vec![Err(FrameError::TooBig)]);
    }

    #[test]
    fn violations_are_refused() {
        let unmasked = {
            let mut out = Vec::new();
            put(TEXT, b"hi", &mut out);
            out
        };
        let mut reserved = client(true, TEXT, b"hi");
        reserved[0] |= 0x40;
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (
                unmasked,
                FrameError::Protocol("an unmasked frame from a client"),
            ),
            (reserved, FrameError::Protocol("reserved bits set")),
            (
                client(true, 0x3, b""),
                FrameError::Protocol("an unknown opcode"),
            ),
            (
                client(false, PING, b""),
                FrameError::Protocol("a fragmented control frame"),
            ),
            (
                client(true, PING, &[0; 126]),
                FrameError::Protocol("a control frame over 125 bytes"),
            ),
            (
                client(true, CONTINUATION, b"x"),
                FrameError::Protocol("a continuation without a message"),
            ),
            (client(true, TEXT, &[0xff, 0xfe]), FrameError::NotUtf8),
            (
                [client(false, TEXT, b"a"), client(true, TEXT, b"b")].concat(),
                FrameError::Protocol("a new message inside a fragmented one"),
            ),
        ];
        for (bytes, error) in cases {
            let mut d = Decoder::new(1000);
            assert_eq!(decode_all(&mut d, &bytes), vec![Err(error)]);
        }
    }

    #[test]
    fn server_frames_have_the_shortest_length() {
        let mut out = Vec::new();
        put(TEXT, b"hi", &mut out);
        assert_eq!(out, [0x81, 2, b'h', b'i']);
        let mut out = Vec::new();
        put(TEXT, &[0; 200], &mut out);
        assert_eq!(out[..4], [0x81, 126, 0, 200]);
        let mut out = Vec::new();
        put(TEXT, &[0; 70000], &mut out);
        assert_eq!(out[..2], [0x81, 127]);
        assert_eq!(out.len(), 10 + 70000);
        let mut out = Vec::new();
        put_close(1008, "login timeout", &mut out);
        assert_eq!(out[..4], [0x88, 15, 0x03, 0xF0]);
    }
}
