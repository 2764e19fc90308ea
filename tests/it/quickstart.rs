//! The README's quickstart, run as written against the built binary: the relay command from
//! its first block (on a free port), then its second block with bash.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn sh_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```sh") => current = Some(String::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap_or_default()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn the_readme_quickstart_works() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks = sh_blocks(&readme);
    let start = readme.find("## Quickstart").unwrap();
    let quick = sh_blocks(&readme[start..]);
    assert!(
        blocks.len() >= 3 && quick.len() >= 2,
        "README has the two opening commands and the quickstart"
    );
    assert!(
        blocks[0].contains("relay") && blocks[0].contains("cargo test"),
        "README opens with the relay and test commands"
    );
    let relay_cmd = quick[0].trim();
    let script = &quick[1];

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = crate::cli::exe();
    let bindir = bin.parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bindir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let relay_args: Vec<String> = relay_cmd
        .split_whitespace()
        .skip(1)
        .map(String::from)
        .chain(["--listen".to_string(), format!("127.0.0.1:{port}")])
        .collect();
    let mut relay = Command::new(&bin)
        .args(&relay_args)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(relay.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on"), "{line}");

    let script = script.replace("127.0.0.1:7878", &format!("127.0.0.1:{port}"));
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("TANDEM_DATA")
        .output()
        .unwrap();
    relay.kill().unwrap();
    relay.wait().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the quickstart failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("oat milk and eggs"),
        "text edits merged:\n{stdout}"
    );
    assert!(
        stdout.contains("title (critical)\n  1) "),
        "the conflict is shown:\n{stdout}"
    );
    assert!(
        stdout.contains("decided by bob"),
        "the history names who decided:\n{stdout}"
    );
    assert!(
        stdout.contains("\"title\": \"Groceries\""),
        "show --at prints the first version:\n{stdout}"
    );
    assert!(
        stdout.contains("body: at 0 +\"oat \"; at 8 +\" and eggs\""),
        "diff shows the text edits:\n{stdout}"
    );
}
