//! Links the `tandem` binary's hot code together (optimized builds for Linux).
//!
//! `src/bin/relay-hot-code.ld` names the functions a relay runs (written by
//! `scripts/hot-code.py`); given to the linker, it places them side by side at the start of the
//! code, so the few pages a relay runs are not spread over the whole binary, each dragging its
//! page-cache folio into the relay's memory (docs/performance.md, "Targets", relay RSS). Used
//! where the order matters: a Linux target and the release profile (or one that inherits from
//! it, such as `bench`). GNU ld and LLD take the script; mold and gold do not, so it is left
//! out when the flags ask for either, and `TANDEM_PLAIN_LINK=1` leaves it out for any other
//! linker.

fn main() {
    const SCRIPT: &str = "src/bin/relay-hot-code.ld";
    println!("cargo:rerun-if-changed={SCRIPT}");
    println!("cargo:rerun-if-env-changed=TANDEM_PLAIN_LINK");
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let linux = env("CARGO_CFG_TARGET_OS") == "linux";
    let release = env("PROFILE") == "release";
    let plain = !matches!(env("TANDEM_PLAIN_LINK").as_str(), "" | "0");
    if !linux || !release || plain {
        return;
    }
    let linker = format!("{} {}", env("CARGO_ENCODED_RUSTFLAGS"), env("RUSTC_LINKER"));
    if ["mold", "gold"].iter().any(|l| linker.contains(l)) {
        println!(
            "cargo:warning=linking without {SCRIPT}: the configured linker takes no such script"
        );
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let script = std::path::Path::new(&dir).join(SCRIPT);
    if script.exists() {
        // -Xlinker passes each word as it is, commas in the path included.
        for arg in ["-Xlinker", "-T", "-Xlinker", &script.display().to_string()] {
            println!("cargo:rustc-link-arg-bin=tandem={arg}");
        }
    }
}
