//! The WebSocket codec: one JSON object per text frame.
//!
//! A frame is decoded straight into its types: a `send` in one pass into
//! its own shape, any other request its `id` (checked), then the typed
//! [`Request`]. A frame that does not decode so is decoded again
//! the careful way, so that its error says what is wrong and carries its
//! `id` when that is readable: first into a generic JSON map (where `id`
//! and `type` are read and checked), then into the [`Request`]. The
//! careful way for every frame cost each request a map of owned keys and
//! values (2.7 % of the server's samples in the 100 x 10 fan-out; a `send`
//! takes 770 ns that way, 590 typed).

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::types::{Envelope, ErrorBody, ErrorCode, Event, OkBody, Reply, Request, RequestId};

/// A frame that is not a valid request. Always answered with `bad_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The request id, when it could be read.
    pub id: Option<RequestId>,
    pub message: String,
}

impl DecodeError {
    /// The reply this frame gets.
    pub fn into_reply(self) -> Reply {
        Reply {
            id: self.id,
            result: Err(ErrorBody::new(ErrorCode::BadRequest, self.message)),
        }
    }
}

/// Decode one client frame.
pub fn decode_request(frame: &[u8]) -> Result<Envelope, DecodeError> {
    match decode_typed(frame) {
        Some(envelope) => Ok(envelope),
        None => decode_checked(frame),
    }
}

/// A request decoded straight into its types, or `None` for anything
/// [`decode_checked`] might judge otherwise: it only ever takes a frame
/// that one would take, with the same result (the tests hold it to that,
/// duplicate keys, which the map takes and typed decoding refuses, among
/// the cases).
///
/// Two passes, the id's and the request's: one through `#[serde(flatten)]`
/// is faster (450 ns a `send` against 590) but takes `"type": 5` for the
/// sixth kind of request.
fn decode_typed(frame: &[u8]) -> Option<Envelope> {
    if let Ok(send) = serde_json::from_slice::<SendFrame>(frame) {
        return Some(Envelope {
            id: send.id.map(|WireId(id)| id),
            request: Request::Send {
                room: send.room,
                body: send.body,
                nonce: send.nonce,
            },
        });
    }
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        id: Option<WireId>,
    }
    let head: Head = serde_json::from_slice(frame).ok()?;
    let request = serde_json::from_slice::<Request>(frame).ok()?;
    Some(Envelope {
        id: head.id.map(|WireId(id)| id),
        request,
    })
}

/// A `send`, the request behind every message, in one pass into a shape
/// of its own: a [`Request`], tagged by a field inside it, is decoded by
/// buffering every field (its strings copied) until the tag is found, and
/// then again from the buffer, after a pass for the id (the two were 2-3 %
/// of the server's samples in the 100 x 10 fan-out). The fields are the
/// `Send` variant's, with the same defaults, and the tag must be `send`;
/// anything else fails here and is decoded the general way.
#[derive(Deserialize)]
struct SendFrame {
    #[serde(rename = "type")]
    _kind: SendTag,
    #[serde(default)]
    id: Option<WireId>,
    room: String,
    body: String,
    #[serde(default)]
    nonce: Option<String>,
}

#[derive(Deserialize)]
enum SendTag {
    #[serde(rename = "send")]
    Send,
}

/// A request id as the protocol takes it: an integer that fits an `i64`,
/// or a string of at most [`RequestId::MAX_LEN`] characters.
struct WireId(RequestId);

impl<'de> Deserialize<'de> for WireId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = WireId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a request id")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<WireId, E> {
                Ok(WireId(RequestId::Int(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<WireId, E> {
                i64::try_from(v)
                    .map(|v| WireId(RequestId::Int(v)))
                    .map_err(|_| E::custom("id out of range"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WireId, E> {
                if v.chars().count() > RequestId::MAX_LEN {
                    return Err(E::custom("id too long"));
                }
                Ok(WireId(RequestId::Str(v.to_owned())))
            }
        }
        d.deserialize_any(V)
    }
}

/// Decode one client frame the careful way: every error says what is
/// wrong, with the frame's id when it can be read.
fn decode_checked(frame: &[u8]) -> Result<Envelope, DecodeError> {
    let fail = |id: Option<RequestId>, message: String| DecodeError { id, message };
    let value: Value =
        serde_json::from_slice(frame).map_err(|e| fail(None, format!("invalid JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(fail(None, "a frame must be a JSON object".into()));
    };
    let id = read_id(&map).map_err(|m| fail(None, m.into()))?;
    match map.get("type") {
        None => return Err(fail(id, "missing field `type`".into())),
        Some(Value::String(_)) => {}
        Some(_) => return Err(fail(id, "field `type` must be a string".into())),
    }
    map.remove("id");
    let request = serde_json::from_value::<Request>(Value::Object(map)).map_err(|e| {
        let text = e.to_string();
        let message = match text.strip_prefix("unknown variant ") {
            Some(rest) => {
                let name = rest.split(',').next().unwrap_or(rest);
                format!("unknown request type {name}")
            }
            None => text,
        };
        fail(id.clone(), message)
    })?;
    Ok(Envelope { id, request })
}

/// The frame's `id`, by the one rule both ways of decoding keep
/// ([`WireId`]).
fn read_id(map: &Map<String, Value>) -> Result<Option<RequestId>, &'static str> {
    const BAD: &str = "field `id` must be a string of at most 64 characters or an integer";
    match map.get("id") {
        None | Some(Value::Null) => Ok(None),
        Some(id) => WireId::deserialize(id)
            .map(|WireId(id)| Some(id))
            .map_err(|_| BAD),
    }
}

/// Encode a reply: `ok`, `error`, or `pong` for a ping.
pub fn encode_reply(reply: &Reply) -> Bytes {
    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Wire<'a> {
        Ok {
            #[serde(skip_serializing_if = "Option::is_none")]
            id: &'a Option<RequestId>,
            #[serde(flatten)]
            body: &'a OkBody,
        },
        Pong {
            #[serde(skip_serializing_if = "Option::is_none")]
            id: &'a Option<RequestId>,
        },
        Error {
            #[serde(skip_serializing_if = "Option::is_none")]
            id: &'a Option<RequestId>,
            #[serde(flatten)]
            error: &'a ErrorBody,
        },
    }
    let id = &reply.id;
    let wire = match &reply.result {
        Ok(OkBody::Pong) => Wire::Pong { id },
        Ok(body) => Wire::Ok { id, body },
        Err(error) => Wire::Error { id, error },
    };
    to_bytes(&wire)
}

/// Encode a server event.
pub fn encode_event(event: &Event) -> Bytes {
    to_bytes(event)
}

fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    // Serialising our own types to a Vec cannot fail: no maps with
    // non-string keys, no fallible Serialize impls.
    Bytes::from(serde_json::to_vec(value).expect("protocol types always serialise"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::*;
    use serde_json::json;

    fn decode(v: Value) -> Result<Envelope, DecodeError> {
        decode_request(v.to_string().as_bytes())
    }

    fn encoded(b: Bytes) -> Value {
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn decodes_every_request_kind() {
        let cases = [
            json!({"type":"register","user":"a","password":"p"}),
            json!({"type":"login","user":"a","password":"p"}),
            json!({"type":"guest","user":"a"}),
            json!({"type":"resume","token":"t"}),
            json!({"type":"logout"}),
            json!({"type":"ping"}),
            json!({"type":"join","room":"r"}),
            json!({"type":"leave","room":"r"}),
            json!({"type":"rooms","all":true}),
            json!({"type":"members","room":"r"}),
            json!({"type":"topic","room":"r","topic":"t"}),
            json!({"type":"send","room":"r","body":"b","nonce":"n"}),
            json!({"type":"dm","to":"u","body":"b"}),
            json!({"type":"history","room":"r","before":5,"limit":10}),
            json!({"type":"sync","cursors":{"r":3},"limit":2}),
            json!({"type":"read","room":"r","seq":4}),
            json!({"type":"typing","room":"r"}),
        ];
        for case in cases {
            let kind = case["type"].as_str().unwrap().to_owned();
            let env = decode(case).unwrap();
            assert_eq!(env.request.kind(), kind);
            assert_eq!(env.id, None);
        }
    }

    #[test]
    fn decodes_fields_and_ids() {
        let env = decode(json!({"type":"send","id":"c1","room":"r","body":"hi"})).unwrap();
        assert_eq!(env.id, Some(RequestId::Str("c1".into())));
        assert_eq!(
            env.request,
            Request::Send {
                room: "r".into(),
                body: "hi".into(),
                nonce: None
            }
        );
        let env = decode(json!({"type":"ping","id":7})).unwrap();
        assert_eq!(env.id, Some(RequestId::Int(7)));
        let env = decode(json!({"type":"sync"})).unwrap();
        assert_eq!(
            env.request,
            Request::Sync {
                cursors: Default::default(),
                limit: None
            }
        );
    }

    #[test]
    fn the_typed_decoding_takes_only_what_the_careful_one_would_and_agrees() {
        let long = |n: usize| format!(r#"{{"type":"ping","id":"{}"}}"#, "é".repeat(n));
        let mut frames: Vec<String> = [
            r#"{"type":"send","id":"c1","room":"r","body":"hi","nonce":"n"}"#,
            r#"{"type":"send","room":"r","body":"a\"b\u00e9","nonce":null}"#,
            r#"{"room":"r","body":"late tag","id":4,"type":"s\u0065nd","extra":{"a":[1]}}"#,
            r#"{"type":"send","room":"r","body":"b","id":null}"#,
            r#"{"type":"p\u0069ng","id":-5}"#,
            r#"  {"type":"ping","id":null}  "#,
            r#"{"type":"ping","id":9223372036854775807}"#,
            r#"{"type":"ping","id":9223372036854775808}"#,
            r#"{"type":"ping","id":1e2}"#,
            r#"{"type":"ping","id":[1]}"#,
            r#"{"type":0}"#,
            r#"{"type":5,"room":"r","id":3}"#,
            r#"{"type":"ping","type":"logout"}"#,
            r#"{"id":1,"id":"a","type":"ping"}"#,
            r#"{"type":"send","room":"r","room":"s","body":"b"}"#,
            r#"{"type":"send","type":"send","room":"r","body":"b"}"#,
            r#"{"type":"send","room":"r","body":5}"#,
            r#"{"type":"send","room":"r"}"#,
            r#"{"type":"send","room":"r","body":"b","nonce":7}"#,
            r#"{"type":"send","room":"r","body":"b","id":1,"id":2}"#,
            r#"{"type":"Send","room":"r","body":"b"}"#,
            r#"{"type":"dm","to":"u","body":"b","room":"r"}"#,
            r#"{"type":"read","room":"r","seq":5.0}"#,
            r#"{"type":"read","room":"r","seq":-1}"#,
            r#"{"type":"rooms","limit":4294967296}"#,
            r#"{"type":"role","room":"r","user":"u","role":"moderator","id":2}"#,
            r#"{"type":"ban","hub":"h","user":"u","duration_ms":5}"#,
            r#"{"type":"sync","cursors":{"r":3,"s":1},"limit":2}"#,
            r#"{"type":"fly","id":"x"}"#,
            r#"{"type":"ping"} x"#,
            r#"{"id":1}"#,
            r#"{}"#,
            r#"[]"#,
            r#""x""#,
        ]
        .map(str::to_owned)
        .into();
        frames.extend([long(64), long(65)]);
        for frame in &frames {
            let checked = decode_checked(frame.as_bytes());
            if let Some(typed) = decode_typed(frame.as_bytes()) {
                assert_eq!(Ok(&typed), checked.as_ref(), "{frame}");
            }
            assert_eq!(decode_request(frame.as_bytes()), checked, "{frame}");
        }
        // And the common requests do take the typed way.
        for frame in &frames[..7] {
            assert!(decode_typed(frame.as_bytes()).is_some(), "{frame}");
        }
        assert!(decode_typed(long(64).as_bytes()).is_some());
        for refused in [r#"{"type":0}"#, r#"{"id":1,"id":"a","type":"ping"}"#] {
            assert!(decode_typed(refused.as_bytes()).is_none(), "{refused}");
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let env = decode(json!({"type":"ping","extra":[1,2]})).unwrap();
        assert_eq!(env.request, Request::Ping {});
    }

    #[test]
    fn bad_frames_are_errors_that_keep_the_id_when_readable() {
        let err = decode_request(b"not json").unwrap_err();
        assert_eq!(err.id, None);
        assert!(err.message.starts_with("invalid JSON"), "{}", err.message);

        let err = decode(json!([1, 2])).unwrap_err();
        assert_eq!(err.message, "a frame must be a JSON object");

        let err = decode(json!({"id":1})).unwrap_err();
        assert_eq!(err.id, Some(RequestId::Int(1)));
        assert_eq!(err.message, "missing field `type`");

        let err = decode(json!({"id":"x","type":"fly"})).unwrap_err();
        assert_eq!(err.id, Some(RequestId::Str("x".into())));
        assert_eq!(err.message, "unknown request type `fly`");

        let err = decode(json!({"id":2,"type":"read","room":"r","seq":"5"})).unwrap_err();
        assert_eq!(err.id, Some(RequestId::Int(2)));
        assert!(err.message.contains("invalid type"), "{}", err.message);

        let err = decode(json!({"id":3,"type":"join"})).unwrap_err();
        assert_eq!(err.message, "missing field `room`");

        let err = decode(json!({"id":"x".repeat(65),"type":"ping"})).unwrap_err();
        assert_eq!(err.id, None);
        assert!(err.message.contains("field `id`"));

        let err = decode(json!({"id":1.5,"type":"ping"})).unwrap_err();
        assert!(err.message.contains("field `id`"));

        let err = decode(json!({"type":5})).unwrap_err();
        assert_eq!(err.message, "field `type` must be a string");
    }

    #[test]
    fn encodes_replies() {
        let pong = Reply {
            id: Some(RequestId::Int(1)),
            result: Ok(OkBody::Pong),
        };
        assert_eq!(encoded(encode_reply(&pong)), json!({"type":"pong","id":1}));

        let done = Reply {
            id: None,
            result: Ok(OkBody::Done {}),
        };
        assert_eq!(encoded(encode_reply(&done)), json!({"type":"ok"}));

        let sent = Reply {
            id: Some(RequestId::Str("a".into())),
            result: Ok(OkBody::Sent {
                room: "general".into(),
                seq: 42,
                ts: 1_763_779_200_123,
            }),
        };
        assert_eq!(
            encoded(encode_reply(&sent)),
            json!({"type":"ok","id":"a","room":"general","seq":42,"ts":1_763_779_200_123_i64})
        );

        let auth = Reply {
            id: None,
            result: Ok(OkBody::Auth {
                user: "Al".into(),
                token: None,
            }),
        };
        assert_eq!(
            encoded(encode_reply(&auth)),
            json!({"type":"ok","user":"Al"})
        );

        let mut err = ErrorBody::new(ErrorCode::RateLimited, "slow down");
        err.retry_after_ms = Some(250);
        let reply = Reply {
            id: Some(RequestId::Int(9)),
            result: Err(err),
        };
        assert_eq!(
            encoded(encode_reply(&reply)),
            json!({"type":"error","id":9,"code":"rate_limited","message":"slow down","retry_after_ms":250})
        );
    }

    #[test]
    fn encodes_events() {
        let msg = Event::Message(Message {
            room: "general".into(),
            seq: 42,
            user: "alice".into(),
            body: "hi".into(),
            ts: 1,
            nonce: Some("c-17".into()),
            ..Message::default()
        });
        assert_eq!(
            encoded(encode_event(&msg)),
            json!({"type":"message","room":"general","seq":42,"user":"alice","body":"hi","ts":1,"nonce":"c-17"})
        );
        // A deletion entry has no body; a deleted message says so.
        let delete = Event::Message(Message {
            room: "general".into(),
            seq: 44,
            user: "alice".into(),
            ts: 3,
            delete: Some(42),
            ..Message::default()
        });
        assert_eq!(
            encoded(encode_event(&delete)),
            json!({"type":"message","room":"general","seq":44,"user":"alice","ts":3,"delete":42})
        );
        let gone = Message {
            seq: 42,
            deleted: true,
            edited_ts: Some(2),
            ..Message::default()
        };
        let v: serde_json::Value = serde_json::to_value(&gone).unwrap();
        assert_eq!(v["deleted"], json!(true));
        assert_eq!(v["edited_ts"], json!(2));
        assert!(v.get("body").is_none() && v.get("edit").is_none(), "{v}");
        let hello = Event::Hello {
            server: crate::SERVER_NAME.into(),
            version: "0.1.0".into(),
            node: "n1".into(),
            heartbeat_ms: 30000,
            limits: Limits {
                max_body_bytes: 4096,
                max_frame_bytes: 65536,
            },
        };
        assert_eq!(
            encoded(encode_event(&hello)),
            json!({"type":"hello","server":"confab","version":"0.1.0","node":"n1","heartbeat_ms":30000,"limits":{"max_body_bytes":4096,"max_frame_bytes":65536}})
        );
        let presence = Event::Presence {
            user: "bob".into(),
            online: false,
        };
        assert_eq!(
            encoded(encode_event(&presence)),
            json!({"type":"presence","user":"bob","online":false})
        );
    }
}
