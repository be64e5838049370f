//! Puts the git commit into the binary (`switchyard --version`), so a running proxy
//! says which build it is (`SWITCHYARD_COMMIT` overrides it, e.g. in a build from a
//! source tarball without `.git`; "unknown" when neither is there).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SWITCHYARD_COMMIT");
    let git = Path::new(".git");
    if git.is_dir() {
        // A new commit moves the branch's ref (or HEAD itself when detached).
        println!("cargo:rerun-if-changed=.git/HEAD");
        println!("cargo:rerun-if-changed=.git/packed-refs");
        if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
            if let Some(r) = head.trim().strip_prefix("ref: ") {
                println!("cargo:rerun-if-changed=.git/{r}");
            }
        }
    }
    let commit = std::env::var("SWITCHYARD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        });
    println!(
        "cargo:rustc-env=SWITCHYARD_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
