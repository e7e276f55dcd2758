//! Which NCCL this process uses, found where users have it and loaded once (cargo feature `nccl`).
//!
//! NCCL ships as `libnccl.so.2`: pip's `nvidia-nccl-cu12` / `nvidia-nccl-cu13` (the dependency of
//! pip's CUDA torch) put it in `site-packages/nvidia/nccl/lib`, and the distributions' `libnccl2`
//! in the system's library folder. cudarc 0.19 never tries that name (it tries `libnccl.so` and
//! `.so.13` ... `.so.9`, `.so.1`), and panics at a missing symbol, so this module loads NCCL
//! itself and resolves every function the backend calls into a table ([`NcclApi`]); cudarc's
//! NCCL *types* (plain bindgen types) are used, its functions never.
//!
//! The places, in order ([`nccl_candidates`], a pure function of its inputs):
//! 1. an NCCL already loaded in this process (`libtorch_cuda.so` links `libnccl.so.2`, so a CUDA
//!    torch brings its own): one NCCL per process, the one torch uses;
//! 2. the loaded torch's wheel: `<site-packages>/nvidia/nccl/lib/libnccl.so.2` beside
//!    `<site-packages>/torch`, and `lib/libnccl.so.2` of a libtorch folder;
//! 3. `libnccl.so.2`, then `libnccl.so`, by the dynamic loader's own search (`LD_LIBRARY_PATH`,
//!    `ld.so.cache`, the default folders);
//! 4. `lib64/` and `lib/` under `NCCL_HOME`, `NCCL_ROOT`, `CUDA_HOME` and `CUDA_PATH`, then the
//!    common system folders.
//!
//! The first candidate that loads, has every symbol of [`NCCL_SYMBOLS`] and reports a version of
//! at least [`NCCL_FLOOR`] is used ([`find_nccl`]); its real path (`dladdr` on one of its
//! functions, links resolved) and version are reported. When none does, the error lists every
//! place tried and why each was refused. [`nccl_library`] is the process-wide instance.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId,
};

use crate::{Error, Result};

/// The oldest NCCL this backend runs on, as NCCL encodes versions (`NCCL_VERSION(2, 18, 0)`):
/// `ncclCommSplit` is the newest function it calls (first in 2.18.1-1); non-blocking
/// communicators (`ncclConfig_t.blocking`), `ncclCommInitRankConfig` and `ncclCommFinalize`
/// came in 2.14, `ncclGetLastError` in 2.13, `ncclSend`/`ncclRecv` in 2.7.
pub const NCCL_FLOOR: i32 = 21800;

/// An NCCL result code as NCCL's functions return it: a C enum, taken as an integer so that a
/// code newer than cudarc's bindings (2.30 added `ncclTimeout`) is a value, not undefined
/// behaviour. [`result_name`] names it.
pub type NcclCode = c_uint;

/// `ncclSuccess` as an [`NcclCode`].
pub const NCCL_SUCCESS: NcclCode = ncclResult_t::ncclSuccess as NcclCode;
/// `ncclInProgress` as an [`NcclCode`]: a non-blocking communicator's work continues in the
/// background.
pub const NCCL_IN_PROGRESS: NcclCode = ncclResult_t::ncclInProgress as NcclCode;

/// The name of an NCCL result code ("ncclInvalidUsage"), or its number when this build does not
/// know it.
pub fn result_name(code: NcclCode) -> String {
    use ncclResult_t as R;
    let known = [
        R::ncclSuccess,
        R::ncclUnhandledCudaError,
        R::ncclSystemError,
        R::ncclInternalError,
        R::ncclInvalidArgument,
        R::ncclInvalidUsage,
        R::ncclRemoteError,
        R::ncclInProgress,
    ];
    match known.iter().find(|r| **r as NcclCode == code) {
        Some(r) => format!("{r:?}"),
        None if code == 8 => "ncclTimeout".into(),
        None => format!("ncclResult {code}"),
    }
}

/// "2.18.1" for NCCL's version code (`major * 10000 + minor * 100 + patch` since 2.9,
/// `major * 1000 + minor * 100 + patch` before).
pub fn nccl_version_string(code: i32) -> String {
    if code >= 20900 {
        format!("{}.{}.{}", code / 10000, code % 10000 / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code % 1000 / 100, code % 100)
    }
}

/// Declares the function table and the symbol list from one list of names and signatures.
macro_rules! nccl_api {
    ($($(#[doc = $doc:literal])* $field:ident = $name:literal: fn($($arg:ty),*) -> $ret:ty;)*) => {
        /// Every NCCL function the backend calls, resolved from one loaded library. Calling one is
        /// `unsafe`: each takes NCCL's own arguments, with NCCL's rules (a live communicator, a
        /// stream of the current context, ...).
        pub struct NcclApi {
            $($(#[doc = $doc])* pub $field: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        /// The names of every function in [`NcclApi`], as NCCL exports them.
        pub const NCCL_SYMBOLS: &[&str] = &[$($name),*];

        impl NcclApi {
            /// Looks every symbol up in `handle`; the names it lacks when some are missing.
            ///
            /// # Safety
            /// `handle` is a live handle from `dlopen` of an NCCL library (whose exported names
            /// have the signatures declared here).
            unsafe fn resolve(handle: *mut c_void) -> std::result::Result<NcclApi, Vec<&'static str>> {
                let mut missing = Vec::new();
                $(
                    // SAFETY: a live handle (the caller's contract) and a NUL-terminated name.
                    let $field = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
                    if $field.is_null() {
                        missing.push($name);
                    }
                )*
                if !missing.is_empty() {
                    return Err(missing);
                }
                Ok(NcclApi {
                    $(
                        // SAFETY: a non-null address of NCCL's exported function of this name,
                        // whose C signature is the one declared (nccl.h); the handle keeps it
                        // mapped while the table lives (`NcclLibrary` owns both).
                        $field: unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>($field)
                        },
                    )*
                })
            }
        }
    };
}

nccl_api! {
    /// `ncclGetVersion(int*)`.
    get_version = "ncclGetVersion": fn(*mut c_int) -> NcclCode;
    /// `ncclGetErrorString(ncclResult_t)`: a static string.
    get_error_string = "ncclGetErrorString": fn(NcclCode) -> *const c_char;
    /// `ncclGetLastError(ncclComm_t)`: NCCL's last error message (2.13).
    get_last_error = "ncclGetLastError": fn(ncclComm_t) -> *const c_char;
    /// `ncclGetUniqueId(ncclUniqueId*)`.
    get_unique_id = "ncclGetUniqueId": fn(*mut ncclUniqueId) -> NcclCode;
    /// `ncclCommInitRankConfig(comm*, nranks, id, rank, config*)` (2.14).
    comm_init_rank_config = "ncclCommInitRankConfig":
        fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t) -> NcclCode;
    /// `ncclCommSplit(comm, color, key, newcomm*, config*)` (2.18).
    comm_split = "ncclCommSplit": fn(ncclComm_t, c_int, c_int, *mut ncclComm_t, *mut ncclConfig_t) -> NcclCode;
    /// `ncclCommGetAsyncError(comm, ncclResult_t*)`.
    comm_get_async_error = "ncclCommGetAsyncError": fn(ncclComm_t, *mut NcclCode) -> NcclCode;
    /// `ncclCommCount(comm, int*)`: the communicator's size.
    comm_count = "ncclCommCount": fn(ncclComm_t, *mut c_int) -> NcclCode;
    /// `ncclCommUserRank(comm, int*)`: this rank in the communicator.
    comm_user_rank = "ncclCommUserRank": fn(ncclComm_t, *mut c_int) -> NcclCode;
    /// `ncclCommAbort(comm)`.
    comm_abort = "ncclCommAbort": fn(ncclComm_t) -> NcclCode;
    /// `ncclCommFinalize(comm)` (2.14).
    comm_finalize = "ncclCommFinalize": fn(ncclComm_t) -> NcclCode;
    /// `ncclCommDestroy(comm)`.
    comm_destroy = "ncclCommDestroy": fn(ncclComm_t) -> NcclCode;
    /// `ncclGroupStart()`.
    group_start = "ncclGroupStart": fn() -> NcclCode;
    /// `ncclGroupEnd()`.
    group_end = "ncclGroupEnd": fn() -> NcclCode;
    /// `ncclSend(buf, count, type, peer, comm, stream)` (2.7).
    send = "ncclSend": fn(*const c_void, usize, ncclDataType_t, c_int, ncclComm_t, cudaStream_t) -> NcclCode;
    /// `ncclRecv(buf, count, type, peer, comm, stream)` (2.7).
    recv = "ncclRecv": fn(*mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, cudaStream_t) -> NcclCode;
    /// `ncclAllReduce(send, recv, count, type, op, comm, stream)`.
    all_reduce = "ncclAllReduce":
        fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) -> NcclCode;
    /// `ncclReduceScatter(send, recv, recvcount, type, op, comm, stream)`.
    reduce_scatter = "ncclReduceScatter":
        fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) -> NcclCode;
    /// `ncclAllGather(send, recv, sendcount, type, comm, stream)`.
    all_gather = "ncclAllGather":
        fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, cudaStream_t) -> NcclCode;
}

/// One place where NCCL may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NcclCandidate {
    /// A library this process has already loaded under this name (`dlopen` with `RTLD_NOLOAD`).
    Loaded(String),
    /// A file, and what put it on the list ("torch's wheel", "NCCL_HOME", "system").
    File { path: PathBuf, from: String },
    /// A name the dynamic loader looks for itself (`LD_LIBRARY_PATH`, `ld.so.cache`, the
    /// default folders).
    Search(String),
}

impl fmt::Display for NcclCandidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NcclCandidate::Loaded(name) => write!(f, "{name} already loaded in this process"),
            NcclCandidate::File { path, from } => write!(f, "{} ({from})", path.display()),
            NcclCandidate::Search(name) => {
                write!(f, "{name} by the dynamic loader (LD_LIBRARY_PATH, ld.so.cache)")
            }
        }
    }
}

/// Where to look for NCCL, in order (see the module doc): `torch_dir` is the loaded torch's
/// folder (`site-packages/torch`, or a libtorch folder: `crate::device::loaded_libtorch()`),
/// `homes` the installation roots named by the environment (`(variable, folder)`:
/// `NCCL_HOME`, `CUDA_HOME`, ...). Pure: the same inputs give the same list, without touching
/// the file system. No place appears twice.
pub fn nccl_candidates(torch_dir: Option<&Path>, homes: &[(String, PathBuf)]) -> Vec<NcclCandidate> {
    const SONAME: &str = "libnccl.so.2";
    let file = |path: PathBuf, from: &str| NcclCandidate::File { path, from: from.to_string() };
    let mut out = vec![NcclCandidate::Loaded(SONAME.into())];
    if let Some(torch) = torch_dir {
        if let Some(site) = torch.parent() {
            // Both nvidia-nccl-cu12 and -cu13 install here (CUDA 13's other wheels moved to
            // nvidia/cu13/lib; NCCL did not).
            out.push(file(site.join("nvidia/nccl/lib").join(SONAME), "torch's wheel: nvidia-nccl"));
        }
        out.push(file(torch.join("lib").join(SONAME), "torch's lib folder"));
    }
    out.push(NcclCandidate::Search(SONAME.into()));
    out.push(NcclCandidate::Search("libnccl.so".into()));
    for (var, home) in homes {
        for lib in ["lib64", "lib"] {
            out.push(file(home.join(lib).join(SONAME), var));
        }
    }
    let arch = std::env::consts::ARCH;
    for dir in [
        format!("/usr/lib/{arch}-linux-gnu"),
        "/usr/lib64".into(),
        "/usr/lib".into(),
        "/usr/local/lib".into(),
        "/usr/local/cuda/lib64".into(),
        format!("/usr/local/cuda/targets/{arch}-linux/lib"),
    ] {
        out.push(file(Path::new(&dir).join(SONAME), "system"));
    }
    let mut seen = Vec::new();
    out.retain(|c| {
        let key = match c {
            NcclCandidate::File { path, .. } => path.display().to_string(),
            other => format!("{other:?}"),
        };
        let fresh = !seen.contains(&key);
        seen.push(key);
        fresh
    });
    out
}

/// The installation roots the environment names, for [`nccl_candidates`].
pub fn nccl_homes_from_env() -> Vec<(String, PathBuf)> {
    ["NCCL_HOME", "NCCL_ROOT", "CUDA_HOME", "CUDA_PATH"]
        .into_iter()
        .filter_map(|var| {
            let value = std::env::var_os(var)?;
            (!value.is_empty()).then(|| (var.to_string(), PathBuf::from(value)))
        })
        .collect()
}

/// A loaded NCCL: where it is, its version, how it was found, and its function table. The
/// library stays loaded while this lives (dropping it closes the handle; the process-wide one,
/// [`nccl_library`], lives until the process ends).
pub struct NcclLibrary {
    /// The file the functions come from (`dladdr`, links resolved).
    pub path: PathBuf,
    /// NCCL's version code (`ncclGetVersion`): 21803 for 2.18.3.
    pub version: i32,
    /// The place on the list that gave it.
    pub found_by: NcclCandidate,
    api: NcclApi,
    /// The `dlopen` handle, as an address (closed on drop).
    handle: usize,
}

impl fmt::Debug for NcclLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclLibrary")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("found_by", &self.found_by)
            .finish_non_exhaustive()
    }
}

impl NcclLibrary {
    /// "2.18.3".
    pub fn version_string(&self) -> String {
        nccl_version_string(self.version)
    }

    /// The resolved functions.
    pub fn api(&self) -> &NcclApi {
        &self.api
    }
}

impl Drop for NcclLibrary {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and is closed once, here; the function table,
        // the only user of its symbols, goes with this value.
        unsafe { libc::dlclose(self.handle as *mut c_void) };
    }
}

/// The dynamic loader's last error message.
fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated message owned by the loader, valid until
    // the next dl* call on this thread; copied at once.
    let text = unsafe { libc::dlerror() };
    if text.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (see above).
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    }
}

/// Opens one candidate: the handle, or why not.
fn open(candidate: &NcclCandidate) -> std::result::Result<*mut c_void, String> {
    let (name, flags) = match candidate {
        NcclCandidate::Loaded(name) => (name.clone(), libc::RTLD_NOW | libc::RTLD_NOLOAD),
        NcclCandidate::Search(name) => (name.clone(), libc::RTLD_NOW | libc::RTLD_LOCAL),
        NcclCandidate::File { path, .. } => {
            if !path.exists() {
                return Err("absent".into());
            }
            (path.display().to_string(), libc::RTLD_NOW | libc::RTLD_LOCAL)
        }
    };
    let c_name = CString::new(name.clone()).map_err(|_| format!("{name:?} contains a NUL byte"))?;
    // SAFETY: a NUL-terminated name; loading runs the library's initialisers, which is what
    // loading NCCL means.
    let handle = unsafe { libc::dlopen(c_name.as_ptr(), flags) };
    if !handle.is_null() {
        return Ok(handle);
    }
    match candidate {
        NcclCandidate::Loaded(_) => Err("not loaded".into()),
        _ => Err(dl_error()),
    }
}

/// The file that maps `addr` (`dladdr`), links resolved.
fn file_of(addr: *const c_void) -> Option<PathBuf> {
    // SAFETY: Dl_info is plain data that dladdr fills.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `addr` is a function address inside a loaded library; `info` is a valid place.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is the loader's NUL-terminated name of the object, alive while it is loaded.
    let name = unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned();
    let path = PathBuf::from(name);
    Some(std::fs::canonicalize(&path).unwrap_or(path))
}

/// Tries one candidate: the library, or why it was refused (and the version it reported).
fn try_candidate(
    candidate: &NcclCandidate,
    floor: i32,
) -> std::result::Result<NcclLibrary, (String, Option<i32>)> {
    let handle = open(candidate).map_err(|why| (why, None))?;
    let close = |why: String, version: Option<i32>| {
        // SAFETY: a handle from dlopen above, closed once on this refusal path.
        unsafe { libc::dlclose(handle) };
        Err((why, version))
    };
    // SAFETY: a live handle of a library that calls itself NCCL (it has that name); each
    // symbol is only looked up here.
    let resolved = unsafe { NcclApi::resolve(handle) };
    // SAFETY: as above; only this one name is looked up.
    let get_version = unsafe { libc::dlsym(handle, c"ncclGetVersion".as_ptr()) };
    let path =
        (!get_version.is_null()).then(|| file_of(get_version)).flatten().unwrap_or_else(|| match candidate {
            NcclCandidate::File { path, .. } => path.clone(),
            NcclCandidate::Loaded(name) | NcclCandidate::Search(name) => PathBuf::from(name),
        });
    // Where it is, in the reasons below, unless the candidate already says so.
    let at = match candidate {
        NcclCandidate::File { path: p, .. } if std::fs::canonicalize(p).ok().as_ref() == Some(&path) => {
            String::new()
        }
        _ => format!(" at {}", path.display()),
    };
    let version = if get_version.is_null() {
        None
    } else {
        // SAFETY: NCCL's `ncclResult_t ncclGetVersion(int*)`, resolved from this library.
        let f: unsafe extern "C" fn(*mut c_int) -> NcclCode = unsafe { std::mem::transmute(get_version) };
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid place for one int.
        let r = unsafe { f(&mut v) };
        if r != NCCL_SUCCESS {
            return close(format!("ncclGetVersion{at} failed ({})", result_name(r)), None);
        }
        Some(v)
    };
    match (version, resolved) {
        (Some(v), _) if v < floor => close(
            format!(
                "NCCL {}{at} is older than {}, the oldest this backend runs on",
                nccl_version_string(v),
                nccl_version_string(floor)
            ),
            Some(v),
        ),
        (v, Err(missing)) => close(
            format!(
                "{}{at} lacks {}",
                v.map_or("the library".to_string(), |v| format!("NCCL {}", nccl_version_string(v))),
                missing.join(", ")
            ),
            v,
        ),
        (None, Ok(_)) => close(format!("the library{at} has no ncclGetVersion"), None),
        (Some(version), Ok(api)) => {
            Ok(NcclLibrary { path, version, found_by: candidate.clone(), api, handle: handle as usize })
        }
    }
}

/// Loads the first of `candidates` that opens, has every function of [`NCCL_SYMBOLS`] and is
/// at least version `floor` (NCCL's code: [`NCCL_FLOOR`]). When none is, the error lists every
/// candidate with the reason it was refused, the newest version found (if any) against the
/// floor, and how to provide NCCL.
pub fn find_nccl(candidates: &[NcclCandidate], floor: i32) -> Result<NcclLibrary> {
    find(candidates, floor).map_err(|msg| Error::Backend { backend: "nccl", msg })
}

fn find(candidates: &[NcclCandidate], floor: i32) -> std::result::Result<NcclLibrary, String> {
    let mut tried = Vec::with_capacity(candidates.len());
    let mut newest: Option<i32> = None;
    for c in candidates {
        match try_candidate(c, floor) {
            Ok(lib) => return Ok(lib),
            Err((why, version)) => {
                newest = newest.max(version);
                tried.push(format!("{c}: {why}"));
            }
        }
    }
    let found = match newest {
        Some(v) if v < floor => format!(
            "the newest NCCL found is {}, older than {} (the oldest this backend runs on); ",
            nccl_version_string(v),
            nccl_version_string(floor)
        ),
        _ => String::new(),
    };
    Err(format!(
        "no usable NCCL (libnccl.so.2, version {} or newer): {found}tried, in order: [{}]. Use the NCCL that \
         ships with your CUDA torch (pip's torch installs nvidia-nccl-cu12 or nvidia-nccl-cu13 into \
         site-packages/nvidia/nccl/lib, found beside the loaded torch), or put the folder of a libnccl.so.2 \
         on LD_LIBRARY_PATH",
        nccl_version_string(floor),
        tried.join("; ")
    ))
}

/// The process's NCCL, found once (see the module doc) after loading libtorch's CUDA half (which
/// brings torch's own NCCL); every later call returns the same library or the same error.
pub fn nccl_library() -> Result<&'static NcclLibrary> {
    static LIB: OnceLock<std::result::Result<NcclLibrary, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        super::load_cuda();
        let torch = super::loaded_libtorch().map(|t| t.dir);
        find(&nccl_candidates(torch.as_deref(), &nccl_homes_from_env()), NCCL_FLOOR)
    })
    .as_ref()
    .map_err(|msg| Error::Backend { backend: "nccl", msg: msg.clone() })
}
