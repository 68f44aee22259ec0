//! The WebSocket codec against arbitrary frames: decoding never panics, a
//! decoded id obeys its limits, and whatever the server answers (the
//! error for a bad frame) is valid JSON.
#![no_main]

use confab_proto::json::{decode_request, encode_reply};
use confab_proto::RequestId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    match decode_request(frame) {
        Ok(envelope) => {
            if let Some(RequestId::Str(s)) = &envelope.id {
                assert!(s.chars().count() <= RequestId::MAX_LEN);
            }
            let _ = envelope.request.kind();
        }
        Err(error) => {
            if let Some(RequestId::Str(s)) = &error.id {
                assert!(s.chars().count() <= RequestId::MAX_LEN);
            }
            let reply = encode_reply(&error.into_reply());
            let value: serde_json::Value =
                serde_json::from_slice(&reply).expect("replies are JSON");
            assert_eq!(value["type"], "error");
            assert_eq!(value["code"], "bad_request");
        }
    }
});
