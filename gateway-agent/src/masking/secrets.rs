//! Secret values and the last-applied-configuration annotation.
//!
//! A Secret keeps every key; each `data` value becomes the base64 of the marker (so a
//! client that decodes it still gets valid base64), each `stringData` value the plain
//! marker. `null` values stay `null` (there is nothing to hide and the shape is kept).

use serde_json::Value;

use super::{LAST_APPLIED_ANNOTATION, MASK_MARKER, MASK_MARKER_BASE64};

/// The name refusals of Secrets are reported under (`secrets: refuse`).
pub const SECRETS_RULE: &str = "secrets";

/// Masks `data` and `stringData` of a Secret; returns how many values were masked.
/// Anything else in those fields (a non-object `data`) is replaced whole.
pub fn mask_secret_data(obj: &mut Value) -> u64 {
    let Some(fields) = obj.as_object_mut() else {
        return 0;
    };
    let mut count = 0;
    for (field, marker) in [("data", MASK_MARKER_BASE64), ("stringData", MASK_MARKER)] {
        match fields.get_mut(field) {
            None | Some(Value::Null) => {}
            Some(Value::Object(entries)) => {
                for value in entries.values_mut() {
                    if !value.is_null() {
                        *value = Value::String(marker.to_string());
                        count += 1;
                    }
                }
            }
            Some(other) => {
                *other = Value::String(marker.to_string());
                count += 1;
            }
        }
    }
    count
}

/// The last-applied-configuration annotation of an object, when it is a string.
pub fn last_applied_mut(obj: &mut Value) -> Option<&mut String> {
    match obj
        .get_mut("metadata")?
        .get_mut("annotations")?
        .get_mut(LAST_APPLIED_ANNOTATION)?
    {
        Value::String(text) => Some(text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn data_and_string_data_keep_their_keys() {
        let mut secret = json!({
            "kind": "Secret",
            "data": {"a": "c2VjcmV0", "b": "", "c": null},
            "stringData": {"d": "plain"},
            "type": "Opaque",
        });
        assert_eq!(mask_secret_data(&mut secret), 3);
        assert_eq!(
            secret,
            json!({
                "kind": "Secret",
                "data": {"a": MASK_MARKER_BASE64, "b": MASK_MARKER_BASE64, "c": null},
                "stringData": {"d": MASK_MARKER},
                "type": "Opaque",
            })
        );
    }

    #[test]
    fn odd_shaped_data_is_replaced_whole() {
        let mut secret = json!({"data": ["c2VjcmV0"], "stringData": "x"});
        assert_eq!(mask_secret_data(&mut secret), 2);
        assert_eq!(
            secret,
            json!({"data": MASK_MARKER_BASE64, "stringData": MASK_MARKER})
        );
    }

    #[test]
    fn no_data_nothing_masked() {
        let mut secret = json!({"kind": "Secret", "metadata": {"name": "x"}});
        assert_eq!(mask_secret_data(&mut secret), 0);
    }

    #[test]
    fn last_applied_found_only_as_string() {
        let mut obj = json!({"metadata": {"annotations": {LAST_APPLIED_ANNOTATION: "{}"}}});
        assert_eq!(last_applied_mut(&mut obj).map(|s| s.as_str()), Some("{}"));
        let mut obj = json!({"metadata": {"annotations": {LAST_APPLIED_ANNOTATION: 3}}});
        assert!(last_applied_mut(&mut obj).is_none());
        let mut obj = json!({"metadata": {}});
        assert!(last_applied_mut(&mut obj).is_none());
    }

    /// The base64 marker decodes to the plain marker (checked without a base64 crate).
    #[test]
    fn base64_marker_decodes_to_marker() {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits = 0u32;
        let mut nbits = 0;
        let mut out = Vec::new();
        for c in MASK_MARKER_BASE64.bytes().filter(|&c| c != b'=') {
            let v = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
            bits = (bits << 6) | v;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                out.push((bits >> nbits) as u8);
                bits &= (1 << nbits) - 1;
            }
        }
        assert_eq!(out, MASK_MARKER.as_bytes());
        assert_eq!(MASK_MARKER_BASE64.len() % 4, 0);
    }
}
