//! Starting P processes with OpenMPI's `mpirun`, with the flags this kind of machine needs:
//! `--allow-run-as-root` when running as root (containers, CI), `--oversubscribe` when there are
//! more ranks than cores, `--tag-output` so that every line says which rank wrote it. Slurm
//! users start the same binaries with `srun` instead; nothing here is needed then.

use std::path::Path;
use std::process::Command;

/// An `mpirun` command that starts `n` copies of `program` with `args`.
pub fn mpirun_command(n: usize, program: &Path, args: &[String]) -> Command {
    mpirun_command_with(n, program, args, &[])
}

/// [`mpirun_command`] with more mpirun options (`--hostfile`, `--map-by`, ...) before `-n`.
pub fn mpirun_command_with(n: usize, program: &Path, args: &[String], options: &[String]) -> Command {
    let mut cmd = Command::new("mpirun");
    // The effective user id is the second number of /proc's Uid line; root is 0.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        cmd.arg("--allow-run-as-root");
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    if n > cores {
        cmd.arg("--oversubscribe");
    }
    cmd.args(options).args(["--tag-output", "-n", &n.to_string()]).arg(program).args(args);
    cmd
}

/// Rewrites OpenMPI's `--tag-output` prefix `[job,rank]<stdout>:` as `[rank r] `; other lines
/// pass unchanged. Returns the rank too.
pub fn untag(line: &str) -> (Option<usize>, String) {
    let parsed = line.strip_prefix('[').and_then(|rest| {
        let (ids, tail) = rest.split_once(']')?;
        let rank = ids.split(',').nth(1)?.trim().parse::<usize>().ok()?;
        let body = tail.strip_prefix("<stdout>:").or_else(|| tail.strip_prefix("<stderr>:"))?;
        Some((rank, body.to_string()))
    });
    match parsed {
        Some((rank, body)) => (Some(rank), format!("[rank {rank}] {body}")),
        None => (None, line.to_string()),
    }
}
