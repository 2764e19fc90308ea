//! Links the `tandem` binary's hot code together (release builds on Linux).
//!
//! `src/bin/relay-hot-code.ld` names the functions a relay runs (written by
//! `scripts/hot-code.py`); given to the linker, it places them side by side at the start of the
//! code, so the few pages a relay runs are not spread over the whole binary, each dragging its
//! page-cache folio into the relay's memory (docs/performance.md, "Relay RSS"). Only where the
//! order changes anything is it used: ELF targets, optimized builds. Set `TANDEM_PLAIN_LINK=1`
//! to link without it (a linker that takes no linker scripts, such as mold).

fn main() {
    const SCRIPT: &str = "src/bin/relay-hot-code.ld";
    println!("cargo:rerun-if-changed={SCRIPT}");
    println!("cargo:rerun-if-env-changed=TANDEM_PLAIN_LINK");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let plain = std::env::var_os("TANDEM_PLAIN_LINK").is_some_and(|v| !v.is_empty() && v != "0");
    if !linux || !release || plain {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let script = std::path::Path::new(&dir).join(SCRIPT);
    if script.exists() {
        println!(
            "cargo:rustc-link-arg-bin=tandem=-Wl,-T,{}",
            script.display()
        );
    }
}
