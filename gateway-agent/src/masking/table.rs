//! `meta.k8s.io/v1` Tables (`kubectl get` asks for these): `columnDefinitions` then
//! `rows`, each row `{"cells": [...], "object": ...}`.
//!
//! - The embedded `object` is masked like any object, whatever `includeObject` was:
//!   `None` (no object), `Metadata` (`PartialObjectMetadata`: the annotation), `Object`
//!   (the full object).
//! - The row's kind is its object's kind, or the request's kind when the object is
//!   absent or only metadata.
//! - Cells of a Secret row (or of a row whose kind is unknown) are masked except the
//!   columns known to hold no value (`Name`, `Namespace`, `Type`, `Data` — a count —
//!   and `Age`); numbers and booleans are kept. Without column definitions (the later
//!   events of a Table watch carry none; the stream keeps the first ones) only the first
//!   cell, the name, is kept.
//! - Every string cell of every row goes through the detectors.

use serde_json::Value;

use super::{rules, MaskError, MaskStats, Masker, MASK_MARKER};

/// Secret Table columns that never hold a secret value.
const SAFE_SECRET_COLUMNS: &[&str] = &["name", "namespace", "type", "data", "age"];

/// The column names of a Table's `columnDefinitions`, if it has them.
pub fn column_names(table: &Value) -> Option<Vec<String>> {
    let defs = table.get("columnDefinitions")?.as_array()?;
    Some(
        defs.iter()
            .map(|d| {
                d.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            })
            .collect(),
    )
}

/// Masks a whole Table document. `columns` carries the column names across the events
/// of a watch (updated when this table has definitions).
pub fn mask_table(
    masker: &Masker,
    table: &mut Value,
    hint: Option<&str>,
    columns: &mut Option<Vec<String>>,
    stats: &mut MaskStats,
) -> Result<(), MaskError> {
    if let Some(names) = column_names(table) {
        *columns = Some(names);
    }
    match table.get_mut("rows") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(rows)) => {
            for row in rows {
                mask_row(masker, row, columns.as_deref(), hint, stats)?;
            }
            Ok(())
        }
        Some(_) => Err(MaskError::Malformed(
            "a Table's \"rows\" is not an array".into(),
        )),
    }
}

/// Masks one Table row.
pub fn mask_row(
    masker: &Masker,
    row: &mut Value,
    columns: Option<&[String]>,
    hint: Option<&str>,
    stats: &mut MaskStats,
) -> Result<(), MaskError> {
    let Some(fields) = row.as_object_mut() else {
        return Err(MaskError::Malformed("a Table row is not an object".into()));
    };
    let own_kind = match fields.get("object") {
        Some(object) => match object.get("kind").and_then(Value::as_str) {
            Some("PartialObjectMetadata") | None => None,
            Some(kind) => Some(kind.to_string()),
        },
        None => None,
    };
    let kind = own_kind.as_deref().or(hint);
    if let Some(object) = fields.get_mut("object") {
        if !object.is_null() {
            masker.mask_object(object, hint, stats)?;
        }
    } else {
        stats.objects += 1;
        // No object to check: a refusal by kind still applies.
        if let Some(kind) = kind {
            if let Some(rule) = masker.refusal_for_kind(kind) {
                return Err(MaskError::Refused {
                    rule: rule.to_string(),
                    kind: kind.to_string(),
                });
            }
        }
    }
    let secret_like = kind.is_none_or(|k| k == "Secret");
    if let Some(Value::Array(cells)) = fields.get_mut("cells") {
        for (i, cell) in cells.iter_mut().enumerate() {
            if secret_like {
                let safe = match columns {
                    Some(names) => names.get(i).is_some_and(|n| {
                        SAFE_SECRET_COLUMNS
                            .iter()
                            .any(|safe| n.eq_ignore_ascii_case(safe))
                    }),
                    None => i == 0,
                };
                if !safe {
                    stats.secret_fields += rules::mask_strings(cell, MASK_MARKER);
                    continue;
                }
            }
            if masker.detectors().applies_to(kind) {
                stats.detector_hits += masker.detectors().mask_strings(cell);
            }
        }
    }
    Ok(())
}
