//! PostgreSQL for the relay tests: each relay gets a schema of its own in the `test` database
//! (`search_path` in its URL), so parallel tests and reruns never share rows. Schemas older
//! than an hour (left by earlier runs) are dropped when the first one is made.
//!
//! `TANDEM_TEST_BACKEND=postgres` runs the relay sync tests (`wire::relay`) on PostgreSQL
//! instead of sled; `TANDEM_TEST_POSTGRES` overrides the server (default: 127.0.0.1:5432,
//! user postgres, database test).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn enabled() -> bool {
    std::env::var("TANDEM_TEST_BACKEND").is_ok_and(|v| v == "postgres")
}

fn base() -> String {
    std::env::var("TANDEM_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

/// Run SQL on the test database from a thread of its own (callers may be inside a runtime).
pub fn sql(statements: String) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&base(), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "these tests need PostgreSQL at {} (set TANDEM_TEST_POSTGRES): {e}",
                        base()
                    )
                });
            tokio::spawn(conn);
            client.batch_execute(&statements).await.unwrap();
        })
    })
    .join()
    .unwrap();
}

static CLEANED: std::sync::Once = std::sync::Once::new();

/// A URL whose tables live in schema `name` (made if missing).
pub fn url_for(name: &str) -> String {
    CLEANED.call_once(|| {
        let cutoff = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .saturating_sub(3600);
        sql(format!(
            "DO $$ DECLARE s text; BEGIN
               FOR s IN SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tandem_t_%'
                 AND split_part(nspname, '_', 3)::bigint < {cutoff}
               LOOP EXECUTE format('DROP SCHEMA %I CASCADE', s); END LOOP;
             END $$;"
        ));
    });
    sql(format!("CREATE SCHEMA IF NOT EXISTS {name}"));
    format!("{} options='-c search_path={name}'", base())
}

/// A fresh, empty schema's URL.
pub fn fresh() -> String {
    url_for(&name(rand::random::<u64>()))
}

/// The schema for a relay "folder" (a test that restarts a relay on the same data).
pub fn for_path(path: &std::path::Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    url_for(&name(h.finish()))
}

/// `tandem_t_<this process's start, unix seconds>_<tag>`: the same name for the same tag all
/// through one test run.
fn name(tag: u64) -> String {
    static STARTED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let secs = STARTED.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    });
    format!("tandem_t_{secs}_{tag:x}")
}
