//! The store commands: create, edit, read, history, conflicts, status, export/import.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{json, Value};
use tandem::{DocId, DocStatus, Error, Repo, RepoOptions, Schema, Strategy};

use super::{Cli, CmdResult, Failure, EXIT_USAGE};

pub const EXIT_NOT_FOUND: i32 = 3;

#[derive(Args, Debug)]
pub struct NewArgs {
    /// Entity type (from the schema).
    pub ty: String,
    /// Initial values: field=value (JSON when it parses, else a string).
    pub fields: Vec<String>,
    /// Namespace the document belongs to.
    #[arg(long, default_value = "default")]
    pub ns: String,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// Document id or unique prefix.
    pub doc: String,
    /// field=value ... (counter: +N or -N; text: the new whole text; merge: a JSON object).
    #[arg(required = true)]
    pub assignments: Vec<String>,
    /// Change message.
    #[arg(long, short)]
    pub message: Option<String>,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    pub doc: String,
    pub field: Option<String>,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only this type.
    #[arg(long = "type")]
    pub ty: Option<String>,
    /// Include deleted entities.
    #[arg(long)]
    pub deleted: bool,
}

#[derive(Args, Debug)]
pub struct DocArg {
    pub doc: String,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    pub doc: String,
    /// One line per change.
    #[arg(long)]
    pub oneline: bool,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    pub doc: String,
    /// Show the document right after this change (hex prefix, ≥ 4 characters).
    #[arg(long)]
    pub at: Option<String>,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    pub doc: String,
    /// From this change (hex prefix).
    pub from: String,
    /// To this change (default: now).
    pub to: Option<String>,
}

#[derive(Args, Debug)]
pub struct ConflictsArgs {
    /// One document (default: every document).
    pub doc: Option<String>,
    /// Also non-critical fields with concurrent values.
    #[arg(long)]
    pub any_field: bool,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("choice").required(true).args(["pick", "value"])))]
pub struct ResolveArgs {
    pub doc: String,
    pub field: String,
    /// Keep version N as numbered by `tandem conflicts`.
    #[arg(long)]
    pub pick: Option<usize>,
    /// Write this value instead (JSON when it parses, else a string).
    #[arg(long)]
    pub value: Option<String>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    pub doc: Option<String>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    pub doc: String,
    /// Output file (default: <doc-id>.automerge; `-` for stdout).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// An Automerge file.
    pub file: PathBuf,
    /// Document id (default: the file name if it is an id, else a new one).
    #[arg(long)]
    pub id: Option<String>,
}

/// Load the schema: the flag, else ./tandem.toml when present, else none.
pub fn load_schema(cli: &Cli) -> Result<Option<Schema>, Failure> {
    let path = match &cli.schema {
        Some(p) => p.clone(),
        None => {
            let p = PathBuf::from("tandem.toml");
            if !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Failure::new(1, format!("cannot read schema {}: {e}", path.display())))?;
    Schema::from_toml(&text)
        .map(Some)
        .map_err(|e| Failure::new(1, format!("{}: {e}", path.display())))
}

fn author() -> String {
    std::env::var("TANDEM_AUTHOR")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "cli".into())
}

/// Open the device store for a command.
pub fn open(cli: &Cli) -> Result<Repo, Failure> {
    let dir = cli.data_dir("TANDEM_DATA", "./tandem-data");
    let mut opts = RepoOptions::new(author());
    opts.schema = load_schema(cli)?;
    Repo::open(&dir, opts).map_err(|e| match e {
        Error::Store(tandem::store::StoreError::InUse { pid, .. }) => Failure::new(
            4,
            format!(
                "store {} is in use by another process{}; stop it or use another --data folder",
                dir.display(),
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ),
        ),
        e => e.into(),
    })
}

/// Open a folder for a read-only command: a device store or a stopped relay's data folder.
pub fn open_read(cli: &Cli) -> Result<Repo, Failure> {
    let dir = cli.data_dir("TANDEM_DATA", "./tandem-data");
    let mut opts = RepoOptions::new(author());
    opts.schema = load_schema(cli)?;
    Repo::open_for_reading(&dir, opts).map_err(|e| match e {
        Error::Store(tandem::store::StoreError::InUse { pid, .. }) => Failure::new(
            4,
            format!(
                "{} is in use by another process{} (a running relay or app); stop it to read the folder, or sync a device instead",
                dir.display(),
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ),
        ),
        Error::Store(tandem::store::StoreError::Io(m)) if m.starts_with("no store") => {
            Failure::new(EXIT_NOT_FOUND, format!("{m} (use --data DIR, or create one with `tandem new`)"))
        }
        e => e.into(),
    })
}

/// A document by id or unique prefix; unknown ids suggest the closest ones.
pub fn find(repo: &Repo, prefix: &str) -> Result<DocId, Failure> {
    match repo.find(prefix) {
        Ok(id) => Ok(id),
        Err(Error::NoMatch(_)) | Err(Error::NotFound(_)) => {
            let mut ids: Vec<(usize, String)> = repo
                .list(None, true)?
                .into_iter()
                .map(|(id, _)| {
                    let s = id.to_string();
                    let common = s
                        .chars()
                        .zip(prefix.chars())
                        .take_while(|(a, b)| a == b)
                        .count();
                    (common, s)
                })
                .collect();
            ids.sort_by_key(|a| std::cmp::Reverse(a.0));
            let close: Vec<String> = ids
                .into_iter()
                .filter(|(c, _)| *c > 0)
                .take(3)
                .map(|(_, s)| s)
                .collect();
            let hint = if close.is_empty() {
                String::new()
            } else {
                format!("; did you mean {}?", close.join(", "))
            };
            Err(Failure::new(
                EXIT_NOT_FOUND,
                format!("no document matches '{prefix}'{hint}"),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// `field=value` split.
fn assignment(a: &str) -> Result<(&str, &str), Failure> {
    a.split_once('=')
        .filter(|(f, _)| !f.is_empty())
        .ok_or_else(|| Failure::new(EXIT_USAGE, format!("'{a}' is not field=value")))
}

/// JSON when it parses, else the string itself.
pub fn parse_value(v: &str) -> Value {
    serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()))
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Human form of a value: strings raw, everything else JSON.
fn human(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}

pub fn new(cli: &Cli, args: &NewArgs) -> CmdResult {
    let repo = open(cli)?;
    let mut fields = serde_json::Map::new();
    for a in &args.fields {
        let (f, v) = assignment(a)?;
        // Text fields take the raw string, counters +N (or a bare initial value): look the
        // strategy up in the schema.
        let strategy = repo
            .schema()
            .and_then(|s| s.ty(&args.ty))
            .and_then(|t| t.field(f))
            .map(|f| f.strategy);
        let value = match strategy {
            Some(Strategy::Text) => Value::String(v.to_string()),
            Some(Strategy::Counter) => match v.trim_start_matches('+').parse::<i64>() {
                Ok(n) => json!(n),
                Err(_) => {
                    return Err(Failure::new(
                        1,
                        format!("'{f}' is a counter: expected a number such as 3 or +3, got '{v}'"),
                    ))
                }
            },
            _ => parse_value(v),
        };
        fields.insert(f.to_string(), value);
    }
    let id = repo.create_in(&args.ns, &args.ty, Value::Object(fields))?;
    if cli.json {
        print_json(&json!({"id": id.to_string()}));
    } else {
        println!("{id}");
    }
    Ok(())
}

fn parse_increment(field: &str, v: &str) -> Result<i64, String> {
    let ok = v.starts_with('+') || v.starts_with('-');
    let n: Option<i64> = v.trim_start_matches('+').parse().ok();
    match (ok, n) {
        (true, Some(n)) => Ok(n),
        (false, Some(_)) => Err(format!(
            "'{field}' is a counter: write +{v} or -{v} to change it (a bare number is ambiguous)"
        )),
        _ => Err(format!(
            "'{field}' is a counter: expected +N or -N, got '{v}'"
        )),
    }
}

pub fn set(cli: &Cli, args: &SetArgs) -> CmdResult {
    let repo = open(cli)?;
    let id = find(&repo, &args.doc)?;
    let fields = repo.fields(&id)?;
    let mut ops = Vec::new();
    for a in &args.assignments {
        let (f, v) = assignment(a)?;
        let strategy = fields.iter().find(|x| x.name == f).map(|x| x.strategy);
        ops.push((f.to_string(), v.to_string(), strategy));
    }
    let hash = repo.change(&id, |tx| {
        if let Some(m) = &args.message {
            tx.message(m.clone());
        }
        for (f, v, strategy) in &ops {
            match strategy {
                Some(Strategy::Text) => tx.set(f, v.as_str())?,
                Some(Strategy::Counter) => {
                    let by = parse_increment(f, v).map_err(|reason| {
                        tandem::crdt::EntityError::InvalidValue {
                            field: f.clone(),
                            reason,
                        }
                    })?;
                    tx.increment(f, by)?
                }
                _ => tx.set(f, parse_value(v))?,
            }
        }
        Ok(())
    })?;
    if cli.json {
        print_json(&json!({"id": id.to_string(), "change": hash}));
    }
    Ok(())
}

pub fn get(cli: &Cli, args: &GetArgs) -> CmdResult {
    let repo = open_read(cli)?;
    let id = find(&repo, &args.doc)?;
    let e = repo.get(&id)?;
    match &args.field {
        Some(f) => {
            let v = e.value.get(f).cloned().ok_or_else(|| {
                let known: Vec<String> = e
                    .value
                    .as_object()
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                Failure::new(
                    EXIT_NOT_FOUND,
                    format!(
                        "'{}' has no field '{f}' (its fields: {})",
                        e.ty,
                        known.join(", ")
                    ),
                )
            })?;
            if cli.json {
                print_json(
                    &json!({"id": id.to_string(), "field": f, "value": v, "conflict": e.conflicts.contains(f)}),
                );
            } else {
                println!("{}", human(&v));
                if e.conflicts.contains(f) {
                    eprintln!("note: '{f}' is in conflict; this is the provisional winner (see `tandem conflicts {id}`)");
                }
            }
        }
        None => {
            if cli.json {
                print_json(&serde_json::to_value(&e).unwrap_or_default());
            } else {
                print_json(&e.value);
                if e.deleted {
                    eprintln!("note: {id} is deleted");
                }
                for f in &e.conflicts {
                    eprintln!("note: '{f}' is in conflict (see `tandem conflicts {id}`)");
                }
            }
        }
    }
    Ok(())
}

pub fn ls(cli: &Cli, args: &LsArgs) -> CmdResult {
    let repo = open_read(cli)?;
    let docs = repo.list(args.ty.as_deref(), args.deleted)?;
    if cli.json {
        let rows: Vec<Value> = docs
            .iter()
            .map(|(id, m)| {
                json!({"id": id.to_string(), "type": m.ty, "namespace": m.namespace, "deleted": m.deleted, "pending": m.pending, "quarantined": m.quarantined})
            })
            .collect();
        print_json(&Value::Array(rows));
    } else {
        for (id, m) in docs {
            let mut flags = Vec::new();
            if m.deleted {
                flags.push("deleted".to_string());
            }
            if m.pending > 0 {
                flags.push(format!("pending {}", m.pending));
            }
            if let Some(q) = &m.quarantined {
                flags.push(format!("quarantined: {q}"));
            }
            println!("{id}\t{}\t{}\t{}", m.ty, m.namespace, flags.join(", "));
        }
    }
    Ok(())
}

pub fn rm(cli: &Cli, args: &DocArg) -> CmdResult {
    let repo = open(cli)?;
    let id = find(&repo, &args.doc)?;
    repo.delete(&id)?;
    if cli.json {
        print_json(&json!({"id": id.to_string(), "deleted": true}));
    }
    Ok(())
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn log(cli: &Cli, args: &LogArgs) -> CmdResult {
    let repo = open_read(cli)?;
    let id = find(&repo, &args.doc)?;
    let mut history = repo.history(&id)?;
    history.reverse();
    if cli.json {
        print_json(&serde_json::to_value(&history).unwrap_or_default());
        return Ok(());
    }
    let out = std::io::stdout();
    let mut out = out.lock();
    for c in &history {
        let who = c.author.clone().unwrap_or_else(|| {
            if c.time == 0 {
                "(migration)".into()
            } else {
                format!("actor {}", &c.actor[..8.min(c.actor.len())])
            }
        });
        let msg = c.message.clone().unwrap_or_default();
        if args.oneline {
            let _ = writeln!(
                out,
                "{} {} {} [{}] {}",
                &c.hash[..8],
                who,
                utc(c.time),
                c.fields.join(","),
                msg
            );
        } else {
            let _ = writeln!(out, "change {}", c.hash);
            let _ = writeln!(out, "Author:  {who} (actor {}, seq {})", c.actor, c.seq);
            let _ = writeln!(out, "Date:    {}", utc(c.time));
            if !c.deps.is_empty() {
                let parents: Vec<&str> = c.deps.iter().map(|d| &d[..8]).collect();
                let _ = writeln!(out, "Parents: {}", parents.join(" "));
            }
            let _ = writeln!(out, "Changed: {} ({} ops)", c.fields.join(", "), c.ops);
            if !msg.is_empty() {
                let _ = writeln!(out, "\n    {msg}");
            }
            let _ = writeln!(out);
        }
    }
    Ok(())
}

pub fn show(cli: &Cli, args: &ShowArgs) -> CmdResult {
    let repo = open_read(cli)?;
    let id = find(&repo, &args.doc)?;
    let e = match &args.at {
        Some(at) => repo.get_at(&id, at)?,
        None => repo.get(&id)?,
    };
    if cli.json {
        print_json(&serde_json::to_value(&e).unwrap_or_default());
    } else {
        print_json(&e.value);
    }
    Ok(())
}

pub fn diff(cli: &Cli, args: &DiffArgs) -> CmdResult {
    let repo = open_read(cli)?;
    let id = find(&repo, &args.doc)?;
    let d = repo.diff(&id, &args.from, args.to.as_deref())?;
    if cli.json {
        print_json(&serde_json::to_value(&d).unwrap_or_default());
        return Ok(());
    }
    for f in d {
        match &f.text {
            Some(edits) => {
                let shown: Vec<String> = edits
                    .iter()
                    .map(|t| {
                        let mut s = format!("at {}", t.index);
                        if !t.deleted.is_empty() {
                            s.push_str(&format!(" -{:?}", t.deleted));
                        }
                        if !t.inserted.is_empty() {
                            s.push_str(&format!(" +{:?}", t.inserted));
                        }
                        s
                    })
                    .collect();
                println!("{}: {}", f.field, shown.join("; "));
            }
            None => println!("{}: {} -> {}", f.field, f.before, f.after),
        }
    }
    Ok(())
}

pub fn conflicts(cli: &Cli, args: &ConflictsArgs) -> CmdResult {
    let repo = open_read(cli)?;
    let ids = match &args.doc {
        Some(d) => vec![find(&repo, d)?],
        None => repo
            .list(None, true)?
            .into_iter()
            .map(|(id, _)| id)
            .collect(),
    };
    let mut all = Vec::new();
    for id in ids {
        let cs = match repo.conflicts(&id, args.any_field) {
            Ok(c) => c,
            // One unreadable document must not hide the others' conflicts.
            Err(e @ Error::Store(_)) if args.doc.is_none() => {
                eprintln!("tandem: {id}: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for c in cs {
            all.push((id, c));
        }
    }
    if cli.json {
        let rows: Vec<Value> = all
            .iter()
            .map(|(id, c)| {
                let versions: Vec<Value> = c
                    .versions
                    .iter()
                    .enumerate()
                    .map(|(i, v)| json!({"n": i + 1, "value": v.value, "author": v.author, "actor": v.actor, "hash": v.hash, "time": v.time}))
                    .collect();
                json!({"id": id.to_string(), "field": c.field, "critical": c.critical, "versions": versions})
            })
            .collect();
        print_json(&Value::Array(rows));
        return Ok(());
    }
    for (id, c) in &all {
        println!(
            "{id} {}{}",
            c.field,
            if c.critical { " (critical)" } else { "" }
        );
        for (i, v) in c.versions.iter().enumerate() {
            let who = v
                .author
                .clone()
                .unwrap_or_else(|| format!("actor {}", &v.actor[..8.min(v.actor.len())]));
            println!(
                "  {}) {}  by {who}  {}  change {}",
                i + 1,
                v.value,
                utc(v.time),
                &v.hash[..8.min(v.hash.len())]
            );
        }
    }
    if all.is_empty() && !cli.json {
        eprintln!("no open conflicts");
    }
    Ok(())
}

pub fn resolve(cli: &Cli, args: &ResolveArgs) -> CmdResult {
    let repo = open(cli)?;
    let id = find(&repo, &args.doc)?;
    let value = match (&args.pick, &args.value) {
        (Some(n), _) => {
            let c = repo
                .conflicts(&id, true)?
                .into_iter()
                .find(|c| c.field == args.field)
                .ok_or_else(|| {
                    Failure::new(
                        EXIT_NOT_FOUND,
                        format!("'{}' is not in conflict", args.field),
                    )
                })?;
            c.versions
                .get(n.wrapping_sub(1))
                .map(|v| v.value.clone())
                .ok_or_else(|| {
                    Failure::new(
                        EXIT_USAGE,
                        format!("--pick takes 1 to {}", c.versions.len()),
                    )
                })?
        }
        (None, Some(v)) => parse_value(v),
        (None, None) => return Err(Failure::new(EXIT_USAGE, "give --pick N or --value V")),
    };
    let hash = repo.resolve(&id, &args.field, value.clone())?;
    if cli.json {
        print_json(
            &json!({"id": id.to_string(), "field": args.field, "value": value, "change": hash}),
        );
    }
    Ok(())
}

fn status_json(id: &DocId, s: &DocStatus, pending: u64) -> Value {
    json!({"id": id.to_string(), "status": s.word(), "detail": s, "pending": pending})
}

fn status_line(s: &DocStatus) -> String {
    match s {
        DocStatus::Synced => "synced".into(),
        DocStatus::Syncing { done, total } => format!("syncing ({done}/{total} bytes)"),
        DocStatus::Pending {
            changes,
            oldest_age_ms,
        } => {
            format!(
                "pending ({changes} change{}, oldest {}s old)",
                if *changes == 1 { "" } else { "s" },
                oldest_age_ms / 1000
            )
        }
        DocStatus::Conflict { fields } => format!("conflict ({})", fields.join(", ")),
    }
}

pub fn status(cli: &Cli, args: &StatusArgs) -> CmdResult {
    let repo = open_read(cli)?;
    let ids: Vec<DocId> = match &args.doc {
        Some(d) => vec![find(&repo, d)?],
        None => repo
            .list(None, false)?
            .into_iter()
            .map(|(id, _)| id)
            .collect(),
    };
    let mut rows = Vec::new();
    for id in ids {
        let s = repo.status(&id)?;
        let pending = repo.meta(&id).map(|m| m.pending).unwrap_or(0);
        rows.push((id, s, pending));
    }
    if cli.json {
        let docs: Vec<Value> = rows
            .iter()
            .map(|(id, s, p)| status_json(id, s, *p))
            .collect();
        let count = |w: &str| rows.iter().filter(|(_, s, _)| s.word() == w).count();
        print_json(&json!({
            "documents": docs,
            "total": {"documents": rows.len(), "synced": count("synced"), "syncing": count("syncing"), "pending": count("pending"), "conflict": count("conflict")}
        }));
        return Ok(());
    }
    if args.doc.is_some() {
        if let Some((_, s, _)) = rows.first() {
            println!("{}", status_line(s));
        }
        return Ok(());
    }
    for (id, s, _) in &rows {
        println!("{id}\t{}", status_line(s));
    }
    let count = |w: &str| rows.iter().filter(|(_, s, _)| s.word() == w).count();
    println!(
        "{} documents: {} synced, {} syncing, {} pending, {} conflict",
        rows.len(),
        count("synced"),
        count("syncing"),
        count("pending"),
        count("conflict")
    );
    Ok(())
}

pub fn export(cli: &Cli, args: &ExportArgs) -> CmdResult {
    let repo = open_read(cli)?;
    let id = find(&repo, &args.doc)?;
    let bytes = repo.export(&id)?;
    let path = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{id}.automerge")));
    if path == Path::new("-") {
        std::io::stdout()
            .write_all(&bytes)
            .map_err(|e| Failure::new(1, format!("writing to stdout: {e}")))?;
        return Ok(());
    }
    std::fs::write(&path, &bytes)
        .map_err(|e| Failure::new(1, format!("writing {}: {e}", path.display())))?;
    if cli.json {
        print_json(&json!({"id": id.to_string(), "file": path, "bytes": bytes.len()}));
    } else {
        eprintln!("wrote {} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}

pub fn import(cli: &Cli, args: &ImportArgs) -> CmdResult {
    let bytes = std::fs::read(&args.file).map_err(|e| {
        Failure::new(
            EXIT_NOT_FOUND,
            format!("cannot read {}: {e}", args.file.display()),
        )
    })?;
    let repo = open(cli)?;
    let id = match &args.id {
        Some(s) => s
            .parse::<DocId>()
            .map_err(|e| Failure::new(EXIT_USAGE, e.to_string()))?,
        None => args
            .file
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<DocId>().ok())
            .unwrap_or_else(DocId::generate),
    };
    let applied = repo.import(&id, &bytes)?;
    if cli.json {
        print_json(
            &json!({"id": id.to_string(), "applied": applied.applied, "missing_deps": applied.missing_deps}),
        );
    } else {
        println!("{id}");
    }
    Ok(())
}
