//! A strict JSON parse: like `serde_json::from_slice::<Value>`, but an object with the
//! same key twice is an error.
//!
//! Why: parsers disagree on duplicate keys (Go and serde_json keep the last, others the
//! first). Masking what one parser sees while a client reads what another sees would
//! let a value through — `{"kind":"ConfigMapList","kind":"SecretList",...}`, or an item
//! passed byte for byte whose first `data` holds the secret and whose last is `null`.
//! The API server never writes duplicate keys, so refusing them costs nothing.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::MaskError;

/// Parses one JSON value, refusing duplicate keys.
pub fn from_slice(bytes: &[u8]) -> Result<Value, MaskError> {
    serde_json::from_slice::<Strict>(bytes)
        .map(|s| s.0)
        .map_err(MaskError::malformed)
}

/// As [`from_slice`], for a string.
pub fn from_str(text: &str) -> Result<Value, MaskError> {
    from_slice(text.as_bytes())
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            if fields.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            fields.insert(key, value);
        }
        Ok(Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_values_as_serde_json() {
        let text =
            r#"{"a":[1,-2,3.5,1e300,"x\u00e9",true,false,null,{}],"b":{"c":18446744073709551615}}"#;
        assert_eq!(
            from_str(text).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
        assert_eq!(from_str("\"s\"").unwrap(), json!("s"));
    }

    #[test]
    fn duplicate_keys_refused_at_any_depth() {
        for text in [
            r#"{"kind":"A","kind":"B"}"#,
            r#"{"x":[{"data":{"a":"1"},"data":null}]}"#,
        ] {
            assert!(
                matches!(from_str(text), Err(MaskError::Malformed(m)) if m.contains("duplicate key")),
                "{text}"
            );
        }
        assert!(from_str("{} x").is_err());
        assert!(from_str("{").is_err());
    }
}
