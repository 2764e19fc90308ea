//! Schemas: entity types, their fields, each field's merge strategy, and the migrations between
//! versions. Built from Rust ([`Schema::builder`]) or parsed from a TOML file
//! ([`Schema::from_toml`]). No I/O here: reading the file is the caller's job.
//!
//! Renames and removals are *lenses*: a field keeps the key it was first stored under forever,
//! and the schema maps today's name to that key. Data never moves between keys, because a
//! delete only removes the values it has seen and moving data would lose concurrent edits.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// How concurrent edits of a field merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// A register holding any scalar; concurrent puts are decided by operation id.
    Lww,
    /// A nested map whose keys merge independently.
    Merge,
    /// Collaborative text; concurrent character edits interleave.
    Text,
    /// A counter; concurrent increments add.
    Counter,
    /// Like `lww`, but concurrent distinct values are shown to the user as a conflict.
    Critical,
}

impl Strategy {
    /// The strategy's name as written in a schema file.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Lww => "lww",
            Strategy::Merge => "merge",
            Strategy::Text => "text",
            Strategy::Counter => "counter",
            Strategy::Critical => "critical",
        }
    }

    /// Whether the field is an Automerge object (or counter) that must be created with the
    /// document rather than on first use.
    pub fn is_container(self) -> bool {
        matches!(self, Strategy::Merge | Strategy::Text | Strategy::Counter)
    }
}

/// One field of an entity type, as of the schema's current version.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldDef {
    /// Today's name.
    pub name: String,
    /// The key it is stored under (its name when it was first created).
    pub key: String,
    pub strategy: Strategy,
    /// What an absent scalar field reads as.
    pub default: Option<serde_json::Value>,
}

/// An entity type: its current fields.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeDef {
    pub fields: Vec<FieldDef>,
    /// Keys that earlier versions used for fields since removed: hidden from reads.
    pub removed_keys: BTreeSet<String>,
}

impl TypeDef {
    /// The field called `name` today.
    pub fn field(&self, name: &str) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The field stored under `key`.
    pub fn field_by_key(&self, key: &str) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.key == key)
    }
}

/// One declarative migration step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Step {
    /// Add a field. Containers (text, counter, merge) are created by the migration's change;
    /// scalars read as their default until written.
    Add {
        #[serde(rename = "type")]
        ty: String,
        field: String,
        kind: Strategy,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<serde_json::Value>,
    },
    /// Rename a field (a lens: the stored key does not change).
    Rename {
        #[serde(rename = "type")]
        ty: String,
        from: String,
        to: String,
    },
    /// Remove a field (a lens: its values stay in the document, hidden).
    Remove {
        #[serde(rename = "type")]
        ty: String,
        field: String,
    },
}

/// The steps from version `from` to `from + 1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migration {
    pub from: u64,
    pub steps: Vec<Step>,
}

impl Migration {
    /// The version this migration produces.
    pub fn to(&self) -> u64 {
        self.from + 1
    }

    /// A canonical byte encoding of the typed steps, hashed into the migration change's actor:
    /// the same steps must give the same bytes on every device whatever the file's layout.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        put(&self.from.to_string());
        for step in &self.steps {
            match step {
                Step::Add {
                    ty,
                    field,
                    kind,
                    default,
                } => {
                    put("add");
                    put(ty);
                    put(field);
                    put(kind.name());
                    put(&default.as_ref().map(|d| d.to_string()).unwrap_or_default());
                }
                Step::Rename { ty, from, to } => {
                    put("rename");
                    put(ty);
                    put(from);
                    put(to);
                }
                Step::Remove { ty, field } => {
                    put("remove");
                    put(ty);
                    put(field);
                }
            }
        }
        out
    }
}

/// A schema: a version, entity types, and the migrations that lead to this version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Schema {
    pub version: u64,
    pub types: BTreeMap<String, TypeDef>,
    pub migrations: Vec<Migration>,
}

/// A schema that does not make sense. The message says which type, field or step.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema file is not valid TOML for a tandem schema: {0}")]
    Parse(String),
    #[error("schema: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchema {
    version: u64,
    #[serde(default)]
    // A table (not a BTreeMap) so fields keep the file's order.
    types: BTreeMap<String, toml::Table>,
    #[serde(default)]
    migrations: Vec<Migration>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FileField {
    Kind(Strategy),
    Full {
        kind: Strategy,
        #[serde(default)]
        default: Option<toml::Value>,
    },
}

/// Reserved keys of every entity document.
pub const RESERVED_PREFIX: char = '_';

impl Schema {
    /// Parse a schema file. See docs/schema.md for the format.
    pub fn from_toml(text: &str) -> Result<Schema, SchemaError> {
        let file: FileSchema =
            toml::from_str(text).map_err(|e| SchemaError::Parse(e.to_string()))?;
        let mut b = Schema::builder(file.version);
        for (ty, fields) in file.types {
            let mut fields_out = Vec::new();
            for (name, f) in fields {
                let f: FileField = f
                    .try_into()
                    .map_err(|e| SchemaError::Parse(format!("{ty}.{name}: {e} (expected a strategy name or {{ kind = \"...\", default = ... }})")))?;
                let (kind, default) = match f {
                    FileField::Kind(k) => (k, None),
                    FileField::Full { kind, default } => (
                        kind,
                        default
                            .map(|d| {
                                serde_json::to_value(d)
                                    .map_err(|e| SchemaError::Parse(e.to_string()))
                            })
                            .transpose()?,
                    ),
                };
                fields_out.push((name, kind, default));
            }
            b = b.entity(&ty, fields_out);
        }
        for m in file.migrations {
            b = b.migration(m);
        }
        b.build()
    }

    /// Start a schema in Rust.
    pub fn builder(version: u64) -> SchemaBuilder {
        SchemaBuilder {
            version,
            types: BTreeMap::new(),
            migrations: Vec::new(),
        }
    }

    /// The type called `ty`.
    pub fn ty(&self, ty: &str) -> Option<&TypeDef> {
        self.types.get(ty)
    }

    /// The migration that starts at `from`, if this schema has one.
    pub fn migration_from(&self, from: u64) -> Option<&Migration> {
        self.migrations.iter().find(|m| m.from == from)
    }
}

/// Builds a [`Schema`]: `entity` takes the *current* fields of a type (today's names);
/// `migration` adds the history that leads to them.
pub struct SchemaBuilder {
    version: u64,
    types: BTreeMap<String, Vec<(String, Strategy, Option<serde_json::Value>)>>,
    migrations: Vec<Migration>,
}

impl SchemaBuilder {
    /// Declare an entity type with its current fields: (name, strategy, default).
    pub fn entity<N: Into<String>>(
        mut self,
        ty: &str,
        fields: impl IntoIterator<Item = (N, Strategy, Option<serde_json::Value>)>,
    ) -> Self {
        let entry = self.types.entry(ty.to_string()).or_default();
        entry.extend(fields.into_iter().map(|(n, s, d)| (n.into(), s, d)));
        self
    }

    /// Add the migration from `m.from` to `m.from + 1`.
    pub fn migration(mut self, m: Migration) -> Self {
        self.migrations.push(m);
        self
    }

    /// Check the schema and compute each field's stored key.
    pub fn build(mut self) -> Result<Schema, SchemaError> {
        let bad = |m: String| Err(SchemaError::Invalid(m));
        if self.version == 0 {
            return bad("version must be 1 or more".into());
        }
        self.migrations.sort_by_key(|m| m.from);
        for (i, m) in self.migrations.iter().enumerate() {
            let Some(first) = self.version.checked_sub(self.migrations.len() as u64) else {
                return bad(format!(
                    "{} migrations cannot lead to version {}",
                    self.migrations.len(),
                    self.version
                ));
            };
            let expected = first + i as u64;
            if m.from != expected || m.from == 0 {
                return bad(format!(
                    "migrations must go one version at a time and end at version {} (found one from version {})",
                    self.version, m.from
                ));
            }
        }
        for m in &self.migrations {
            for s in &m.steps {
                let ty = match s {
                    Step::Add { ty, .. } | Step::Rename { ty, .. } | Step::Remove { ty, .. } => ty,
                };
                if !self.types.contains_key(ty) {
                    return bad(format!(
                        "migration from {} names unknown type '{ty}'",
                        m.from
                    ));
                }
            }
        }
        let mut types = BTreeMap::new();
        for (ty, fields) in &self.types {
            for (name, strategy, default) in fields {
                if name.starts_with(RESERVED_PREFIX) || name.is_empty() {
                    return bad(format!(
                        "{ty}.{name}: field names may not be empty or start with '_'"
                    ));
                }
                if default.is_some() && strategy.is_container() {
                    return bad(format!(
                        "{ty}.{name}: only lww and critical fields take a default"
                    ));
                }
                if let Some(d) = default {
                    if d.is_object() || d.is_array() {
                        return bad(format!("{ty}.{name}: a default must be a scalar"));
                    }
                }
            }
            types.insert(ty.clone(), self.resolve_type(ty, fields)?);
        }
        Ok(Schema {
            version: self.version,
            types,
            migrations: self.migrations,
        })
    }

    /// Walk the migrations backwards to find the type's fields at the first version, then
    /// forwards to give every field its stored key, refusing reused names.
    fn resolve_type(
        &self,
        ty: &str,
        current: &[(String, Strategy, Option<serde_json::Value>)],
    ) -> Result<TypeDef, SchemaError> {
        let bad = |m: String| Err(SchemaError::Invalid(m));
        let mut names: BTreeSet<String> = current.iter().map(|f| f.0.clone()).collect();
        for m in self.migrations.iter().rev() {
            for s in m.steps.iter().rev() {
                match s {
                    Step::Add { ty: t, field, .. } if t == ty && !names.remove(field) => {
                        return bad(format!(
                            "migration from {}: {ty}.{field} is added but is not a field of the current version (or was renamed/removed later)",
                            m.from
                        ));
                    }
                    Step::Rename { ty: t, from, to } if t == ty => {
                        if !names.remove(to) {
                            return bad(format!(
                                "migration from {}: {ty}.{from} is renamed to '{to}', which is not a field afterwards",
                                m.from
                            ));
                        }
                        names.insert(from.clone());
                    }
                    Step::Remove { ty: t, field } if t == ty && !names.insert(field.clone()) => {
                        return bad(format!(
                            "migration from {}: {ty}.{field} is removed but still a field afterwards",
                            m.from
                        ));
                    }
                    _ => {}
                }
            }
        }
        // Forward: name -> key, every name and key ever used.
        let mut key_of: BTreeMap<String, String> =
            names.iter().map(|n| (n.clone(), n.clone())).collect();
        let mut used: BTreeSet<String> = names.clone();
        let mut removed_keys = BTreeSet::new();
        for m in &self.migrations {
            for s in &m.steps {
                match s {
                    Step::Add { ty: t, field, .. } if t == ty => {
                        if !used.insert(field.clone()) {
                            return bad(format!(
                                "migration from {}: {ty}.{field} reuses a name an earlier version used; pick a new name",
                                m.from
                            ));
                        }
                        key_of.insert(field.clone(), field.clone());
                    }
                    Step::Rename { ty: t, from, to } if t == ty => {
                        let key = key_of.remove(from).ok_or_else(|| {
                            SchemaError::Invalid(format!(
                                "migration from {}: {ty}.{from} does not exist",
                                m.from
                            ))
                        })?;
                        if !used.insert(to.clone()) {
                            return bad(format!(
                                "migration from {}: {ty}.{to} reuses a name an earlier version used; pick a new name",
                                m.from
                            ));
                        }
                        key_of.insert(to.clone(), key);
                    }
                    Step::Remove { ty: t, field } if t == ty => {
                        let key = key_of.remove(field).ok_or_else(|| {
                            SchemaError::Invalid(format!(
                                "migration from {}: {ty}.{field} does not exist",
                                m.from
                            ))
                        })?;
                        removed_keys.insert(key);
                    }
                    _ => {}
                }
            }
        }
        let mut fields = Vec::new();
        for (name, strategy, default) in current {
            let key = key_of.get(name).cloned().unwrap_or_else(|| name.clone());
            // An `add` step's kind must agree with the field's declared kind.
            for m in &self.migrations {
                for s in &m.steps {
                    if let Step::Add {
                        ty: t, field, kind, ..
                    } = s
                    {
                        if t == ty && field == name && kind != strategy {
                            return bad(format!(
                                "{ty}.{name} is declared '{}' but its migration adds it as '{}'",
                                strategy.name(),
                                kind.name()
                            ));
                        }
                    }
                }
            }
            fields.push(FieldDef {
                name: name.clone(),
                key,
                strategy: *strategy,
                default: default.clone(),
            });
        }
        Ok(TypeDef {
            fields,
            removed_keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_note_schema() {
        let s = Schema::from_toml(
            r#"
            version = 1
            [types.note]
            title  = "critical"
            body   = "text"
            pinned = "lww"
            views  = "counter"
            labels = "merge"
            "#,
        )
        .unwrap();
        let note = s.ty("note").unwrap();
        assert_eq!(note.field("title").unwrap().strategy, Strategy::Critical);
        assert_eq!(note.field("labels").unwrap().strategy, Strategy::Merge);
        assert_eq!(note.fields.len(), 5);
    }

    #[test]
    fn renames_keep_the_original_key() {
        let s = Schema::from_toml(
            r#"
            version = 2
            [types.note]
            heading = "critical"
            summary = "text"
            pinned = { kind = "lww", default = false }
            [[migrations]]
            from = 1
            steps = [
              { op = "rename", type = "note", from = "title", to = "heading" },
              { op = "add", type = "note", field = "summary", kind = "text" },
              { op = "remove", type = "note", field = "views" },
            ]
            "#,
        )
        .unwrap();
        let note = s.ty("note").unwrap();
        assert_eq!(note.field("heading").unwrap().key, "title");
        assert_eq!(note.field("summary").unwrap().key, "summary");
        assert!(note.removed_keys.contains("views"));
        assert_eq!(
            note.field("pinned").unwrap().default,
            Some(serde_json::json!(false))
        );
    }

    #[test]
    fn refuses_reused_names_and_gaps() {
        let reuse = r#"
            version = 2
            [types.note]
            title = "text"
            heading = "critical"
            [[migrations]]
            from = 1
            steps = [
              { op = "rename", type = "note", from = "title", to = "heading" },
              { op = "add", type = "note", field = "title", kind = "text" },
            ]
        "#;
        let e = Schema::from_toml(reuse).unwrap_err().to_string();
        assert!(e.contains("reuses a name"), "{e}");
        let gap = r#"
            version = 3
            [types.note]
            title = "text"
            [[migrations]]
            from = 1
            steps = []
        "#;
        assert!(Schema::from_toml(gap).is_err());
        assert!(Schema::from_toml("version = 1\n[types.note]\ntitle = \"fancy\"").is_err());
    }
}
