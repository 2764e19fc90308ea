//! The Automerge-facing rules of tandem: what an entity document looks like, how each merge
//! strategy reads and writes, which concurrent values are conflicts, and how migrations and
//! history work. Everything here is a pure function of documents and schemas: no I/O, no clock
//! (times are passed in), no randomness.
//!
//! An entity document's root map holds `_type`, `_schema`, `_critical` (a map whose keys are
//! the critical fields' stored keys), `_authors` (actor hex -> the name of whoever writes as
//! that actor), `_deleted` (absent, true or false) and the fields under their stored keys.

pub mod editing;
pub mod history;
pub mod migrate;
pub mod schema;

use std::borrow::Cow;

use automerge::transaction::{Transactable, Transaction};
use automerge::{
    ActorId, Automerge, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT,
};
use serde::Serialize;

use automerge::Change;
use schema::{Schema, Strategy, TypeDef};

/// Reserved root keys.
pub const TYPE_KEY: &str = "_type";
pub const SCHEMA_KEY: &str = "_schema";
pub const CRITICAL_KEY: &str = "_critical";
pub const AUTHORS_KEY: &str = "_authors";
pub const DELETED_KEY: &str = "_deleted";

/// A request the schema or the document does not allow. Nothing was written.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EntityError {
    #[error("unknown entity type '{0}' (the schema declares: {1})")]
    UnknownType(String, String),
    #[error("type '{ty}' has no field '{field}' (its fields: {})", known.join(", "))]
    UnknownField {
        ty: String,
        field: String,
        known: Vec<String>,
    },
    #[error("field '{field}' is a {} field: {hint}", strategy.name())]
    WrongKind {
        field: String,
        strategy: Strategy,
        hint: String,
    },
    #[error("field '{field}': {reason}")]
    InvalidValue { field: String, reason: String },
    #[error("field names starting with '_' are reserved ('{0}')")]
    Reserved(String),
    #[error("this document is not a tandem entity (it has no '_type')")]
    NotAnEntity,
    #[error("automerge refused the operation: {0}")]
    Automerge(String),
}

impl From<automerge::AutomergeError> for EntityError {
    fn from(e: automerge::AutomergeError) -> Self {
        EntityError::Automerge(e.to_string())
    }
}

/// A field as a document stores it: its key and how it merges.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldRef {
    pub name: String,
    pub key: String,
    pub strategy: Strategy,
    pub default: Option<serde_json::Value>,
}

/// One value of a field in conflict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConflictVersion {
    /// The value this version holds.
    pub value: serde_json::Value,
    /// Who wrote it (their name, when the document knows it).
    pub author: Option<String>,
    /// The actor (hex) that wrote it.
    pub actor: String,
    /// The change that wrote it (hex).
    pub hash: String,
    /// Wall-clock time of that change, seconds since the epoch (display only).
    pub time: i64,
}

/// A field whose concurrent values differ.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FieldConflict {
    pub field: String,
    /// Every version, ordered by operation id: the same order on every replica.
    pub versions: Vec<ConflictVersion>,
    /// Whether the schema (or the document's `_critical`) marks the field critical.
    pub critical: bool,
}

/// Reads of an entity document through a schema's lenses, optionally at past heads.
pub struct View<'a, R: ReadDoc = Automerge> {
    pub doc: &'a R,
    pub schema: Option<&'a Schema>,
    pub heads: Option<Vec<ChangeHash>>,
}

impl<'a, R: ReadDoc> View<'a, R> {
    pub fn new(doc: &'a R, schema: Option<&'a Schema>) -> Self {
        View {
            doc,
            schema,
            heads: None,
        }
    }

    pub fn at(doc: &'a R, schema: Option<&'a Schema>, heads: Vec<ChangeHash>) -> Self {
        View {
            doc,
            schema,
            heads: Some(heads),
        }
    }

    fn get(&self, obj: &ObjId, key: &str) -> Option<(Value<'a>, ObjId)> {
        let r = match &self.heads {
            Some(h) => self.doc.get_at(obj, key, h),
            None => self.doc.get(obj, key),
        };
        r.ok().flatten()
    }

    fn get_all(&self, obj: &ObjId, key: &str) -> Vec<(Value<'a>, ObjId)> {
        let r = match &self.heads {
            Some(h) => self.doc.get_all_at(obj, key, h),
            None => self.doc.get_all(obj, key),
        };
        r.unwrap_or_default()
    }

    fn keys(&self, obj: &ObjId) -> Vec<String> {
        match &self.heads {
            Some(h) => self.doc.keys_at(obj, h).collect(),
            None => self.doc.keys(obj).collect(),
        }
    }

    fn text(&self, obj: &ObjId) -> String {
        let r = match &self.heads {
            Some(h) => self.doc.text_at(obj, h),
            None => self.doc.text(obj),
        };
        r.unwrap_or_default()
    }

    /// The entity type, if this is an entity document.
    pub fn entity_type(&self) -> Option<String> {
        match self.get(&ROOT, TYPE_KEY)? {
            (Value::Scalar(s), _) => match s.as_ref() {
                ScalarValue::Str(s) => Some(s.to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    /// The schema version the document was last migrated to (0 when unset).
    pub fn schema_version(&self) -> u64 {
        match self.get(&ROOT, SCHEMA_KEY) {
            Some((Value::Scalar(s), _)) => match s.as_ref() {
                ScalarValue::Uint(n) => *n,
                ScalarValue::Int(n) => (*n).max(0) as u64,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Whether the entity is deleted (a `_deleted = true` tombstone).
    pub fn is_deleted(&self) -> bool {
        matches!(self.get(&ROOT, DELETED_KEY), Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Boolean(true)))
    }

    /// How many of [`View::fields`] come from the schema's type (they come first).
    pub fn typed_fields(&self) -> usize {
        self.type_def().map_or(0, |td| td.fields.len())
    }

    fn type_def(&self) -> Option<&'a TypeDef> {
        let ty = self.entity_type()?;
        self.schema?.ty(&ty)
    }

    /// Stored keys the document itself marks critical.
    fn doc_critical_keys(&self) -> Vec<String> {
        match self.get(&ROOT, CRITICAL_KEY) {
            Some((Value::Object(ObjType::Map), id)) => self.keys(&id),
            _ => Vec::new(),
        }
    }

    /// The name of whoever writes as `actor`, from the document's `_authors` map.
    pub fn author_of(&self, actor: &ActorId) -> Option<String> {
        // Authors are looked up in the current document, not at `heads`: a name learned
        // later still names an earlier change.
        let (v, id) = self.doc.get(ROOT, AUTHORS_KEY).ok().flatten()?;
        if !matches!(v, Value::Object(ObjType::Map)) {
            return None;
        }
        match self.doc.get(&id, actor.to_hex_string()).ok().flatten()? {
            (Value::Scalar(s), _) => match s.as_ref() {
                ScalarValue::Str(s) => Some(s.to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Every field the document shows: the schema's fields under today's names, then any key
    /// the schema does not know (a newer version's fields are kept and shown as stored).
    pub fn fields(&self) -> Vec<FieldRef> {
        let critical = self.doc_critical_keys();
        let mut out = Vec::new();
        let td = self.type_def();
        if let Some(td) = td {
            for f in &td.fields {
                let strategy = if critical.contains(&f.key) && f.strategy == Strategy::Lww {
                    Strategy::Critical
                } else {
                    f.strategy
                };
                out.push(FieldRef {
                    name: f.name.clone(),
                    key: f.key.clone(),
                    strategy,
                    default: f.default.clone(),
                });
            }
        }
        for key in self.keys(&ROOT) {
            if key.starts_with(schema::RESERVED_PREFIX) {
                continue;
            }
            if let Some(td) = td {
                if td.field_by_key(&key).is_some() || td.removed_keys.contains(&key) {
                    continue;
                }
            }
            let strategy = self.infer_strategy(&key, &critical);
            out.push(FieldRef {
                name: key.clone(),
                key,
                strategy,
                default: None,
            });
        }
        out
    }

    fn infer_strategy(&self, key: &str, critical: &[String]) -> Strategy {
        match self.get(&ROOT, key) {
            Some((Value::Object(ObjType::Text), _)) => Strategy::Text,
            Some((Value::Object(_), _)) => Strategy::Merge,
            Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {
                Strategy::Counter
            }
            _ if critical.iter().any(|c| c == key) => Strategy::Critical,
            _ => Strategy::Lww,
        }
    }

    /// Resolve a field name for reading or writing.
    pub fn field(&self, name: &str) -> Result<FieldRef, EntityError> {
        if name.starts_with(schema::RESERVED_PREFIX) {
            return Err(EntityError::Reserved(name.to_string()));
        }
        if let Some(f) = self.fields().into_iter().find(|f| f.name == name) {
            return Ok(f);
        }
        let ty = self.entity_type().unwrap_or_default();
        if self.type_def().is_some() {
            return Err(EntityError::UnknownField {
                ty,
                field: name.to_string(),
                known: self.fields().into_iter().map(|f| f.name).collect(),
            });
        }
        // No schema for this type: any new field is a plain lww register.
        Ok(FieldRef {
            name: name.to_string(),
            key: name.to_string(),
            strategy: Strategy::Lww,
            default: None,
        })
    }

    /// The value of one field as JSON (provisional winner for a conflicted register).
    pub fn field_value(&self, f: &FieldRef) -> serde_json::Value {
        match self.get(&ROOT, &f.key) {
            Some((v, id)) => self.value_json(v, &id),
            None => match f.strategy {
                Strategy::Text => serde_json::Value::String(String::new()),
                Strategy::Counter => serde_json::json!(0),
                Strategy::Merge => serde_json::json!({}),
                _ => f.default.clone().unwrap_or(serde_json::Value::Null),
            },
        }
    }

    fn value_json(&self, v: Value<'_>, id: &ObjId) -> serde_json::Value {
        match v {
            Value::Scalar(s) => scalar_to_json(&s),
            Value::Object(ObjType::Text) => serde_json::Value::String(self.text(id)),
            Value::Object(ObjType::Map) | Value::Object(ObjType::Table) => {
                let mut m = serde_json::Map::new();
                for k in self.keys(id) {
                    if let Some((v, cid)) = self.get(id, &k) {
                        m.insert(k, self.value_json(v, &cid));
                    }
                }
                serde_json::Value::Object(m)
            }
            Value::Object(ObjType::List) => {
                let len = match &self.heads {
                    Some(h) => self.doc.length_at(id, h),
                    None => self.doc.length(id),
                };
                let items = (0..len)
                    .filter_map(|i| {
                        let r = match &self.heads {
                            Some(h) => self.doc.get_at(id, i, h),
                            None => self.doc.get(id, i),
                        };
                        r.ok().flatten().map(|(v, cid)| self.value_json(v, &cid))
                    })
                    .collect();
                serde_json::Value::Array(items)
            }
        }
    }

    /// The whole entity as a JSON object of its fields (today's names).
    pub fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for f in self.fields() {
            m.insert(f.name.clone(), self.field_value(&f));
        }
        serde_json::Value::Object(m)
    }
}

impl View<'_, Automerge> {
    /// Fields whose concurrent values differ. Only critical fields unless `any_field`.
    pub fn conflicts(&self, any_field: bool) -> Vec<FieldConflict> {
        let mut out = Vec::new();
        for f in &self.fields() {
            let critical = f.strategy == Strategy::Critical;
            if !critical && !any_field {
                continue;
            }
            if let Some(c) = self.field_conflict(f) {
                out.push(FieldConflict { critical, ..c });
            }
        }
        out
    }

    /// The conflict on one field, if its concurrent values differ.
    pub fn field_conflict(&self, f: &FieldRef) -> Option<FieldConflict> {
        let mut all: Vec<(serde_json::Value, ObjId)> = self
            .get_all(&ROOT, &f.key)
            .into_iter()
            .map(|(v, id)| (self.value_json(v, &id), id))
            .collect();
        if all.len() < 2 {
            return None;
        }
        let first = &all[0].0;
        if all.iter().all(|(v, _)| v == first) {
            return None;
        }
        all.sort_by_key(|a| opid_key(&a.1));
        let versions = all
            .into_iter()
            .map(|(value, id)| {
                let (actor, hash, time) = match &id {
                    ObjId::Id(_, actor, _) => {
                        let hash = self.doc.hash_for_opid(&id);
                        let time = hash
                            .and_then(|h| self.doc.get_change_meta_by_hash(&h).map(|m| m.timestamp))
                            .unwrap_or(0);
                        (
                            actor.clone(),
                            hash.map(|h| h.to_string()).unwrap_or_default(),
                            time,
                        )
                    }
                    ObjId::Root => (ActorId::from(&[][..]), String::new(), 0),
                };
                ConflictVersion {
                    value,
                    author: self.author_of(&actor),
                    actor: actor.to_hex_string(),
                    hash,
                    time,
                }
            })
            .collect();
        Some(FieldConflict {
            field: f.name.clone(),
            versions,
            critical: f.strategy == Strategy::Critical,
        })
    }
}

/// Operation ids order by counter, then actor: a total order every replica agrees on.
fn opid_key(id: &ObjId) -> (u64, Vec<u8>) {
    match id {
        ObjId::Root => (0, Vec::new()),
        ObjId::Id(counter, actor, _) => (*counter, actor.to_bytes().to_vec()),
    }
}

/// Where an Automerge storage chunk keeps its checksum and its type.
const CHECKSUM: std::ops::Range<usize> = 4..8;
const CHUNK_TYPE: usize = 8;
const CHUNK_TYPE_CHANGE: u8 = 1;
const CHUNK_TYPE_COMPRESSED_CHANGE: u8 = 2;

/// Parse one raw change from bytes that came from outside (a peer, a file, the disk), checking
/// what Automerge does not: the header checksum (the first 4 bytes of the change hash) must
/// match, and the chunk must not be compressed — Automerge inflates compressed chunks without a
/// bound, so raw changes are the only form accepted. Never panics.
pub fn parse_change(bytes: &[u8]) -> Result<Change, String> {
    match bytes.get(CHUNK_TYPE) {
        Some(&CHUNK_TYPE_CHANGE) => {}
        Some(&CHUNK_TYPE_COMPRESSED_CHANGE) => {
            return Err("compressed changes are not accepted; send raw change bytes".into())
        }
        _ => return Err("not an Automerge change chunk".into()),
    }
    let change = std::panic::catch_unwind(|| Change::from_bytes(bytes.to_vec()))
        .map_err(|_| "automerge panicked on these bytes".to_string())?
        .map_err(|e| e.to_string())?;
    if change.hash().0[..4] != bytes[CHECKSUM] {
        return Err("the change's checksum does not match its contents (damaged or forged)".into());
    }
    Ok(change)
}

/// An Automerge scalar as JSON.
pub fn scalar_to_json(s: &ScalarValue) -> serde_json::Value {
    use serde_json::Value as J;
    match s {
        ScalarValue::Bytes(b) => J::String(hex::encode(b)),
        ScalarValue::Str(s) => J::String(s.to_string()),
        ScalarValue::Int(n) => J::from(*n),
        ScalarValue::Uint(n) => J::from(*n),
        ScalarValue::F64(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .unwrap_or(J::Null),
        ScalarValue::Counter(c) => J::from(i64::from(c)),
        ScalarValue::Timestamp(t) => J::from(*t),
        ScalarValue::Boolean(b) => J::Bool(*b),
        ScalarValue::Unknown { .. } | ScalarValue::Null => J::Null,
    }
}

/// JSON as an Automerge scalar; objects and arrays are not scalars.
pub fn json_to_scalar(field: &str, v: &serde_json::Value) -> Result<ScalarValue, EntityError> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => ScalarValue::Null,
        J::Bool(b) => ScalarValue::Boolean(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        J::String(s) => ScalarValue::Str(s.as_str().into()),
        J::Array(_) | J::Object(_) => return Err(EntityError::InvalidValue {
            field: field.to_string(),
            reason:
                "a register holds a scalar (string, number, bool or null), not an object or array"
                    .into(),
        }),
    })
}

/// Writes to one entity inside an open Automerge transaction. Each method checks the field's
/// strategy before touching the document; the caller drops the transaction on any error, so a
/// failed write leaves nothing behind.
pub struct Writer<'t, 'd> {
    pub tx: &'t mut Transaction<'d>,
    pub schema: Option<&'t Schema>,
    /// The fields of the document's schema type as the transaction started, if the caller
    /// knows them (each read of a much-edited document walks its history). A name not among
    /// them is resolved against the document.
    pub typed: &'t [FieldRef],
    /// The stored keys of the fields this writer resolved (every write resolves its field
    /// first), plus `_deleted` if it was written.
    pub touched: Vec<String>,
}

impl<'t, 'd> Writer<'t, 'd> {
    /// A writer that resolves every field against the document.
    pub fn new(tx: &'t mut Transaction<'d>, schema: Option<&'t Schema>) -> Self {
        Writer {
            tx,
            schema,
            typed: &[],
            touched: Vec::new(),
        }
    }
}

fn wrong_kind(f: &FieldRef, hint: &str) -> EntityError {
    EntityError::WrongKind {
        field: f.name.clone(),
        strategy: f.strategy,
        hint: hint.to_string(),
    }
}

impl Writer<'_, '_> {
    fn resolve(&mut self, name: &str) -> Result<FieldRef, EntityError> {
        // A field of the schema's type keeps its name, key and strategy through a transaction
        // (only a migration or a new type changes them).
        let f = match self.typed.iter().find(|f| f.name == name) {
            Some(f) => f.clone(),
            None => {
                // A transaction reads its own writes: resolve against the document as it
                // stands in it.
                let view = View::new(&*self.tx, self.schema);
                if view.entity_type().is_none() {
                    return Err(EntityError::NotAnEntity);
                }
                view.field(name)?
            }
        };
        self.touched.push(f.key.clone());
        Ok(f)
    }

    /// The object of a container field, created if the document lacks it (a document made
    /// without a schema, or imported).
    fn container(&mut self, f: &FieldRef, ty: ObjType) -> Result<ObjId, EntityError> {
        match self.tx.get(ROOT, &f.key)? {
            Some((Value::Object(t), id)) if t == ty => Ok(id),
            Some(_) => Err(EntityError::InvalidValue {
                field: f.name.clone(),
                reason: format!(
                    "the document stores something other than a {} here",
                    f.strategy.name()
                ),
            }),
            None => Ok(self.tx.put_object(ROOT, &f.key, ty)?),
        }
    }

    /// Set a field from JSON, by strategy: registers take a scalar, text takes a string
    /// (replacing the whole text with a minimal splice), merge takes an object merged key by key
    /// (`null` removes a key). Counters refuse: use [`Writer::increment`].
    pub fn set(&mut self, name: &str, value: &serde_json::Value) -> Result<(), EntityError> {
        let f = self.resolve(name)?;
        match f.strategy {
            Strategy::Lww | Strategy::Critical => {
                let s = json_to_scalar(&f.name, value)?;
                self.tx.put(ROOT, &f.key, s)?;
            }
            Strategy::Text => {
                let s = value
                    .as_str()
                    .ok_or_else(|| wrong_kind(&f, "it takes a string (the new whole text)"))?;
                let obj = self.container(&f, ObjType::Text)?;
                self.tx
                    .update_text(&obj, s)
                    .map_err(|e| EntityError::Automerge(e.to_string()))?;
            }
            Strategy::Counter => {
                return Err(wrong_kind(
                    &f,
                    "it takes an increment (+N or -N), not a value",
                ));
            }
            Strategy::Merge => {
                let m = value
                    .as_object()
                    .ok_or_else(|| wrong_kind(&f, "it takes a JSON object merged key by key"))?;
                // Check every value before the first write.
                let mut puts = Vec::new();
                for (k, v) in m {
                    let s = if v.is_null() {
                        None
                    } else {
                        Some(json_to_scalar(&format!("{}.{k}", f.name), v)?)
                    };
                    puts.push((k.clone(), s));
                }
                let obj = self.container(&f, ObjType::Map)?;
                for (k, s) in puts {
                    match s {
                        Some(s) => self.tx.put(&obj, k, s)?,
                        None => self.tx.delete(&obj, k)?,
                    }
                }
            }
        }
        Ok(())
    }

    /// Splice a text field: delete `del` characters at `pos`, insert `text`.
    pub fn splice_text(
        &mut self,
        name: &str,
        pos: usize,
        del: usize,
        text: &str,
    ) -> Result<(), EntityError> {
        let f = self.resolve(name)?;
        if f.strategy != Strategy::Text {
            return Err(wrong_kind(&f, "only text fields take splices"));
        }
        let obj = self.container(&f, ObjType::Text)?;
        let len = self.tx.length(&obj);
        if pos > len || pos.checked_add(del).is_none_or(|end| end > len) {
            return Err(EntityError::InvalidValue {
                field: f.name,
                reason: format!("splice {pos}+{del} is outside the text (length {len})"),
            });
        }
        self.tx.splice_text(&obj, pos, del as isize, text)?;
        Ok(())
    }

    /// The text object of a text field, for marks and cursors.
    fn text_field(&mut self, name: &str, what: &str) -> Result<(FieldRef, ObjId), EntityError> {
        let f = self.resolve(name)?;
        if f.strategy != Strategy::Text {
            return Err(wrong_kind(&f, &format!("only text fields take {what}")));
        }
        let obj = self.container(&f, ObjType::Text)?;
        Ok((f, obj))
    }

    fn check_span(
        &self,
        f: &FieldRef,
        obj: &ObjId,
        start: usize,
        end: usize,
    ) -> Result<(), EntityError> {
        let len = self.tx.length(obj);
        if start >= end || end > len {
            return Err(EntityError::InvalidValue {
                field: f.name.clone(),
                reason: format!("span {start}..{end} is empty or outside the text (length {len})"),
            });
        }
        Ok(())
    }

    /// Style characters `start..end` of a text field (see [`editing::Style`] for how each
    /// style grows when text is typed at its edges).
    pub fn mark(
        &mut self,
        name: &str,
        start: usize,
        end: usize,
        style: &editing::Style,
    ) -> Result<(), EntityError> {
        let (f, obj) = self.text_field(name, "marks")?;
        self.check_span(&f, &obj, start, end)?;
        let mark = automerge::marks::Mark::new(style.name().to_string(), style.value(), start, end);
        self.tx.mark(&obj, mark, style.expand())?;
        Ok(())
    }

    /// Remove the mark called `mark` (`bold`, `link`, ...) from characters `start..end`.
    pub fn unmark(
        &mut self,
        name: &str,
        start: usize,
        end: usize,
        mark: &str,
    ) -> Result<(), EntityError> {
        let (f, obj) = self.text_field(name, "marks")?;
        self.check_span(&f, &obj, start, end)?;
        self.tx
            .unmark(&obj, mark, start, end, editing::expand_of(mark))?;
        Ok(())
    }

    /// Add `by` (may be negative) to a counter field.
    pub fn increment(&mut self, name: &str, by: i64) -> Result<(), EntityError> {
        let f = self.resolve(name)?;
        if f.strategy != Strategy::Counter {
            return Err(wrong_kind(&f, "only counter fields take increments"));
        }
        match self.tx.get(ROOT, &f.key)? {
            Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {}
            None => self.tx.put(ROOT, &f.key, ScalarValue::counter(0))?,
            Some(_) => {
                return Err(EntityError::InvalidValue {
                    field: f.name,
                    reason: "the document stores something other than a counter here".into(),
                })
            }
        }
        self.tx.increment(ROOT, &f.key, by)?;
        Ok(())
    }

    /// Put one key of a merge field.
    pub fn merge_put(
        &mut self,
        name: &str,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), EntityError> {
        let mut m = serde_json::Map::new();
        m.insert(key.to_string(), value.clone());
        let f = self.resolve(name)?;
        if f.strategy != Strategy::Merge {
            return Err(wrong_kind(&f, "only merge fields take keyed puts"));
        }
        self.set(name, &serde_json::Value::Object(m))
    }

    /// Mark the entity deleted (or not). A tombstone that syncs like any edit.
    pub fn set_deleted(&mut self, deleted: bool) -> Result<(), EntityError> {
        self.touched.push(DELETED_KEY.to_string());
        self.tx.put(ROOT, DELETED_KEY, deleted)?;
        Ok(())
    }

    /// Record `name` as the author of `actor` if the document does not already say so.
    pub fn record_author(&mut self, actor: &ActorId, name: &str) -> Result<(), EntityError> {
        let hex = actor.to_hex_string();
        let obj = match self.tx.get(ROOT, AUTHORS_KEY)? {
            Some((Value::Object(ObjType::Map), id)) => id,
            _ => self.tx.put_object(ROOT, AUTHORS_KEY, ObjType::Map)?,
        };
        let known = match self.tx.get(&obj, &hex)? {
            Some((Value::Scalar(s), _)) => s.as_str() == Some(name),
            _ => false,
        };
        if !known {
            self.tx.put(&obj, hex, name)?;
        }
        Ok(())
    }
}

/// Write a new entity's first change: reserved keys, every container field of its type (so that
/// no two devices ever create the same container), then the initial values.
pub fn init_entity(
    tx: &mut Transaction<'_>,
    schema: Option<&Schema>,
    ty: &str,
    fields: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), EntityError> {
    if ty.is_empty() || ty.starts_with(schema::RESERVED_PREFIX) {
        return Err(EntityError::InvalidValue {
            field: TYPE_KEY.into(),
            reason: format!("'{ty}' is not a valid type name"),
        });
    }
    let td = match schema {
        Some(s) if !s.types.is_empty() => Some(s.ty(ty).ok_or_else(|| {
            EntityError::UnknownType(
                ty.to_string(),
                s.types.keys().cloned().collect::<Vec<_>>().join(", "),
            )
        })?),
        _ => None,
    };
    tx.put(ROOT, TYPE_KEY, ty)?;
    tx.put(ROOT, SCHEMA_KEY, schema.map(|s| s.version).unwrap_or(0))?;
    let crit = tx.put_object(ROOT, CRITICAL_KEY, ObjType::Map)?;
    if let Some(td) = td {
        for f in &td.fields {
            match f.strategy {
                Strategy::Critical => tx.put(&crit, &f.key, true)?,
                Strategy::Text => {
                    tx.put_object(ROOT, &f.key, ObjType::Text)?;
                }
                Strategy::Merge => {
                    tx.put_object(ROOT, &f.key, ObjType::Map)?;
                }
                Strategy::Counter => tx.put(ROOT, &f.key, ScalarValue::counter(0))?,
                Strategy::Lww => {}
            }
        }
    }
    let mut w = Writer::new(tx, schema);
    for (name, value) in fields {
        // A counter's initial value is an increment from zero; anywhere else a counter refuses
        // plain values.
        let f = w.resolve(name)?;
        match (f.strategy, value.as_i64()) {
            (Strategy::Counter, Some(n)) => w.increment(name, n)?,
            _ => w.set(name, value)?,
        }
    }
    Ok(())
}

/// A value as its JSON text, for messages.
pub fn show(v: &serde_json::Value) -> Cow<'_, str> {
    match v {
        serde_json::Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}
