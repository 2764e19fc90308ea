//! Local engine benchmarks (small changes are register puts; see docs/performance.md for why
//! counter increments are slower in Automerge 0.12): durable small writes next to sled's own floor, group-committed
//! throughput, store open to first read, and loading a large document next to Automerge's own
//! `load`. Prints a table; figures go to docs/performance.md.
//!
//! `cargo bench --bench local` (full sizes, a few minutes on 2 cores);
//! `TANDEM_BENCH_SCALE=0.1 cargo bench --bench local` for a quick look.

use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use serde_json::json;
use tandem::{Repo, RepoOptions, Schema};

fn schema() -> Schema {
    Schema::from_toml(
        r#"
        version = 1
        [types.note]
        title = "critical"
        body = "text"
        views = "counter"
        data = "lww"
        "#,
    )
    .unwrap()
}

fn scale() -> f64 {
    std::env::var("TANDEM_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn scaled(n: usize) -> usize {
    ((n as f64 * scale()) as usize).max(1)
}

fn pct(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn row(name: &str, value: String, note: &str) {
    println!("| {name} | {value} | {note} |");
}

fn bare_sled(n: usize, fsync: bool) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let file = std::fs::File::open(dir.path().join("db")).unwrap();
    let value = vec![7u8; 200];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let t = Instant::now();
        db.insert(i.to_be_bytes(), value.clone()).unwrap();
        db.flush().unwrap();
        if fsync {
            file.sync_data().unwrap();
        }
        samples.push(t.elapsed());
    }
    samples
}

/// CPU time of this process so far (user + system, every thread).
fn process_cpu() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn repo_writes(n: usize, fsync: bool) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = RepoOptions::new("bench").schema(schema());
    opts.store.fsync = fsync;
    let repo = Repo::open(dir.path(), opts).unwrap();
    let id = repo.create("note", json!({"title": "bench"})).unwrap();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        repo.change(&id, |tx| tx.set("title", format!("title {i}")))
            .unwrap();
        samples.push(t.elapsed());
    }
    samples
}

fn single_writes() {
    let n = scaled(2000);
    let mut bare = bare_sled(n, false);
    let mut bare_sync = bare_sled(n, true);
    let mut ours_flush = repo_writes(n, false);
    let mut ours = repo_writes(n, true);
    let b50 = pct(&mut bare, 0.5);
    for (name, s, note) in [
        ("sled insert+flush, 200 B (floor)", &mut bare, ""),
        ("sled insert+flush+fdatasync, 200 B", &mut bare_sync, ""),
        (
            "tandem durable change, fsync off",
            &mut ours_flush,
            "flush as sled does",
        ),
        (
            "tandem durable change (default: fsync)",
            &mut ours,
            "flush + fdatasync",
        ),
    ] {
        let p50 = pct(s, 0.5);
        let p99 = pct(s, 0.99);
        row(
            name,
            format!("p50 {} / p99 {}", us(p50), us(p99)),
            &format!(
                "{note} ({:.2}× sled p50)",
                p50.as_secs_f64() / b50.as_secs_f64()
            ),
        );
    }
}

fn concurrent_writes() {
    for (writers, fsync) in [(8usize, true), (8, false)] {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = RepoOptions::new("bench").schema(schema());
        opts.store.fsync = fsync;
        let repo = Arc::new(Repo::open(dir.path(), opts).unwrap());
        let per = scaled(2500);
        let ids: Vec<_> = (0..writers)
            .map(|_| repo.create("note", json!({"title": "w"})).unwrap())
            .collect();
        let cpu0 = process_cpu();
        let t = Instant::now();
        let handles: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let repo = repo.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        repo.change(&id, |tx| tx.set("title", format!("title {i}")))
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let el = t.elapsed();
        let cpu = process_cpu() - cpu0;
        let total = writers * per;
        let (tickets, flushes) = repo.store().flush_counts();
        row(
            &format!(
                "group commit, {writers} writers, fsync {}",
                if fsync { "on" } else { "off" }
            ),
            format!("{:.0} changes/s", total as f64 / el.as_secs_f64()),
            &format!(
                "{total} durable changes in {}; {:.1} writes per flush; {} CPU per change",
                ms(el),
                tickets as f64 / flushes.max(1) as f64,
                us(cpu / total as u32)
            ),
        );
    }
}

fn open_to_first_read() {
    let docs = scaled(10_000);
    let dir = tempfile::tempdir().unwrap();
    let body: String = (0..10_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let first;
    {
        let mut opts = RepoOptions::new("bench").schema(schema());
        opts.store.fsync = false;
        let repo = Repo::open(dir.path(), opts).unwrap();
        let t = Instant::now();
        first = repo
            .create("note", json!({"title": "first", "data": body}))
            .unwrap();
        for i in 1..docs {
            repo.create("note", json!({"title": format!("n{i}"), "data": body}))
                .unwrap();
        }
        let size: u64 = walk_size(dir.path());
        row(
            "fill store",
            format!("{docs} docs, {:.0} MB on disk", size as f64 / 1e6),
            &format!("in {}", ms(t.elapsed())),
        );
    }
    for label in ["first open after heavy writing", "open when opened before"] {
        let t = Instant::now();
        let repo = Repo::open(dir.path(), RepoOptions::new("bench").schema(schema())).unwrap();
        let e = repo.get(&first).unwrap();
        let el = t.elapsed();
        assert_eq!(e.value["title"], "first");
        row(&format!("{label}: open + first read"), ms(el), "");
    }
}

fn walk_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        walk_size(&e.path())
                    } else {
                        m.len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn large_document() {
    // ~10 MB of history: many changes of pseudo-random text.
    let changes = scaled(10_000);
    let mut doc = automerge::AutoCommit::new();
    let text = {
        doc.put(automerge::ROOT, "_type", "note").unwrap();
        doc.put(automerge::ROOT, "_schema", 1u64).unwrap();
        doc.put_object(automerge::ROOT, "body", automerge::ObjType::Text)
            .unwrap()
    };
    doc.commit();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..changes {
        let chunk: String = (0..1000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect();
        let len = automerge::ReadDoc::length(&doc, &text);
        let at = (x as usize) % (len + 1);
        doc.splice_text(&text, at, 0, &chunk).unwrap();
        doc.commit();
    }
    let bytes = doc.save();
    let t = Instant::now();
    let loaded = automerge::Automerge::load(&bytes).unwrap();
    let am = t.elapsed();
    drop(loaded);

    let dir = tempfile::tempdir().unwrap();
    let id = tandem::DocId::generate();
    {
        let repo = Repo::open(dir.path(), RepoOptions::new("bench").schema(schema())).unwrap();
        repo.import(&id, &bytes).unwrap();
        repo.compact(&id).unwrap();
    }
    let repo = Repo::open(dir.path(), RepoOptions::new("bench").schema(schema())).unwrap();
    let t = Instant::now();
    let e = repo.get(&id).unwrap();
    let ours = t.elapsed();
    assert!(e.value["body"].as_str().unwrap().len() >= changes * 1000);
    row(
        &format!(
            "load a doc with {:.1} MB saved history ({changes} changes)",
            bytes.len() as f64 / 1e6
        ),
        format!("tandem {} / automerge load {}", ms(ours), ms(am)),
        &format!("{:.2}×", ours.as_secs_f64() / am.as_secs_f64()),
    );
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench` absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    println!("| measurement | figure | note |");
    println!("|---|---|---|");
    // TANDEM_BENCH_ONLY=writes,group,open,large picks sections (for profiling one of them).
    let only = std::env::var("TANDEM_BENCH_ONLY").unwrap_or_default();
    let on = |name: &str| only.is_empty() || only.split(',').any(|s| s == name);
    if on("writes") {
        single_writes();
    }
    if on("group") {
        concurrent_writes();
    }
    if on("open") {
        open_to_first_read();
    }
    if on("large") {
        large_document();
    }
}
