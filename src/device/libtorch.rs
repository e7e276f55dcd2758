//! Which libtorch this process loaded, against the one it was built for.
//!
//! tch 0.24 binds one libtorch version's C++ API (2.11.0); a binary carried to a GPU machine
//! loads whatever libtorch its `LD_LIBRARY_PATH` names, and another version fails late, in
//! obscure ways (a missing symbol at the first CUDA kernel, a different ABI). So a run checks
//! first: the version of the loaded `libtorch_cpu.so`, read from the files that ship beside it
//! (`version.py` in Python's torch, `build-version` in the libtorch zip), must equal the version
//! of the headers `build.rs` compiled against.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The libtorch version this binary was built against ("2.11.0").
pub const BUILT_LIBTORCH: &str = env!("ULYSSES_LIBTORCH_VERSION");

/// A libtorch installation: its folder, version and CUDA version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibtorchInfo {
    /// The folder holding `lib/` (Python's `site-packages/torch`, or the libtorch zip's root).
    pub dir: PathBuf,
    /// "2.11.0+cu130" as the installation names itself.
    pub version: String,
    /// The CUDA version it was built with ("13.0"), `None` for a CPU build or when unknown.
    pub cuda: Option<String>,
}

impl LibtorchInfo {
    /// The release without the local tag: "2.11.0" of "2.11.0+cu130".
    pub fn release(&self) -> &str {
        self.version.split('+').next().unwrap_or(&self.version)
    }
}

/// The version of the libtorch in `dir` (the folder holding `lib/`), from `version.py` (Python's
/// torch: `__version__ = '2.11.0+cu130'`, `cuda = '13.0'`) or `build-version` (libtorch zip).
pub fn version_of_libtorch_dir(dir: &Path) -> Option<LibtorchInfo> {
    let quoted = |line: &str, key: &str| -> Option<String> {
        let rest = line.strip_prefix(key)?.trim_start().strip_prefix('=')?.trim();
        let value = rest.trim_matches(|c| c == '\'' || c == '"');
        (!value.is_empty() && value != "None").then(|| value.to_string())
    };
    if let Ok(text) = std::fs::read_to_string(dir.join("version.py")) {
        let version = text.lines().find_map(|l| quoted(l, "__version__"))?;
        let cuda = text.lines().find_map(|l| quoted(l, "cuda"));
        return Some(LibtorchInfo { dir: dir.to_path_buf(), version, cuda });
    }
    let text = std::fs::read_to_string(dir.join("build-version")).ok()?;
    let version = text.trim().to_string();
    // "2.11.0+cu130": the CUDA version is in the local tag.
    let cuda = version.split_once("+cu").and_then(|(_, v)| {
        let (major, minor) = v.split_at(v.len().checked_sub(1)?);
        (!major.is_empty()).then(|| format!("{major}.{minor}"))
    });
    (!version.is_empty()).then(|| LibtorchInfo { dir: dir.to_path_buf(), version, cuda })
}

/// The libtorch this process has loaded: the folder of the mapped `libtorch_cpu.so` (Linux's
/// `/proc/self/maps`), and its version if the installation names it.
pub fn loaded_libtorch() -> Option<LibtorchInfo> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|path| Path::new(path).file_name().is_some_and(|n| n == "libtorch_cpu.so"))?;
    let dir = Path::new(lib).parent()?.parent()?;
    version_of_libtorch_dir(dir)
        .or_else(|| Some(LibtorchInfo { dir: dir.to_path_buf(), version: "unknown".into(), cuda: None }))
}

/// Refuses a loaded libtorch whose release differs from [`BUILT_LIBTORCH`], naming both and how
/// to fix it. An installation that does not name its version passes (nothing to compare).
pub fn check_libtorch() -> Result<Option<LibtorchInfo>> {
    let Some(info) = loaded_libtorch() else { return Ok(None) };
    check_libtorch_info(&info, BUILT_LIBTORCH)?;
    Ok(Some(info))
}

/// Refuses `info` unless its release is `built` (or it does not name one).
pub fn check_libtorch_info(info: &LibtorchInfo, built: &str) -> Result<()> {
    if info.version != "unknown" && info.release() != built {
        return Err(Error::Backend {
            backend: "libtorch",
            msg: format!(
                "this ulysses was built against libtorch {built} but loaded {} from {}; \
                 point LD_LIBRARY_PATH at a torch {built} (pip install torch=={built}) \
                 or rebuild against this one",
                info.version,
                info.dir.display()
            ),
        });
    }
    Ok(())
}
