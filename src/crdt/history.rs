//! A document's history: its changes (who, when, what), the document at any change, and a
//! field-level diff between two points. Pure reads of an `Automerge` document.

use std::collections::HashMap;

use automerge::{Automerge, ChangeHash};
use serde::Serialize;

use super::schema::Schema;
use super::{View, AUTHORS_KEY, CRITICAL_KEY, DELETED_KEY, SCHEMA_KEY, TYPE_KEY};

/// One change of a document, for display.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChangeInfo {
    /// Full hash, hex.
    pub hash: String,
    /// Actor, hex.
    pub actor: String,
    /// The actor's sequence number.
    pub seq: u64,
    /// The author's name when the document records it (`None` for migrations and unknown actors).
    pub author: Option<String>,
    /// Seconds since the epoch, as the writer's clock said (display only).
    pub time: i64,
    pub message: Option<String>,
    /// Parent change hashes, hex.
    pub deps: Vec<String>,
    /// Number of operations.
    pub ops: usize,
    /// The fields it touched (today's names; reserved keys as stored, e.g. `_deleted`).
    pub fields: Vec<String>,
}

/// Every change of `doc`, oldest first (a causal order).
pub fn changes(doc: &Automerge, schema: Option<&Schema>) -> Vec<ChangeInfo> {
    let view = View::new(doc, schema);
    let fields = view.fields();
    let names: HashMap<String, String> = fields
        .iter()
        .map(|f| (f.key.clone(), f.name.clone()))
        .collect();
    // Fields are listed in the schema's order (then reserved keys like `_deleted`).
    let rank = |name: &String| {
        fields
            .iter()
            .position(|f| &f.name == name)
            .unwrap_or(usize::MAX)
    };
    let all = doc.get_changes(&[]);
    // Objects created at the root belong to the field whose key they were created under.
    let mut owner: HashMap<(u64, automerge::ActorId), String> = HashMap::new();
    let mut out = Vec::with_capacity(all.len());
    for c in &all {
        let expanded = c.decode();
        let mut touched: Vec<String> = Vec::new();
        for (i, op) in expanded.operations.iter().enumerate() {
            let opid = (
                expanded.start_op.get() + i as u64,
                expanded.actor_id.clone(),
            );
            let key = match (&op.obj, &op.key) {
                (automerge::legacy::ObjectId::Root, automerge::legacy::Key::Map(k)) => {
                    let k = k.to_string();
                    if matches!(op.action, automerge::legacy::OpType::Make(_)) {
                        owner.insert(opid, k.clone());
                    }
                    Some(k)
                }
                (automerge::legacy::ObjectId::Id(id), _) => {
                    let k = owner.get(&(id.0, id.1.clone())).cloned();
                    if let (Some(k), automerge::legacy::OpType::Make(_)) = (&k, &op.action) {
                        owner.insert(opid, k.clone());
                    }
                    k
                }
                _ => None,
            };
            if let Some(k) = key {
                if matches!(
                    k.as_str(),
                    AUTHORS_KEY | CRITICAL_KEY | TYPE_KEY | SCHEMA_KEY
                ) {
                    continue;
                }
                let name = if k == DELETED_KEY {
                    k
                } else {
                    names.get(&k).cloned().unwrap_or(k)
                };
                if !touched.contains(&name) {
                    touched.push(name);
                }
            }
        }
        touched.sort_by_key(rank);
        out.push(ChangeInfo {
            hash: c.hash().to_string(),
            actor: c.actor_id().to_hex_string(),
            seq: c.seq(),
            author: view.author_of(c.actor_id()),
            time: c.timestamp(),
            message: c.message().map(|m| m.to_string()),
            deps: c.deps().iter().map(|d| d.to_string()).collect(),
            ops: c.len(),
            fields: touched,
        });
    }
    out
}

/// Why a hash prefix names no single change.
#[derive(Debug, PartialEq)]
pub enum FindChange {
    TooShort,
    NotFound,
    Ambiguous(Vec<String>),
}

/// The change whose hex hash starts with `prefix` (at least 4 characters).
pub fn find_change(doc: &Automerge, prefix: &str) -> Result<ChangeHash, FindChange> {
    let prefix = prefix.to_ascii_lowercase();
    if prefix.len() < 4 {
        return Err(FindChange::TooShort);
    }
    let matches: Vec<ChangeHash> = doc
        .get_changes_meta(&[])
        .into_iter()
        .map(|m| m.hash)
        .filter(|h| h.to_string().starts_with(&prefix))
        .collect();
    match matches.len() {
        0 => Err(FindChange::NotFound),
        1 => Ok(matches[0]),
        _ => Err(FindChange::Ambiguous(
            matches.iter().map(|h| h.to_string()).collect(),
        )),
    }
}

/// A span of text inserted or deleted, at a character index of the *before* text.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TextEdit {
    pub index: usize,
    pub deleted: String,
    pub inserted: String,
}

/// How one field differs between two points.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FieldDiff {
    pub field: String,
    pub before: serde_json::Value,
    pub after: serde_json::Value,
    /// For text fields: the edits that turn `before` into `after`, in order (each index is
    /// into the text as the previous edits left it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<Vec<TextEdit>>,
}

/// Field-level differences between the document at `from` and at `to`.
pub fn diff(
    doc: &Automerge,
    schema: Option<&Schema>,
    from: &[ChangeHash],
    to: &[ChangeHash],
) -> Vec<FieldDiff> {
    let a = View::at(doc, schema, from.to_vec());
    let b = View::at(doc, schema, to.to_vec());
    let mut fields = b.fields();
    for f in a.fields() {
        if !fields.iter().any(|g| g.key == f.key) {
            fields.push(f);
        }
    }
    let mut out = Vec::new();
    for f in fields {
        let before = a.field_value(&f);
        let after = b.field_value(&f);
        if before == after {
            continue;
        }
        let text = match (&before, &after) {
            (serde_json::Value::String(x), serde_json::Value::String(y))
                if f.strategy == super::schema::Strategy::Text =>
            {
                Some(text_edits(doc, &f.key, from, to, x).unwrap_or_else(|| vec![text_edit(x, y)]))
            }
            _ => None,
        };
        out.push(FieldDiff {
            field: f.name,
            before,
            after,
            text,
        });
    }
    let (da, db) = (a.is_deleted(), b.is_deleted());
    if da != db {
        out.push(FieldDiff {
            field: DELETED_KEY.into(),
            before: da.into(),
            after: db.into(),
            text: None,
        });
    }
    out
}

/// The text edits Automerge records between two points, when the field is the same text object
/// at both (else `None`: the caller falls back to a prefix/suffix comparison).
fn text_edits(
    doc: &Automerge,
    key: &str,
    from: &[ChangeHash],
    to: &[ChangeHash],
    before: &str,
) -> Option<Vec<TextEdit>> {
    use automerge::{PatchAction, ReadDoc, Value, ROOT};
    let obj_at = |heads: &[ChangeHash]| match doc.get_at(ROOT, key, heads).ok().flatten() {
        Some((Value::Object(automerge::ObjType::Text), id)) => Some(id),
        _ => None,
    };
    let obj = obj_at(to)?;
    if obj_at(from)? != obj {
        return None;
    }
    let patches = doc.diff_obj(&obj, from, to, false).ok()?;
    let mut text: Vec<char> = before.chars().collect();
    let mut edits: Vec<TextEdit> = Vec::new();
    for p in patches {
        match p.action {
            PatchAction::SpliceText { index, value, .. } => {
                let s = value.make_string();
                let at = index.min(text.len());
                text.splice(at..at, s.chars());
                match edits.last_mut() {
                    // A deletion followed by an insertion at the same place is one replacement.
                    Some(e) if e.index == at && e.inserted.is_empty() => e.inserted = s,
                    _ => edits.push(TextEdit {
                        index: at,
                        deleted: String::new(),
                        inserted: s,
                    }),
                }
            }
            PatchAction::DeleteSeq { index, length } => {
                let at = index.min(text.len());
                let end = (at + length).min(text.len());
                let deleted: String = text.drain(at..end).collect();
                edits.push(TextEdit {
                    index: at,
                    deleted,
                    inserted: String::new(),
                });
            }
            _ => {}
        }
    }
    Some(edits)
}

/// The single edit (common prefix and suffix kept) that turns `a` into `b`.
pub fn text_edit(a: &str, b: &str) -> TextEdit {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let max_suffix = a.len().min(b.len()) - prefix;
    let suffix = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take(max_suffix)
        .take_while(|(x, y)| x == y)
        .count();
    TextEdit {
        index: prefix,
        deleted: a[prefix..a.len() - suffix].iter().collect(),
        inserted: b[prefix..b.len() - suffix].iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_edit_finds_the_changed_span() {
        let e = text_edit("hello world", "hello brave world");
        assert_eq!(e.index, 6);
        assert_eq!(e.deleted, "");
        assert_eq!(e.inserted, "brave ");
        let e = text_edit("aaa", "aa");
        assert_eq!((e.deleted.as_str(), e.inserted.as_str()), ("a", ""));
    }
}
