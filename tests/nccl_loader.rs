//! The NCCL loader without a GPU: stub `libnccl.so.2` libraries built here with `cc` (every
//! function of `NCCL_SYMBOLS` as a dummy returning ncclSuccess, `ncclGetVersion` reporting a
//! chosen version), searched for in temporary folders laid out as users have NCCL (a torch
//! wheel's `nvidia/nccl/lib`, a link, an old one first on the list). Found with the right path
//! and version; below the floor refused naming both versions; a stub lacking a symbol refused
//! naming it; nothing found lists every place tried. No test here is skipped: `cc` is part of
//! the set-up (scripts/setup.sh installs g++), and its absence fails the test with the command.
#![cfg(feature = "nccl")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, ensure, Context, Result};
use ulysses::device::{
    find_nccl, nccl_candidates, nccl_library, nccl_version_string, NcclCandidate, NCCL_FLOOR, NCCL_SYMBOLS,
};

/// A fresh folder under the system's temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ulysses-nccl-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds a stub NCCL at `out` (folders created) reporting `version`, without the functions in
/// `omit`. No SONAME, so that a stub never answers for `libnccl.so.2` by name in this process.
fn stub(out: &Path, version: i32, omit: &[&str]) -> Result<PathBuf> {
    let dir = out.parent().context("stub path without a folder")?;
    std::fs::create_dir_all(dir)?;
    let mut c = String::from("typedef struct ncclComm* ncclComm_t;\n");
    for name in NCCL_SYMBOLS.iter().filter(|n| !omit.contains(n)) {
        c += &match *name {
            "ncclGetVersion" => format!("int ncclGetVersion(int* v) {{ *v = {version}; return 0; }}\n"),
            "ncclGetErrorString" => "const char* ncclGetErrorString(int r) { return \"stub\"; }\n".into(),
            "ncclGetLastError" => "const char* ncclGetLastError(ncclComm_t c) { return \"\"; }\n".into(),
            other => format!("int {other}(void) {{ return 0; }}\n"),
        };
    }
    let src = out.with_extension("c");
    std::fs::write(&src, c)?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(out)
        .arg(&src)
        .status()
        .with_context(|| format!("running {cc} (a C compiler; scripts/setup.sh installs it)"))?;
    ensure!(status.success(), "{cc} -shared -fPIC -o {} {} failed: {status}", out.display(), src.display());
    Ok(out.to_path_buf())
}

fn file(path: &Path) -> NcclCandidate {
    NcclCandidate::File { path: path.to_path_buf(), from: "test".into() }
}

#[test]
fn version_codes_read_as_nccl_writes_them() {
    assert_eq!(nccl_version_string(21803), "2.18.3");
    assert_eq!(nccl_version_string(22800), "2.28.0");
    assert_eq!(nccl_version_string(21212), "2.12.12");
    assert_eq!(nccl_version_string(2708), "2.7.8"); // the encoding before 2.9
    assert_eq!(nccl_version_string(NCCL_FLOOR), "2.18.0");
}

/// The loaded torch's wheel: `<site-packages>/nvidia/nccl/lib/libnccl.so.2` beside
/// `<site-packages>/torch` is on the list right after an NCCL already loaded, before the
/// loader's search and the system's folders, and is found there with its version.
#[test]
fn a_torch_wheel_layout_points_at_its_nccl() -> Result<()> {
    let tmp = TempDir::new("wheel")?;
    let site = tmp.0.join("site-packages");
    let torch = site.join("torch");
    std::fs::create_dir_all(torch.join("lib"))?;
    let lib = stub(&site.join("nvidia/nccl/lib/libnccl.so.2"), 22805, &[])?;
    let homes = vec![("NCCL_HOME".to_string(), tmp.0.join("nccl-home"))];
    let list = nccl_candidates(Some(&torch), &homes);
    ensure!(list[0] == NcclCandidate::Loaded("libnccl.so.2".into()), "{list:?}");
    let at = |want: &dyn Fn(&NcclCandidate) -> bool| list.iter().position(want);
    let wheel = at(&|c| matches!(c, NcclCandidate::File { path, .. } if *path == lib)).context("no wheel")?;
    let search = at(&|c| *c == NcclCandidate::Search("libnccl.so.2".into())).context("no search")?;
    let home =
        at(&|c| matches!(c, NcclCandidate::File { from, .. } if from == "NCCL_HOME")).context("no home")?;
    let system =
        at(&|c| matches!(c, NcclCandidate::File { from, .. } if from == "system")).context("no system")?;
    ensure!(wheel == 1 && wheel < search && search < home && home < system, "order: {list:?}");
    ensure!(list.contains(&NcclCandidate::Search("libnccl.so".into())), "{list:?}");
    // Pure: the same inputs, the same list; and no place twice.
    ensure!(list == nccl_candidates(Some(&torch), &homes));
    let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
    let mut unique = shown.clone();
    unique.sort();
    unique.dedup();
    ensure!(unique.len() == shown.len(), "a place twice: {shown:?}");

    // The wheel's candidate alone (the real list would take an NCCL already loaded first).
    let found = find_nccl(&list[wheel..=wheel], NCCL_FLOOR)?;
    ensure!(found.path == lib.canonicalize()?, "found at {} not {}", found.path.display(), lib.display());
    ensure!(found.version == 22805 && found.version_string() == "2.28.5", "{found:?}");
    ensure!(found.found_by == list[wheel]);
    Ok(())
}

/// Stubs of 2.28 and 2.18 (the floor) are used, with their path and version.
#[test]
fn nccl_at_or_above_the_floor_is_found_with_path_and_version() -> Result<()> {
    let tmp = TempDir::new("found")?;
    for (version, text) in [(22800, "2.28.0"), (21800, "2.18.0")] {
        let lib = stub(&tmp.0.join(format!("v{version}/libnccl.so.2")), version, &[])?;
        let found = find_nccl(&[file(&lib)], NCCL_FLOOR)?;
        ensure!(found.path == lib.canonicalize()?, "{found:?}");
        ensure!(found.version == version && found.version_string() == text, "{found:?}");
        // The table is complete: ncclGetVersion through it reports the same.
        let mut v = 0;
        // SAFETY: the stub's ncclGetVersion writes one int.
        let r = unsafe { (found.api().get_version)(&mut v) };
        ensure!(r == 0 && v == version, "through the table: {r}, {v}");
    }
    Ok(())
}

/// The path reported is the real file (`dladdr`, links resolved), not the link on the list.
#[test]
fn the_path_reported_is_the_real_file() -> Result<()> {
    let tmp = TempDir::new("link")?;
    let lib = stub(&tmp.0.join("real/libnccl.so.2"), 22300, &[])?;
    let link = tmp.0.join("links/libnccl.so");
    std::fs::create_dir_all(link.parent().context("no parent")?)?;
    std::os::unix::fs::symlink(&lib, &link)?;
    let found = find_nccl(&[file(&link)], NCCL_FLOOR)?;
    ensure!(
        found.path == lib.canonicalize()?,
        "reported {} for a link to {}",
        found.path.display(),
        lib.display()
    );
    Ok(())
}

/// 2.12 is below the floor: refused naming 2.12 and 2.18, and how to get a usable NCCL.
#[test]
fn nccl_below_the_floor_is_refused_naming_both_versions() -> Result<()> {
    let tmp = TempDir::new("old")?;
    let lib = stub(&tmp.0.join("old/libnccl.so.2"), 21212, &[])?;
    let err = match find_nccl(&[file(&lib)], NCCL_FLOOR) {
        Ok(found) => bail!("NCCL 2.12 was accepted: {found:?}"),
        Err(e) => e.to_string(),
    };
    for part in [
        "NCCL 2.12.12 is older than 2.18.0",
        "the newest NCCL found is 2.12.12, older than 2.18.0",
        &lib.display().to_string(),
        "nvidia-nccl-cu12 or nvidia-nccl-cu13",
        "LD_LIBRARY_PATH",
    ] {
        ensure!(err.contains(part), "{part:?} missing from: {err}");
    }
    // The old one first on the list, a usable one after it: the usable one is taken.
    let new = stub(&tmp.0.join("new/libnccl.so.2"), 21901, &[])?;
    let found = find_nccl(&[file(&lib), file(&new)], NCCL_FLOOR)?;
    ensure!(found.version == 21901 && found.path == new.canonicalize()?, "{found:?}");
    Ok(())
}

/// A stub of 2.28 without ncclCommSplit (or without ncclGetVersion) is refused naming it.
#[test]
fn nccl_lacking_a_function_is_refused_naming_it() -> Result<()> {
    let tmp = TempDir::new("lacking")?;
    for missing in ["ncclCommSplit", "ncclSend", "ncclGetVersion"] {
        let lib = stub(&tmp.0.join(format!("{missing}/libnccl.so.2")), 22800, &[missing])?;
        let err = match find_nccl(&[file(&lib)], NCCL_FLOOR) {
            Ok(found) => bail!("a library lacking {missing} was accepted: {found:?}"),
            Err(e) => e.to_string(),
        };
        ensure!(err.contains(&format!("lacks {missing}")), "{err}");
        ensure!(err.contains(&lib.display().to_string()), "{err}");
    }
    Ok(())
}

/// Nothing usable anywhere: the error lists every place tried, in order, with why.
#[test]
fn nothing_found_lists_every_place_tried() -> Result<()> {
    let tmp = TempDir::new("none")?;
    let absent = tmp.0.join("site-packages/nvidia/nccl/lib/libnccl.so.2");
    let not_a_library = tmp.0.join("broken/libnccl.so.2");
    std::fs::create_dir_all(not_a_library.parent().context("no parent")?)?;
    std::fs::write(&not_a_library, "not an ELF file")?;
    let list = [
        NcclCandidate::Loaded("libnccl-ulysses-test-never-loaded.so.2".into()),
        file(&absent),
        file(&not_a_library),
        NcclCandidate::Search("libnccl-ulysses-test-nowhere.so.2".into()),
    ];
    let err = match find_nccl(&list, NCCL_FLOOR) {
        Ok(found) => bail!("found {found:?}"),
        Err(e) => e.to_string(),
    };
    let mut from = 0;
    for part in [
        "libnccl-ulysses-test-never-loaded.so.2 already loaded in this process: not loaded".to_string(),
        format!("{} (test): absent", absent.display()),
        format!("{} (test): ", not_a_library.display()),
        "libnccl-ulysses-test-nowhere.so.2 by the dynamic loader".to_string(),
    ] {
        let at =
            err[from..].find(&part).with_context(|| format!("{part:?} missing or out of order in: {err}"))?;
        from += at + part.len();
    }
    ensure!(err.contains("no usable NCCL (libnccl.so.2, version 2.18.0 or newer)"), "{err}");
    ensure!(!err.contains("the newest NCCL found"), "no version was found: {err}");
    Ok(())
}

/// This process's own NCCL: on a machine with one, found at a real file at or above the
/// floor; on one without (CI), the error names the places tried, torch's wheel and the loader's
/// search among them.
#[test]
fn the_process_nccl_is_found_or_every_place_is_named() -> Result<()> {
    match nccl_library() {
        Ok(lib) => {
            ensure!(lib.version >= NCCL_FLOOR, "{lib:?}");
            ensure!(lib.path.exists(), "{lib:?}: no such file");
        }
        Err(e) => {
            let err = e.to_string();
            println!("no NCCL on this machine, as a user would read it:\n{err}");
            for part in [
                "libnccl.so.2 already loaded in this process",
                "libnccl.so.2 by the dynamic loader",
                "(system)",
            ] {
                ensure!(err.contains(part), "{part:?} missing from: {err}");
            }
            if let Some(torch) = ulysses::device::loaded_libtorch() {
                let site = torch.dir.parent().context("torch folder without a parent")?;
                let wheel = site.join("nvidia/nccl/lib/libnccl.so.2");
                ensure!(err.contains(&wheel.display().to_string()), "torch's wheel missing from: {err}");
            }
            // The same error on every call (found once per process).
            ensure!(nccl_library().err().map(|e| e.to_string()) == Some(err));
        }
    }
    Ok(())
}
