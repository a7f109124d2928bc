//! Value detectors: secrets recognised by their look wherever they sit in a string
//! (an annotation, a ConfigMap value, a CRD's spec, a Table cell).
//!
//! Every enabled pattern is joined into one regular expression, so a string is scanned
//! once and the regex engine's literal prefilter (`-----BEGIN`, `eyJ`, `AKIA`, ...)
//! rejects the common case quickly. Only the matched span is replaced by the marker:
//! the rest of the string (a kubeconfig, a script) stays readable.
//!
//! - private keys: `-----BEGIN ... PRIVATE KEY-----` up to its END line (or the end of
//!   the string when the END line is missing);
//! - tokens: JWTs (three base64url segments, the first starting `eyJ`) and the token
//!   after `Bearer `;
//! - cloud keys: AWS access key ids (`AKIA`/`ASIA`/`ABIA`/`ACCA` + 16), AWS secret keys
//!   after `aws_secret_access_key`, Google API keys (`AIza` + 35), GitHub tokens
//!   (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`), Slack tokens (`xox?-`).

use regex::Regex;
use serde_json::Value;

use super::{ConfigError, DetectorsConfig, LAST_APPLIED_ANNOTATION, MASK_MARKER};

const PRIVATE_KEY: &str = r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?s:.*?)(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\z)";
const JWT: &str = r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*";
const BEARER: &str = r"(?i:bearer)\s+[A-Za-z0-9._~+/-]{16,}=*";
const CLOUD_KEYS: &[&str] = &[
    r"(?-u:\b)(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}(?-u:\b)",
    r#"(?i:aws_secret_access_key)["']?\s*[:=]\s*["']?[A-Za-z0-9/+=]{40}"#,
    r"AIza[0-9A-Za-z_-]{35}",
    r"(?-u:\b)gh[pousr]_[A-Za-z0-9]{36,}",
    r"github_pat_[A-Za-z0-9_]{22,}",
    r"(?-u:\b)xox[abposr]-[A-Za-z0-9-]{10,}",
];

/// The compiled detectors.
#[derive(Debug)]
pub struct Detectors {
    regex: Option<Regex>,
    /// The same patterns over bytes, for terminal streams (exec, attach), which need
    /// not be UTF-8.
    bytes_regex: Option<regex::bytes::Regex>,
    kinds: Vec<String>,
}

impl Detectors {
    pub fn new(config: &DetectorsConfig) -> Result<Detectors, ConfigError> {
        let mut parts: Vec<String> = Vec::new();
        if config.private_keys {
            parts.push(PRIVATE_KEY.into());
        }
        if config.tokens {
            parts.push(JWT.into());
            parts.push(BEARER.into());
        }
        if config.cloud_keys {
            parts.extend(CLOUD_KEYS.iter().map(|p| p.to_string()));
        }
        for pattern in &config.patterns {
            // Each extra pattern must compile on its own, so the error names it.
            Regex::new(pattern).map_err(|source| ConfigError::DetectorPattern {
                pattern: pattern.clone(),
                source: Box::new(source),
            })?;
            parts.push(pattern.clone());
        }
        let (regex, bytes_regex) = if parts.is_empty() {
            (None, None)
        } else {
            let joined = parts
                .iter()
                .map(|p| format!("(?:{p})"))
                .collect::<Vec<_>>()
                .join("|");
            let failed = |source: regex::Error| ConfigError::DetectorPattern {
                pattern: joined.clone(),
                source: Box::new(source),
            };
            (
                Some(
                    regex::RegexBuilder::new(&joined)
                        .size_limit(64 * 1024 * 1024)
                        .build()
                        .map_err(failed)?,
                ),
                Some(
                    regex::bytes::RegexBuilder::new(&joined)
                        .size_limit(64 * 1024 * 1024)
                        .build()
                        .map_err(failed)?,
                ),
            )
        };
        Ok(Detectors {
            regex,
            bytes_regex,
            kinds: config.kinds.clone(),
        })
    }

    /// Whether the detectors run on objects of this kind.
    pub fn applies_to(&self, kind: Option<&str>) -> bool {
        self.regex.is_some()
            && (self.kinds.is_empty() || kind.is_some_and(|k| self.kinds.iter().any(|r| r == k)))
    }

    /// Masks every detected span in one string; returns how many.
    pub fn mask_str(&self, text: &mut String) -> u64 {
        let Some(regex) = &self.regex else {
            return 0;
        };
        if !regex.is_match(text) {
            return 0;
        }
        let mut count = 0;
        let replaced = regex.replace_all(text, |_: &regex::Captures<'_>| {
            count += 1;
            MASK_MARKER
        });
        *text = replaced.into_owned();
        count
    }

    /// Masks detected spans in `chunk`, a piece of a byte stream (a terminal's output),
    /// looking at `before` too: what the same stream carried just before, already
    /// recorded. A secret split between two pieces is then still found, and its part
    /// in this piece masked. Returns the piece to record and how many spans were
    /// masked, or None when nothing was found.
    pub fn mask_chunk(&self, before: &[u8], chunk: &[u8]) -> Option<(Vec<u8>, u64)> {
        let regex = self.bytes_regex.as_ref()?;
        let mut window = Vec::with_capacity(before.len() + chunk.len());
        window.extend_from_slice(before);
        window.extend_from_slice(chunk);
        let start_of_chunk = before.len();
        let mut out = Vec::with_capacity(chunk.len());
        let mut pos = start_of_chunk;
        let mut count = 0;
        for found in regex.find_iter(&window) {
            if found.end() <= pos {
                // All of it in `before`: masked (or not) when that was recorded.
                continue;
            }
            let from = found.start().max(pos);
            out.extend_from_slice(&window[pos..from]);
            out.extend_from_slice(MASK_MARKER.as_bytes());
            pos = found.end();
            count += 1;
        }
        if count == 0 {
            return None;
        }
        out.extend_from_slice(&window[pos..]);
        Some((out, count))
    }

    /// Masks detected spans in every string inside `value`.
    pub fn mask_strings(&self, value: &mut Value) -> u64 {
        if self.regex.is_none() {
            return 0;
        }
        match value {
            Value::String(s) => self.mask_str(s),
            Value::Array(items) => items.iter_mut().map(|v| self.mask_strings(v)).sum(),
            Value::Object(fields) => fields.values_mut().map(|v| self.mask_strings(v)).sum(),
            _ => 0,
        }
    }

    /// As [`Detectors::mask_strings`], but skipping the last-applied annotation of
    /// this object, which was masked as an object already (or replaced).
    pub fn mask_strings_except_last_applied(&self, obj: &mut Value) -> u64 {
        let Value::Object(fields) = obj else {
            return self.mask_strings(obj);
        };
        let mut count = 0;
        for (key, value) in fields.iter_mut() {
            if key == "metadata" {
                if let Value::Object(meta) = value {
                    for (mkey, mvalue) in meta.iter_mut() {
                        if mkey == "annotations" {
                            if let Value::Object(annotations) = mvalue {
                                for (akey, avalue) in annotations.iter_mut() {
                                    if akey != LAST_APPLIED_ANNOTATION {
                                        count += self.mask_strings(avalue);
                                    }
                                }
                                continue;
                            }
                        }
                        count += self.mask_strings(mvalue);
                    }
                    continue;
                }
            }
            count += self.mask_strings(value);
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all() -> Detectors {
        Detectors::new(&DetectorsConfig::default()).unwrap()
    }

    fn masked(text: &str) -> (String, u64) {
        let mut s = text.to_string();
        let n = all().mask_str(&mut s);
        (s, n)
    }

    /// A terminal's output in pieces, as reads bring it: a key split between two
    /// pieces is masked in both, a token in one piece is masked, binary bytes around
    /// them pass through, and a piece with nothing in it is left alone.
    #[test]
    fn secrets_split_between_stream_pieces() {
        let d = all();
        let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END RSA PRIVATE KEY-----\n";
        let stream = format!("$ cat key.pem\r\n{key}$ ");
        let cut = stream.find("BAQEFAASC").unwrap();
        let (one, two) = stream.as_bytes().split_at(cut);
        let (first, n1) = d.mask_chunk(b"", one).expect("the key's start");
        let (second, n2) = d.mask_chunk(one, two).expect("the key's rest");
        assert_eq!((n1, n2), (1, 1));
        let recorded = String::from_utf8([first, second].concat()).unwrap();
        assert_eq!(
            recorded,
            format!("$ cat key.pem\r\n{MASK_MARKER}{MASK_MARKER}\n$ ")
        );
        assert!(!recorded.contains("BAQEFAASC") && !recorded.contains("AoIBAQC7"));

        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0ifQ.c2lnbmF0dXJl";
        let mut piece = vec![0xff, 0x00, b'\n'];
        piece.extend_from_slice(jwt.as_bytes());
        piece.extend_from_slice(&[0xfe, b'\n']);
        let (masked, n) = d.mask_chunk(two, &piece).expect("the token");
        assert_eq!(n, 1);
        let mut want = vec![0xff, 0x00, b'\n'];
        want.extend_from_slice(MASK_MARKER.as_bytes());
        want.extend_from_slice(&[0xfe, b'\n']);
        assert_eq!(masked, want);

        assert_eq!(d.mask_chunk(&piece, b"total 0\r\n"), None);
        let off = Detectors::new(&DetectorsConfig {
            private_keys: false,
            tokens: false,
            cloud_keys: false,
            ..DetectorsConfig::default()
        })
        .unwrap();
        assert_eq!(off.mask_chunk(b"", &piece), None);
    }

    #[test]
    fn private_keys() {
        for header in [
            "RSA PRIVATE KEY",
            "PRIVATE KEY",
            "EC PRIVATE KEY",
            "OPENSSH PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY",
            "PGP PRIVATE KEY BLOCK",
        ] {
            let text = format!("before\n-----BEGIN {header}-----\nMIIEvQIBADANBg\nkqhkiG9w0B==\n-----END {header}-----\nafter");
            let (out, n) = masked(&text);
            assert_eq!(n, 1, "{header}");
            assert_eq!(out, format!("before\n{MASK_MARKER}\nafter"), "{header}");
        }
        // Cut off before its END line: masked to the end.
        let (out, n) = masked("x -----BEGIN RSA PRIVATE KEY-----\nMIIE");
        assert_eq!((out.as_str(), n), ("x *** masked by tollgate ***", 1));
        // Two keys, two hits; a certificate is not a secret.
        let two = "-----BEGIN PRIVATE KEY-----\na\n-----END PRIVATE KEY-----\n-----BEGIN CERTIFICATE-----\nc\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nb\n-----END PRIVATE KEY-----";
        let (out, n) = masked(two);
        assert_eq!(n, 2);
        assert!(out.contains("BEGIN CERTIFICATE"));
        assert!(!out.contains("\na\n") && !out.ends_with("b\n-----END PRIVATE KEY-----"));
    }

    #[test]
    fn tokens() {
        let jwt = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJpc3MiOiJrdWJlcm5ldGVzIn0.c2lnbmF0dXJlX2J5dGVz-_x";
        let (out, n) = masked(&format!("token: {jwt}\n"));
        assert_eq!(
            (out.as_str(), n),
            ("token: *** masked by tollgate ***\n", 1)
        );
        let (out, n) = masked("Authorization: Bearer abcdefghijklmnop0123456789");
        assert_eq!(n, 1);
        assert_eq!(out, format!("Authorization: {MASK_MARKER}"));
        // Not tokens.
        for plain in [
            "eyJ",
            "bearer short",
            "the bearer of news",
            "eyJhbGci.only-two",
        ] {
            assert_eq!(masked(plain).1, 0, "{plain}");
        }
    }

    #[test]
    fn cloud_keys() {
        for key in [
            "AKIAIOSFODNN7EXAMPLE",
            "ASIAY34FZKBOKMUTVV7A",
            "AIzaSyA-1234567890abcdefghijklmnopqrstu",
            "ghp_0123456789abcdefghijklmnopqrstuvwxyz",
            "github_pat_11ABCDEFG0123456789_abcdefghijkl",
            "xoxb-1234567890-abcdefghij",
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ] {
            let (out, n) = masked(&format!("x {key} y"));
            assert_eq!(n, 1, "{key}");
            assert_eq!(out, format!("x {MASK_MARKER} y"), "{key}");
        }
        // Inside a longer word: not a key id.
        assert_eq!(masked("XAKIAIOSFODNN7EXAMPLEX").1, 0);
    }

    #[test]
    fn disabled_and_extra_patterns() {
        let none = Detectors::new(&DetectorsConfig {
            private_keys: false,
            tokens: false,
            cloud_keys: false,
            patterns: vec![],
            kinds: vec![],
        })
        .unwrap();
        assert!(!none.applies_to(Some("ConfigMap")));
        let mut s = "AKIAIOSFODNN7EXAMPLE".to_string();
        assert_eq!(none.mask_str(&mut s), 0);

        let extra = Detectors::new(&DetectorsConfig {
            private_keys: false,
            tokens: false,
            cloud_keys: false,
            patterns: vec!["corp_[0-9a-f]{8}".into()],
            kinds: vec!["ConfigMap".into()],
        })
        .unwrap();
        assert!(extra.applies_to(Some("ConfigMap")));
        assert!(!extra.applies_to(Some("Pod")));
        assert!(!extra.applies_to(None));
        let mut s = "k=corp_deadbeef".to_string();
        assert_eq!(extra.mask_str(&mut s), 1);
        assert_eq!(s, format!("k={MASK_MARKER}"));

        assert!(matches!(
            Detectors::new(&DetectorsConfig {
                patterns: vec!["(".into()],
                ..DetectorsConfig::default()
            }),
            Err(ConfigError::DetectorPattern { .. })
        ));
    }

    #[test]
    fn walks_every_string_but_not_keys() {
        let mut v = json!({"AKIAIOSFODNN7EXAMPLE": ["AKIAIOSFODNN7EXAMPLE", 3, {"x": "AKIAIOSFODNN7EXAMPLE"}]});
        assert_eq!(all().mask_strings(&mut v), 2);
        assert_eq!(
            v,
            json!({"AKIAIOSFODNN7EXAMPLE": [MASK_MARKER, 3, {"x": MASK_MARKER}]})
        );
    }
}
