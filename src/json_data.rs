//! A message in JSON, as the backend API and handlers write it: a string is a text message,
//! `{"b64": "..."}` a binary one. One reader and one writer, so both speak exactly the same
//! form.

use crate::Message;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde_json::Value;

/// Why a JSON value is not a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadData {
    #[error("b64 is not valid base64")]
    Base64,
    #[error("an object must be {{\"b64\": \"...\"}}")]
    Object,
    #[error("got another JSON type")]
    Type,
}

/// `"text"` is a text message, `{"b64": "..."}` a binary one.
pub fn message_of(data: Value) -> Result<Message, BadData> {
    match data {
        Value::String(s) => Ok(Message::from(s)),
        Value::Object(mut o) if o.len() == 1 => match o.remove("b64") {
            Some(Value::String(b)) => STANDARD
                .decode(b.as_bytes())
                .map(|v| Message::Binary(Bytes::from(v)))
                .map_err(|_| BadData::Base64),
            _ => Err(BadData::Object),
        },
        _ => Err(BadData::Type),
    }
}

/// `msg` in that form.
#[cfg(test)]
pub fn data_of(msg: &Message) -> Value {
    serde_json::to_value(Data(msg)).expect("a message serializes")
}

/// A message written in that form straight from its bytes, with no `Value` between.
#[derive(Debug)]
pub struct Data<'a>(pub &'a Message);

impl serde::Serialize for Data<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.0 {
            Message::Text(t) => s.serialize_str(t),
            Message::Binary(b) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("b64", &STANDARD.encode(b))?;
                m.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    #[test]
    fn text_and_binary_round_trip() {
        for m in [Message::from("héllo"), Message::from(vec![0u8, 1, 255])] {
            assert_eq!(message_of(data_of(&m)), Ok(m));
        }
        assert_eq!(message_of(json!({"b64": "!!"})), Err(BadData::Base64));
        assert_eq!(message_of(json!({"b64": 1})), Err(BadData::Object));
        assert_eq!(message_of(json!(5)), Err(BadData::Type));
    }
}
