//! The terminal note app (`examples/notes.rs`) driven through a real terminal: two instances
//! in tmux against the real relay binary, keys in with `send-keys`, screens out with
//! `capture-pane`. Every wait polls the screen for the text it expects, bounded in time.
//!
//! `cargo test` builds the example before it runs tests; a run of this binary alone needs
//! `cargo build --example notes` first. Screens are saved under the target folder
//! (`notes-app-screens/`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

fn notes_exe() -> PathBuf {
    let tandem = crate::cli::exe();
    let exe = tandem.parent().unwrap().join("examples").join("notes");
    assert!(
        exe.exists(),
        "{} is missing: `cargo test` builds it; alone, run `cargo build --example notes`",
        exe.display()
    );
    exe
}

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: String,
    shots: PathBuf,
}

impl Tmux {
    fn new() -> Tmux {
        let socket = format!("tandem-notes-{}", std::process::id());
        let shots = crate::cli::exe()
            .parent()
            .unwrap()
            .join("notes-app-screens");
        std::fs::create_dir_all(&shots).unwrap();
        Tmux { socket, shots }
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tmux runs");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Start the note app in a new 100x28 session called `name`.
    fn start(&self, name: &str, data: &Path, relay: &str, color: &str) {
        let command = format!(
            "{} --data {} --name {name} --color {color} --relay {relay} --reconnect-max-ms 300",
            notes_exe().display(),
            data.display()
        );
        self.cmd(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "100",
            "-y",
            "28",
            &command,
        ]);
        // Escape must reach the app at once, not wait to see whether a key follows.
        self.cmd(&["set-option", "-s", "escape-time", "0"]);
    }

    fn screen(&self, name: &str) -> String {
        self.cmd(&["capture-pane", "-p", "-t", name])
    }

    /// The screen with its colours, as escape sequences.
    fn screen_colours(&self, name: &str) -> String {
        self.cmd(&["capture-pane", "-e", "-p", "-t", name])
    }

    fn keys(&self, name: &str, keys: &[&str]) {
        for k in keys {
            self.cmd(&["send-keys", "-t", name, k]);
        }
    }

    fn type_text(&self, name: &str, text: &str) {
        self.cmd(&["send-keys", "-t", name, "-l", text]);
    }

    /// Poll `name`'s screen until `pred` holds; returns that screen.
    fn wait(&self, name: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.screen(name);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} on {name}'s screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(40));
        }
    }

    fn wait_text(&self, name: &str, text: &str) -> String {
        self.wait(name, text, |s| s.contains(text))
    }

    fn save(&self, file: &str, screen: &str) {
        std::fs::write(self.shots.join(file), screen).unwrap();
        println!("---- {file} ----\n{screen}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

/// The status line's first word: synced, syncing, pending or offline.
fn status_word(screen: &str) -> Option<String> {
    let line = screen.lines().find(|l| {
        l.contains("| online") || l.contains("| offline") || l.contains("| connecting")
    })?;
    line.split_whitespace().next().map(str::to_string)
}

struct Relay {
    child: Option<std::process::Child>,
    addr: std::net::SocketAddr,
    data: PathBuf,
}

impl Relay {
    fn start(data: PathBuf, listen: &str) -> Relay {
        let (child, addr) = crate::support::spawn_relay(&[
            "--listen".as_ref(),
            listen.as_ref(),
            "--insecure-no-auth".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
        ]);
        Relay {
            child: Some(child),
            addr,
            data,
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port and data.
    fn restart(&mut self) {
        self.stop();
        let mut again = Relay::start(self.data.clone(), &self.addr.to_string());
        self.child = again.child.take();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn two_note_apps_in_tmux_sync_show_status_and_settle_a_conflict() {
    if Command::new("tmux").arg("-V").output().is_err() {
        panic!("tmux is needed for this test (apt-get install tmux)");
    }
    notes_exe();
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(dir.path().join("relay"), "127.0.0.1:0");
    let url = format!("ws://{}", relay.addr);
    let t = Tmux::new();
    t.start("ada", &dir.path().join("ada"), &url, "ff5555");
    t.start("bob", &dir.path().join("bob"), &url, "55aaff");
    for who in ["ada", "bob"] {
        t.wait(who, "online and synced", |s| {
            s.contains("| online") && status_word(s).as_deref() == Some("synced")
        });
    }

    // Ada makes a note and types; Bob sees both, and Ada sees Bob's caret once he edits too.
    t.keys("ada", &["n"]);
    t.type_text("ada", "Groceries");
    t.keys("ada", &["Enter"]);
    t.wait_text("bob", "Groceries");
    t.keys("ada", &["Enter"]);
    t.wait_text("ada", "Editing");
    t.type_text("ada", "milk and eggs");
    t.wait_text("bob", "milk and eggs");
    t.keys("bob", &["Enter"]);
    t.wait_text("bob", "Editing");
    t.keys("bob", &["Home"]);
    let s = t.wait_text("ada", "Here: bob@0");
    t.save("1-ada-sees-bob.txt", &s);
    // Bob's caret is drawn in his colour (55aaff) on the character it sits before.
    let coloured = t.screen_colours("ada");
    assert!(
        coloured.contains("48;2;85;170;255mm"),
        "bob's caret in his colour on the 'm' of \"milk\":\n{coloured}"
    );
    t.save("1-bob-editing.txt", &t.screen("bob"));

    // The relay goes away: Ada's edit waits (pending), then syncs when it is back.
    relay.stop();
    t.wait("ada", "offline", |s| {
        s.contains("| offline") || s.contains("| connecting")
    });
    t.keys("ada", &["End"]);
    t.type_text("ada", " bread");
    let s = t.wait("ada", "pending", |s| {
        status_word(s).as_deref() == Some("pending")
    });
    t.save("2-ada-pending.txt", &s);
    let mut seen = vec!["pending".to_string()];
    relay.restart();
    let deadline = Instant::now() + WAIT;
    let mut syncing_screen = None;
    while seen.last().map(String::as_str) != Some("synced") {
        assert!(Instant::now() < deadline, "status went {seen:?}");
        let s = t.screen("ada");
        if let Some(w) = status_word(&s) {
            if seen.last() != Some(&w) {
                if w == "syncing" {
                    syncing_screen = Some(s.clone());
                }
                seen.push(w);
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let order: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .filter(|w| ["pending", "syncing", "synced"].contains(w))
        .collect();
    assert_eq!(
        order,
        ["pending", "syncing", "synced"],
        "status went {seen:?}"
    );
    t.save("3-ada-syncing.txt", &syncing_screen.unwrap());
    t.save("4-ada-synced.txt", &t.screen("ada"));
    t.wait_text("bob", "milk and eggs bread");
    // Presence is announced again after the reconnect: Ada sees Bob's caret again.
    t.wait_text("ada", "Here: bob@0");

    // Both rename the note while the relay is down: a conflict on the critical title.
    relay.stop();
    t.keys("ada", &["Escape"]);
    t.keys("bob", &["Escape"]);
    for (who, title) in [("ada", "Shop A"), ("bob", "Shop B")] {
        t.wait_text(who, "Enter edit");
        t.wait(who, "offline", |s| {
            s.contains("| offline") || s.contains("| connecting")
        });
        t.keys(who, &["t"]);
        t.wait_text(who, "title: _");
        t.type_text(who, title);
        t.keys(who, &["Enter"]);
        t.wait_text(who, &format!("Title: {title}"));
    }
    relay.restart();
    for who in ["ada", "bob"] {
        t.wait_text(who, "CONFLICT");
    }
    t.save("5-bob-conflict-flagged.txt", &t.screen("bob"));
    t.keys("ada", &["c"]);
    let s = t.wait("ada", "both versions", |s| {
        s.contains("Shop A") && s.contains("Shop B") && s.contains("by ada") && s.contains("by bob")
    });
    t.save("6-ada-conflict-screen.txt", &s);
    t.keys("ada", &["m"]);
    t.type_text("ada", "Shop A+B");
    t.keys("ada", &["Enter"]);
    let s = t.wait("bob", "the conflict settled", |s| {
        s.contains("Title: Shop A+B") && !s.contains("CONFLICT")
    });
    t.save("7-bob-settled.txt", &s);
    t.wait("ada", "settled at ada's", |s| !s.contains("CONFLICT"));
    t.keys("ada", &["q"]);
    t.keys("bob", &["q"]);
}
