//! The line codec against arbitrary input, cut into arbitrary reads: the
//! decoder never panics and never holds more than the limit, every line it
//! yields is within the limit and has no newline, and parsing and
//! formatting what comes out never panics.
#![no_main]

use bytes::BytesMut;
use confab_proto::line::{format_message, parse, LineCommand, LineDecoder, LineFrame};
use confab_proto::Message;
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 16) + 1;
    let mut decoder = LineDecoder::new(MAX);
    let mut buf = BytesMut::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(frame) = decoder.decode(&mut buf) {
            if let LineFrame::Line(line) = frame {
                assert!(line.len() <= MAX);
                assert!(!line.contains('\n'));
                if let Ok(LineCommand::Say(text)) = parse(&line) {
                    let mut out = String::new();
                    let m = Message {
                        room: "r".into(),
                        seq: 1,
                        user: "u".into(),
                        body: text,
                        ts: 0,
                        nonce: None,
                    };
                    format_message(&m, &mut out);
                    assert!(out.ends_with('\n'));
                }
            }
        }
        assert!(buf.len() <= MAX, "held {} bytes", buf.len());
    }
});
