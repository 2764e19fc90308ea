//! Offline schema migrations as deterministic Automerge changes.
//!
//! A migration from version N to N+1 writes only what cannot be a lens: the containers of new
//! text/counter/merge fields, new critical-field marks, and the `_schema` bump. Every device
//! builds that change the same way — on a fork of the document at the change that set
//! `_schema = N`, as an actor derived from a hash of (doc id, from, to, the canonical steps, the
//! base hash), with time 0 and no message — so the bytes are identical everywhere and merging
//! deduplicates them. The fork holds only the base change's history, so the change's operation
//! counters are the same on every device too (`isolate` would not give that).

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, Automerge, Change, ChangeHash, ObjType, ReadDoc, ScalarValue, Value, ROOT,
};
use sha2::{Digest, Sha256};

use super::schema::{Migration, Schema, Step, Strategy};
use super::{EntityError, View, CRITICAL_KEY, SCHEMA_KEY};
use crate::ids::DocId;

/// The migrations a document needs before this schema may write to it, oldest first.
/// Empty when the document is current, newer than the schema, unversioned, or of a type the
/// schema does not know.
pub fn pending<'s>(doc: &Automerge, schema: &'s Schema) -> Vec<&'s Migration> {
    let view = View::new(doc, Some(schema));
    let Some(ty) = view.entity_type() else {
        return Vec::new();
    };
    if schema.ty(&ty).is_none() {
        return Vec::new();
    }
    let mut v = view.schema_version();
    let mut out = Vec::new();
    while v >= 1 && v < schema.version {
        match schema.migration_from(v) {
            Some(m) => out.push(m),
            None => {
                tracing::warn!(
                    from = v,
                    "the schema has no migration from this version; writing through lenses only"
                );
                return Vec::new();
            }
        }
        v += 1;
    }
    out
}

/// The change that set `_schema` to `version`, if the document has one.
fn base_change(doc: &Automerge, version: u64) -> Option<ChangeHash> {
    doc.get_all(ROOT, SCHEMA_KEY)
        .ok()?
        .into_iter()
        .find(|(v, _)| match v {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Uint(n) => *n == version,
                ScalarValue::Int(n) => *n >= 0 && *n as u64 == version,
                _ => false,
            },
            _ => false,
        })
        .and_then(|(_, id)| doc.hash_for_opid(&id))
}

/// The actor a migration change is written as.
pub fn migration_actor(doc_id: &DocId, m: &Migration, base: &ChangeHash) -> ActorId {
    let mut h = Sha256::new();
    h.update(b"tandem/migration/v1");
    h.update(doc_id.as_bytes());
    h.update(m.from.to_be_bytes());
    h.update(m.to().to_be_bytes());
    h.update(m.canonical_bytes());
    h.update(base.0);
    let digest = h.finalize();
    ActorId::from(&digest[..16])
}

/// Build the deterministic change for migration `m` of `doc` (an entity of type `ty`).
pub fn migration_change(
    doc: &Automerge,
    doc_id: &DocId,
    ty: &str,
    m: &Migration,
) -> Result<Change, EntityError> {
    let base = base_change(doc, m.from).ok_or_else(|| EntityError::InvalidValue {
        field: SCHEMA_KEY.into(),
        reason: format!("no change sets the schema version to {}", m.from),
    })?;
    let mut fork = doc.fork_at(&[base])?;
    fork.set_actor(migration_actor(doc_id, m, &base));
    let mut tx = fork.transaction();
    for step in &m.steps {
        let Step::Add {
            ty: t, field, kind, ..
        } = step
        else {
            continue;
        };
        if t != ty {
            continue;
        }
        // The key was never used before (the schema refuses reuse); if some schema-less writer
        // created it anyway, the fork shows it identically on every device.
        let exists = tx.get(ROOT, field.as_str())?.is_some();
        match kind {
            Strategy::Text if !exists => {
                tx.put_object(ROOT, field.as_str(), ObjType::Text)?;
            }
            Strategy::Merge if !exists => {
                tx.put_object(ROOT, field.as_str(), ObjType::Map)?;
            }
            Strategy::Counter if !exists => {
                tx.put(ROOT, field.as_str(), ScalarValue::counter(0))?
            }
            Strategy::Critical => {
                let crit = match tx.get(ROOT, CRITICAL_KEY)? {
                    Some((Value::Object(ObjType::Map), id)) => id,
                    _ => tx.put_object(ROOT, CRITICAL_KEY, ObjType::Map)?,
                };
                tx.put(&crit, field.as_str(), true)?;
            }
            _ => {}
        }
    }
    tx.put(ROOT, SCHEMA_KEY, m.to())?;
    tx.commit_with(CommitOptions::default().with_time(0));
    fork.get_last_local_change()
        .ok_or_else(|| EntityError::Automerge("migration produced no change".into()))
}

/// Bring `doc` up to `schema`'s version: builds and applies every pending migration change and
/// returns them (already in `doc`) for the caller to persist and push.
pub fn migrate(
    doc: &mut Automerge,
    doc_id: &DocId,
    schema: &Schema,
) -> Result<Vec<Change>, EntityError> {
    let steps: Vec<Migration> = pending(doc, schema).into_iter().cloned().collect();
    let Some(ty) = View::new(&*doc, Some(schema)).entity_type() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for m in &steps {
        let change = migration_change(doc, doc_id, &ty, m)?;
        if doc.get_change_by_hash(&change.hash()).is_none() {
            doc.apply_changes([change.clone()])?;
            out.push(change);
        }
    }
    Ok(out)
}
