//! Puts the git commit into the binary (`switchyard --version`, `/status`), so a running
//! proxy says which build it is (`SWITCHYARD_COMMIT` overrides it, e.g. in a build from
//! a source tarball without `.git`; "unknown" when neither is there).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=SWITCHYARD_COMMIT");
    // A new commit moves the branch's ref (or HEAD itself when detached). Asked of git,
    // so that a linked worktree (where `.git` is a file) is followed too.
    // (Only files that exist: a missing one would rerun this at every build.)
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let paths = ["HEAD", "packed-refs"]
        .into_iter()
        .map(str::to_string)
        .chain(branch)
        .filter_map(|p| git(&["rev-parse", "--git-path", &p]));
    for path in paths.filter(|p| std::path::Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
    let commit = std::env::var("SWITCHYARD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    println!(
        "cargo:rustc-env=SWITCHYARD_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
