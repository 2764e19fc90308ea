//! What an editor needs beyond reading and writing fields: patches (what a change did, so a UI
//! redraws only that), stable text cursors, and rich-text marks on text fields. Pure functions
//! of documents and schemas, like the rest of `crdt`: no I/O, no clock.
//!
//! Our own types ([`Patch`], [`TextCursor`], [`MarkSpan`], [`Style`]) stand in for Automerge's,
//! so that the embedding API does not move when Automerge does, and so that paths speak of
//! fields by today's names (through the schema's lenses) rather than by stored keys.

use std::collections::HashMap;

use automerge::{
    marks::ExpandMark, Automerge, ChangeHash, ObjType, PatchAction as AmAction, Prop, ReadDoc,
    Value, ROOT,
};
use serde::{Deserialize, Serialize};

use super::schema::Schema;
use super::{scalar_to_json, FieldRef, View, DELETED_KEY};

/// One step of a path inside an entity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PathElem {
    /// A field (today's name) or a key of a map.
    Key(String),
    /// An index in a list or a text.
    Index(usize),
}

/// What a change did to one object, from Automerge's patches. Indexes in text count Unicode
/// code points, as every text call of tandem does.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Patch {
    /// The object changed, from the entity's root: empty for the root itself (where fields
    /// are put), `[Key("body")]` for the text of field `body`, deeper for nested objects.
    pub path: Vec<PathElem>,
    pub action: PatchAction,
}

/// The kinds of patch.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchAction {
    /// `prop` now holds `value` (a new text or map reads as `""` or `{}`); `conflict` when
    /// concurrent values remain (the value is the provisional winner).
    Put {
        prop: PathElem,
        value: serde_json::Value,
        conflict: bool,
    },
    /// Values inserted into a list at `index`.
    Insert {
        index: usize,
        values: Vec<serde_json::Value>,
    },
    /// `text` inserted into a text at `index`.
    SpliceText { index: usize, text: String },
    /// `length` elements removed from `prop` on (for a map key, `length` is 1).
    Delete { prop: PathElem, length: usize },
    /// A counter grew by `by` (may be negative).
    Increment { prop: PathElem, by: i64 },
    /// Marks set or removed (a removed mark has the value `null`).
    Mark { marks: Vec<MarkSpan> },
    /// Concurrent values appeared at `prop`.
    Conflict { prop: PathElem },
}

fn prop(p: Prop) -> PathElem {
    match p {
        Prop::Map(k) => PathElem::Key(k),
        Prop::Seq(i) => PathElem::Index(i),
    }
}

fn value_json(v: &Value<'_>) -> serde_json::Value {
    match v {
        Value::Scalar(s) => scalar_to_json(s),
        Value::Object(ObjType::Text) => serde_json::Value::String(String::new()),
        Value::Object(ObjType::List) => serde_json::Value::Array(Vec::new()),
        Value::Object(_) => serde_json::Value::Object(serde_json::Map::new()),
    }
}

/// The patches that take the document from `before` to `after` (both sets of heads). This
/// diffs the two states, which costs time in proportion to the document's history (about 2 ms
/// for a text of 10,000 edits): where the operation is at hand, log its patches instead
/// (Automerge's `PatchLog`) and convert them with [`convert`].
pub fn patches(
    doc: &Automerge,
    schema: Option<&Schema>,
    before: &[ChangeHash],
    after: &[ChangeHash],
) -> Vec<Patch> {
    convert(doc, schema, doc.diff(before, after))
}

/// Automerge's patches as ours, with fields renamed by the schema's lenses. Bookkeeping keys
/// (`_authors`, `_schema`, ...) are left out; `_deleted` stays, since a UI shows deletes.
pub fn convert(
    doc: &Automerge,
    schema: Option<&Schema>,
    patches: Vec<automerge::Patch>,
) -> Vec<Patch> {
    convert_named(&View::new(doc, schema).fields(), patches)
}

/// [`convert`] with the document's fields already known.
pub fn convert_named(fields: &[FieldRef], patches: Vec<automerge::Patch>) -> Vec<Patch> {
    let names: HashMap<&str, &str> = fields
        .iter()
        .map(|f| (f.key.as_str(), f.name.as_str()))
        .collect();
    let rename = |key: String| names.get(key.as_str()).map_or(key, |n| n.to_string());
    let hidden = |key: &str| key.starts_with(super::schema::RESERVED_PREFIX) && key != DELETED_KEY;
    let mut out = Vec::new();
    for p in patches {
        let mut path: Vec<PathElem> = p.path.into_iter().map(|(_, pr)| prop(pr)).collect();
        let action = match p.action {
            AmAction::PutMap {
                key,
                value,
                conflict,
            } => PatchAction::Put {
                prop: PathElem::Key(key),
                value: value_json(&value.0),
                conflict,
            },
            AmAction::PutSeq {
                index,
                value,
                conflict,
            } => PatchAction::Put {
                prop: PathElem::Index(index),
                value: value_json(&value.0),
                conflict,
            },
            AmAction::Insert { index, values } => PatchAction::Insert {
                index,
                values: values.iter().map(|(v, _, _)| value_json(v)).collect(),
            },
            AmAction::SpliceText { index, value, .. } => PatchAction::SpliceText {
                index,
                text: value.make_string(),
            },
            AmAction::Increment { prop: pr, value } => PatchAction::Increment {
                prop: prop(pr),
                by: value,
            },
            AmAction::Conflict { prop: pr } => PatchAction::Conflict { prop: prop(pr) },
            AmAction::DeleteMap { key } => PatchAction::Delete {
                prop: PathElem::Key(key),
                length: 1,
            },
            AmAction::DeleteSeq { index, length } => PatchAction::Delete {
                prop: PathElem::Index(index),
                length,
            },
            AmAction::Mark { marks } => PatchAction::Mark {
                marks: marks
                    .into_iter()
                    .map(|m| MarkSpan {
                        start: m.start,
                        end: m.end,
                        name: m.name.to_string(),
                        value: scalar_to_json(&m.value),
                    })
                    .collect(),
            },
        };
        // The first step names a field (or, for a patch of the root, the prop does).
        let action = match path.first_mut() {
            Some(PathElem::Key(k)) => {
                if hidden(k) {
                    continue;
                }
                *k = rename(std::mem::take(k));
                action
            }
            Some(PathElem::Index(_)) => action,
            None => match root_key(&action) {
                Some(k) if hidden(k) => continue,
                Some(k) => {
                    let name = rename(k.to_string());
                    rename_prop(action, name)
                }
                None => action,
            },
        };
        out.push(Patch { path, action });
    }
    out
}

fn root_key(action: &PatchAction) -> Option<&str> {
    match action {
        PatchAction::Put {
            prop: PathElem::Key(k),
            ..
        }
        | PatchAction::Delete {
            prop: PathElem::Key(k),
            ..
        }
        | PatchAction::Increment {
            prop: PathElem::Key(k),
            ..
        }
        | PatchAction::Conflict {
            prop: PathElem::Key(k),
        } => Some(k),
        _ => None,
    }
}

fn rename_prop(action: PatchAction, name: String) -> PatchAction {
    let key = PathElem::Key(name);
    match action {
        PatchAction::Put {
            value, conflict, ..
        } => PatchAction::Put {
            prop: key,
            value,
            conflict,
        },
        PatchAction::Delete { length, .. } => PatchAction::Delete { prop: key, length },
        PatchAction::Increment { by, .. } => PatchAction::Increment { prop: key, by },
        PatchAction::Conflict { .. } => PatchAction::Conflict { prop: key },
        other => other,
    }
}

/// A stable position in a text field: it stays on the character it was made at while text is
/// inserted and deleted around it, here or on other devices (an Automerge cursor). Its string
/// form is what travels in presence messages.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TextCursor(String);

/// The longest cursor string accepted from outside (an Automerge cursor is an op id: a few
/// dozen characters).
pub const MAX_CURSOR_LEN: usize = 256;

impl TextCursor {
    /// The portable string form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A cursor from its string form, checked: `None` if it does not parse.
    pub fn parse(s: &str) -> Option<TextCursor> {
        if s.len() > MAX_CURSOR_LEN {
            return None;
        }
        parse_cursor(s).map(|_| TextCursor(s.to_string()))
    }
}

impl std::fmt::Display for TextCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn parse_cursor(s: &str) -> Option<automerge::Cursor> {
    // The string may come from a peer: Automerge must not take the process down on it.
    std::panic::catch_unwind(|| automerge::Cursor::try_from(s).ok())
        .ok()
        .flatten()
}

/// A cursor at `pos` of the text object `obj` (at the text's end: a cursor that stays at the
/// end).
pub fn cursor_at<R: ReadDoc>(
    doc: &R,
    obj: &automerge::ObjId,
    pos: usize,
) -> Result<TextCursor, String> {
    let len = doc.length(obj);
    if pos > len {
        return Err(format!("position {pos} is past the text's end ({len})"));
    }
    let at = if pos == len {
        automerge::CursorPosition::End
    } else {
        automerge::CursorPosition::Index(pos)
    };
    doc.get_cursor(obj, at, None)
        .map(|c| TextCursor(c.to_string()))
        .map_err(|e| e.to_string())
}

/// Where `cursor` points now in the text object `obj`.
pub fn cursor_position<R: ReadDoc>(
    doc: &R,
    obj: &automerge::ObjId,
    cursor: &TextCursor,
) -> Result<usize, String> {
    let c = parse_cursor(&cursor.0).ok_or("not a cursor")?;
    doc.get_cursor_position(obj, &c, None)
        .map_err(|e| e.to_string())
}

/// A mark on a span of text, as read or as a patch carries it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MarkSpan {
    /// First character marked.
    pub start: usize,
    /// One past the last character marked.
    pub end: usize,
    /// `bold`, `italic`, `link`, `comment` (or another client's own kinds).
    pub name: String,
    /// `true` for bold and italic, the URL of a link, the text of a comment; `null` in a patch
    /// that removes a mark.
    pub value: serde_json::Value,
}

impl MarkSpan {
    /// The style this mark is, if it is one tandem knows.
    pub fn style(&self) -> Option<Style> {
        let text = || self.value.as_str().map(str::to_string);
        match self.name.as_str() {
            "bold" if self.value == true => Some(Style::Bold),
            "italic" if self.value == true => Some(Style::Italic),
            "link" => text().map(Style::Link),
            "comment" => text().map(Style::Comment),
            _ => None,
        }
    }
}

/// The rich-text styles tandem writes. How each grows when text is typed at its edges follows
/// Peritext (Automerge's `ExpandMark`): bold and italic grow at their end (typing after a bold
/// word continues in bold), links and comments never grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Style {
    Bold,
    Italic,
    Link(String),
    Comment(String),
}

impl Style {
    /// The mark's name in the document.
    pub fn name(&self) -> &'static str {
        match self {
            Style::Bold => "bold",
            Style::Italic => "italic",
            Style::Link(_) => "link",
            Style::Comment(_) => "comment",
        }
    }

    pub(crate) fn value(&self) -> automerge::ScalarValue {
        match self {
            Style::Bold | Style::Italic => true.into(),
            Style::Link(s) | Style::Comment(s) => s.as_str().into(),
        }
    }

    pub(crate) fn expand(&self) -> ExpandMark {
        match self {
            Style::Bold | Style::Italic => ExpandMark::After,
            Style::Link(_) | Style::Comment(_) => ExpandMark::None,
        }
    }
}

/// The expand rule for removing the mark called `name`.
pub(crate) fn expand_of(name: &str) -> ExpandMark {
    match name {
        "bold" | "italic" => ExpandMark::After,
        _ => ExpandMark::None,
    }
}

/// The marks of the text object `obj`, merged (one span per run of the same mark), in text
/// order.
pub fn marks<R: ReadDoc>(doc: &R, obj: &automerge::ObjId) -> Vec<MarkSpan> {
    let mut out: Vec<MarkSpan> = doc
        .marks(obj)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !matches!(m.value, automerge::ScalarValue::Null))
        .map(|m| MarkSpan {
            start: m.start,
            end: m.end,
            name: m.name.to_string(),
            value: scalar_to_json(&m.value),
        })
        .collect();
    out.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    out
}

/// The text object of field `key`, if the document has one.
pub fn text_obj<R: ReadDoc>(doc: &R, key: &str) -> Option<automerge::ObjId> {
    match doc.get(ROOT, key).ok().flatten()? {
        (Value::Object(ObjType::Text), id) => Some(id),
        _ => None,
    }
}
