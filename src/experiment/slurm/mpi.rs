//! Which of srun's MPI plugins starts the ranks (`srun --mpi=<plugin>`). OpenMPI's ranks wire
//! up through the PMI their OpenMPI was built with: PMIx (Slurm's `pmix`, `pmix_vN`) or PMI-2
//! (`pmi2`); `none` (and any other plugin) leaves `MPI_Init` without peers. Clusters differ:
//! some Slurm builds have no `pmix`, some OpenMPI builds no PMI-2 (Debian's). The choice is made
//! where srun runs, from what `srun --mpi=list` offers there, or the user's, checked against it.

use std::sync::OnceLock;

use crate::{Error, Result};

/// The environment variable with the plugin `ulysses submit --mpi` (or `[slurm] mpi`) asked
/// for: the sbatch script exports it and the driver inside the job reads it.
pub const MPI_ENV: &str = "ULYSSES_SRUN_MPI";

/// The plugins a `srun --mpi=list` text names, in its order, without repeats. Liberal about the
/// format: Slurm 22.05 prints a header, one `\tname` per line and "specific pmix plugin versions
/// available: pmix_v4"; older ones prefix each line with `srun: ` and name plugins `mpi/pmi2`;
/// a list after a colon may be separated by commas or spaces. Lines that are neither (headers,
/// errors) are skipped.
pub fn srun_mpi_plugins(listing: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for line in listing.lines() {
        let line = line.trim();
        let line = line.strip_prefix("srun:").map_or(line, str::trim);
        let words = match line.split_once(':') {
            // "specific pmix plugin versions available: pmix_v3,pmix_v4"; not "error: ...: ...".
            Some((head, tail)) => {
                let head = head.to_ascii_lowercase();
                let names_plugins = ["plugin", "mpi", "version", "type"].iter().any(|w| head.contains(w));
                if !names_plugins || head.contains("error") || tail.contains(':') {
                    continue;
                }
                tail
            }
            // One name alone on its line; a line of several words is a header.
            None if line.split_whitespace().count() == 1 => line,
            None => continue,
        };
        for word in words.split(|c: char| c == ',' || c.is_whitespace()) {
            let name = word.trim().trim_start_matches("mpi/");
            let plugin_like = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if plugin_like && !found.iter().any(|f| f == name) {
                found.push(name.to_string());
            }
        }
    }
    found
}

/// The version of a `pmix_vN` plugin name.
fn pmix_version(name: &str) -> Option<u32> {
    name.strip_prefix("pmix_v")?.parse().ok()
}

/// PMIx as this Slurm offers it: `pmix` (its default version), else its newest `pmix_vN`.
fn pmix_of(plugins: &[String]) -> Option<String> {
    if plugins.iter().any(|p| p == "pmix") {
        return Some("pmix".into());
    }
    plugins.iter().filter_map(|p| Some((pmix_version(p)?, p))).max().map(|(_, p)| p.clone())
}

/// The plugin srun should start OpenMPI's ranks with, from the text of `srun --mpi=list` and
/// the user's preference (`[slurm] mpi`, `ulysses submit --mpi`, `ULYSSES_SRUN_MPI`, or
/// Slurm's own `SLURM_MPI_TYPE`; `None` or "auto" to choose). Choosing prefers PMIx (`pmix`,
/// else the newest `pmix_vN`), then `pmi2`: what OpenMPI builds use. A preference must be one
/// of the listed plugins ("pmix" also takes a listed `pmix_vN`); a listing in which no plugin
/// can be read takes the preference at its word. Refused with what the listing offers.
pub fn choose_srun_mpi(listing: &str, preference: Option<&str>) -> Result<String> {
    let plugins = srun_mpi_plugins(listing);
    let offered = if plugins.is_empty() { "none that can be read".to_string() } else { plugins.join(", ") };
    let wanted = preference.map(|p| p.trim().trim_start_matches("mpi/").to_ascii_lowercase());
    match wanted.as_deref() {
        None | Some("" | "auto") => pmix_of(&plugins)
            .or_else(|| plugins.iter().find(|p| *p == "pmi2").cloned())
            .ok_or_else(|| Error::Backend {
                backend: "slurm",
                msg: format!(
                    "srun --mpi=list offers {offered}: none of pmix or pmi2, which OpenMPI's ranks need to \
                     find each other under srun. Ask for one it has ([slurm] mpi, ulysses submit --mpi, \
                     {MPI_ENV}), or start the ranks with mpirun (parallel.launcher = \"mpirun\")"
                ),
            }),
        Some(p) if plugins.is_empty() => Ok(p.to_string()),
        Some("pmix") => pmix_of(&plugins).ok_or_else(|| not_offered("pmix", &offered)),
        Some(p) if plugins.iter().any(|q| q == p) => Ok(p.to_string()),
        Some(p) => Err(not_offered(p, &offered)),
    }
}

fn not_offered(wanted: &str, offered: &str) -> Error {
    Error::InvalidArgument {
        op: "experiment config",
        group: "slurm.mpi".into(),
        msg: format!(
            "srun's MPI plugin {wanted:?} is not one this Slurm has (srun --mpi=list offers {offered}); \
             OpenMPI needs the one matching its PMI: pmix (any pmix_vN) or pmi2"
        ),
    }
}

/// What `srun --mpi=list` prints on this machine (stdout and stderr: older Slurm wrote the list
/// to stderr), run once per process; an error when srun cannot run.
pub fn srun_mpi_listing() -> Result<String> {
    static LISTING: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    LISTING
        .get_or_init(|| {
            let out = std::process::Command::new("srun")
                .arg("--mpi=list")
                .output()
                .map_err(|e| format!("cannot run srun --mpi=list ({e}): is Slurm's srun on PATH?"))?;
            let text =
                format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            if out.status.success() {
                Ok(text)
            } else {
                Err(format!("srun --mpi=list ended with {}: {}", out.status, text.trim()))
            }
        })
        .clone()
        .map_err(|msg| Error::Backend { backend: "slurm", msg })
}

/// The preference of this process's environment: `ULYSSES_SRUN_MPI` (the sbatch script's),
/// else Slurm's own `SLURM_MPI_TYPE` (which srun itself would take in place of `--mpi`).
pub fn srun_mpi_preference() -> Option<String> {
    [MPI_ENV, "SLURM_MPI_TYPE"].iter().find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
}

/// The plugin for srun on this machine: [`choose_srun_mpi`] over its `srun --mpi=list` and the
/// environment's preference.
pub fn srun_mpi() -> Result<String> {
    choose_srun_mpi(&srun_mpi_listing()?, srun_mpi_preference().as_deref())
}
