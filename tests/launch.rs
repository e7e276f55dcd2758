//! Launching processes for real clusters, checked without a GPU: where a process sits and which
//! GPU it drives from each launcher's variables (mpirun, mpirun inside a Slurm job, srun, a
//! PMIx launcher inside a job), the refusals made before anything starts (ranks sharing a GPU,
//! more ranks per node than GPUs, MPI with CUDA, NCCL without a driver or with another
//! libtorch), the launch commands, srun's MPI plugin chosen from `srun --mpi=list` texts of
//! several Slurm versions, the sbatch script of a 2-node x 8-GPU config (with its CPUs per rank
//! from `sinfo` texts or the default), and, for following a job politely, the backing-off
//! schedule, a job's record saved and loaded, and the job states `scontrol` and `sacct` write.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use ulysses::comm::{check_distinct_gpus, choose_gpu, process_place, LauncherEnv};
use ulysses::device::{check_libtorch_info, loaded_libtorch, version_of_libtorch_dir, BUILT_LIBTORCH};
use ulysses::experiment::slurm::{
    allocation, allocation_on, choose_srun_mpi, node_shapes, sbatch_script, sbatch_script_for,
    srun_mpi_plugins, Backoff, JobOutcome, JobPaths, JobStatus, NodeShape, Polling, SubmittedJob,
    CPUS_PER_GPU_RANK,
};
use ulysses::experiment::{ExperimentConfig, LaunchPlan, Launcher, SlurmSpec};

fn env(pairs: &[(&str, &str)]) -> LauncherEnv {
    LauncherEnv::from_pairs(pairs)
}

#[test]
fn each_launcher_gives_the_rank_and_local_rank_it_should() -> Result<()> {
    // mpirun: OpenMPI's variables.
    let p = process_place(&env(&[
        ("OMPI_COMM_WORLD_RANK", "5"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
        ("PMIX_RANK", "5"),
    ]))
    .expect("a place");
    ensure!((p.rank, p.local_rank, p.local_size) == (5, Some(1), Some(4)), "{p:?}");
    // mpirun inside a Slurm batch job: every rank inherits the batch step's SLURM_PROCID=0 and
    // SLURM_LOCALID=0; OpenMPI's variables must win.
    for r in 0..4usize {
        let (rank, local) = (r.to_string(), (r % 2).to_string());
        let p = process_place(&env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_JOB_ID", "77"),
            ("PMIX_RANK", &rank),
            ("OMPI_COMM_WORLD_RANK", &rank),
            ("OMPI_COMM_WORLD_LOCAL_RANK", &local),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ]))
        .expect("a place");
        ensure!(
            p.rank == r && p.local_rank == Some(r % 2) && p.source == "OMPI_COMM_WORLD_*",
            "rank {r}: {p:?}"
        );
    }
    // srun --mpi=pmix: Slurm's variables agree with PMIx's; the local size comes from the step's
    // tasks per node ("4(x2)": 4 on each of 2 nodes; this is node 1).
    let p = process_place(&env(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_LOCALID", "1"),
        ("PMIX_RANK", "5"),
        ("SLURM_NODEID", "1"),
        ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
    ]))
    .expect("a place");
    ensure!((p.rank, p.local_rank, p.local_size) == (5, Some(1), Some(4)), "{p:?}");
    let uneven = env(&[
        ("SLURM_PROCID", "9"),
        ("SLURM_LOCALID", "1"),
        ("PMIX_RANK", "9"),
        ("SLURM_NODEID", "2"),
        ("SLURM_STEP_TASKS_PER_NODE", "4(x2),2"),
    ]);
    ensure!(process_place(&uneven).and_then(|p| p.local_size) == Some(2), "the last node holds 2 tasks");
    // A PMIx launcher inside a Slurm job: Slurm's variables are the batch step's; the local rank
    // is unknown (bind_gpu then counts the ranks on the host).
    let p = process_place(&env(&[("PMIX_RANK", "3"), ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")]))
        .expect("a place");
    ensure!(p.rank == 3 && p.local_rank.is_none() && p.source == "PMIX_RANK", "{p:?}");
    // srun without PMIx: Slurm's own.
    let p = process_place(&env(&[("SLURM_PROCID", "2"), ("SLURM_LOCALID", "2")])).expect("a place");
    ensure!((p.rank, p.local_rank) == (2, Some(2)), "{p:?}");
    // A process started alone.
    ensure!(process_place(&env(&[])).is_none(), "no launcher, no place");
    Ok(())
}

#[test]
fn gpus_are_chosen_per_local_rank_and_shared_gpus_are_refused() -> Result<()> {
    ensure!(choose_gpu(3, 8, 8, "n1")? == 3, "8 ranks on 8 GPUs: cuda:local_rank");
    ensure!(choose_gpu(0, 1, 8, "n1")? == 0, "one rank on 8 GPUs");
    // Slurm's --gpus-per-task: each process sees its own single GPU as cuda:0.
    ensure!(choose_gpu(5, 8, 1, "n1")? == 0, "one visible GPU per process");
    let err = choose_gpu(2, 8, 4, "n1").expect_err("8 ranks on 4 GPUs").to_string();
    ensure!(err.contains("8 ranks run on this node but it has 4 GPUs") && err.contains("host n1"), "{err}");
    let err = choose_gpu(0, 2, 0, "n1").expect_err("no GPU").to_string();
    ensure!(err.contains("no CUDA device is visible"), "{err}");

    let gpu = |h: &str, b: &str| (h.to_string(), b.to_string());
    check_distinct_gpus(&[gpu("n1", "0000:3B:00.0"), gpu("n1", "0000:5E:00.0"), gpu("n2", "0000:3B:00.0")])?;
    // Two processes on a one-GPU machine both see cuda:0: the same bus id on the same host.
    let err = check_distinct_gpus(&[gpu("vm", "0000:00:05.0"), gpu("vm", "0000:00:05.0")])
        .expect_err("two ranks on one GPU")
        .to_string();
    ensure!(
        err.contains("ranks 0 and 1 both drive the GPU at PCI 0000:00:05.0 on host vm")
            && err.contains("2 ranks on that host share 1 GPU"),
        "{err}"
    );
    Ok(())
}

fn args(cmd: &std::process::Command) -> Vec<String> {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn launch_plans_place_ranks_and_refuse_what_cannot_start() -> Result<()> {
    let program = Path::new("/bin/ulysses");
    let rest = ["run-point".to_string()];
    // mpirun on this machine: every rank here; more ranks than GPUs refused.
    let plan = LaunchPlan::new(4, Launcher::Auto, None, None, &env(&[]))?;
    ensure!(plan.launcher == Launcher::Mpirun && plan.ranks_per_node == Some(4), "{plan:?}");
    let a = args(&plan.command(program, &rest));
    ensure!(a[0] == "mpirun" && a.windows(2).any(|w| w == ["-n", "4"]) && a.ends_with(&rest), "{a:?}");
    plan.check_gpus(4)?;
    let err = LaunchPlan::new(2, Launcher::Auto, None, None, &env(&[]))?
        .check_gpus(1)
        .expect_err("2 on 1")
        .to_string();
    ensure!(err.contains("2 ranks at 2 per node need 2 GPUs per node, but this node has 1"), "{err}");
    let err =
        LaunchPlan::new(8, Launcher::Mpirun, Some(4), None, &env(&[])).expect_err("no hostfile").to_string();
    ensure!(err.contains("hostfile"), "{err}");
    // With a hostfile: mpirun places 4 per node.
    let plan = LaunchPlan::new(8, Launcher::Mpirun, Some(4), Some(Path::new("/etc/hosts.mpi")), &env(&[]))?;
    let a = args(&plan.command(program, &rest));
    ensure!(
        a.windows(2).any(|w| w == ["--hostfile", "/etc/hosts.mpi"])
            && a.windows(2).any(|w| w == ["--map-by", "ppr:4:node"]),
        "{a:?}"
    );

    // Inside a 4-node allocation of 8 tasks per node: srun, ranks packed 8 per node, with the
    // MPI plugin chosen (`LaunchPlan::new` asks this machine's srun; `placed` asks nothing).
    let job = env(&[("SLURM_JOB_ID", "42"), ("SLURM_JOB_NUM_NODES", "4"), ("SLURM_NTASKS_PER_NODE", "8")]);
    let plan = LaunchPlan::placed(32, Launcher::Auto, None, None, &job)?;
    ensure!(
        plan.launcher == Launcher::Srun && plan.ranks_per_node == Some(8) && plan.nodes() == Some(4),
        "{plan:?}"
    );
    let a = args(&plan.command(program, &rest));
    ensure!(!a.iter().any(|x| x.starts_with("--mpi")), "no plugin chosen: the cluster's default {a:?}");
    let plan = plan.with_srun_mpi("pmi2".into());
    let a = args(&plan.command(program, &rest));
    for w in [
        ["srun", "--mpi=pmi2"],
        ["--mpi=pmi2", "--label"],
        ["-n", "32"],
        ["--ntasks-per-node", "8"],
        ["-N", "4"],
    ] {
        ensure!(a.windows(2).any(|x| x == w), "{w:?} missing from {a:?}");
    }
    plan.check_gpus(8)?;
    let small = LaunchPlan::placed(8, Launcher::Auto, None, None, &job)?;
    ensure!(small.nodes() == Some(1), "8 ranks fit one node: {small:?}");
    let err = LaunchPlan::placed(32, Launcher::Auto, Some(4), None, &job).expect_err("8 nodes").to_string();
    ensure!(err.contains("32 ranks at 4 per node need 8 nodes; the Slurm allocation has 4"), "{err}");
    let a = args(&LaunchPlan::new(16, Launcher::Mpirun, None, None, &job)?.command(program, &rest));
    ensure!(a[0] == "mpirun" && a.windows(2).any(|w| w == ["--map-by", "ppr:8:node"]), "{a:?}");
    // Output lines carry their rank, from either launcher.
    ensure!(plan.untag(" 3: step 2") == (Some(3), "[rank 3] step 2".into()), "srun label");
    ensure!(plan.untag("no label") == (None, "no label".into()), "srun unlabelled");
    let mpirun = LaunchPlan::new(2, Launcher::Mpirun, None, None, &env(&[]))?;
    ensure!(mpirun.untag("[1,1]<stdout>:hello") == (Some(1), "[rank 1] hello".into()), "mpirun tag");
    Ok(())
}

fn config(backend: &str, device: &str, ranks: &str) -> String {
    format!(
        "name = \"e2_dense_7b_paper\"\n[model]\npreset = \"6.7b\"\n[parallel]\nranks = {ranks}\n\
         strategies = [\"ulysses\", \"ring_zigzag\"]\nbackend = \"{backend}\"\ndevice = \"{device}\"\n\
         [train]\ndtype = \"bf16\"\nseq = [32768]\nsteps = 10\nwarmup = 2\n"
    )
}

#[test]
fn the_sbatch_script_of_a_2_node_by_8_gpu_config() -> Result<()> {
    let cfg = ExperimentConfig::parse(&config("nccl", "cuda", "[8, 16]"), "e2.toml")?;
    let spec = SlurmSpec {
        gpus_per_node: Some(8),
        time: Some("02:00:00".into()),
        partition: Some("gpu".into()),
        account: Some("lab".into()),
        setup: vec!["module load cuda/13.0".into()],
        ..SlurmSpec::default()
    };
    let a = allocation(&cfg, &spec)?;
    ensure!((a.nodes, a.tasks_per_node, a.gpus_per_node) == (2, 8, 8), "{a:?}");
    let paths = JobPaths {
        program: "/opt/ulysses/bin/ulysses".into(),
        base: "/home/u/exp".into(),
        dir: "/home/u/exp/results/e2".into(),
        config: "/home/u/exp/results/e2/slurm/config.toml".into(),
    };
    let script = sbatch_script(&cfg, &spec, &paths, false)?;
    let want = [
        "#!/bin/bash\n",
        "#SBATCH --job-name=ulysses-e2_dense_7b_paper\n",
        "#SBATCH --nodes=2\n",
        "#SBATCH --ntasks-per-node=8\n",
        "#SBATCH --gpus-per-node=8\n",
        "#SBATCH --time=02:00:00\n",
        "#SBATCH --partition=gpu\n",
        "#SBATCH --account=lab\n",
        "#SBATCH --output=/home/u/exp/results/e2/slurm/%j.out\n",
        "cd '/home/u/exp'\nmodule load cuda/13.0\n",
        "exec '/opt/ulysses/bin/ulysses' run '/home/u/exp/results/e2/slurm/config.toml' --output '/home/u/exp/results/e2'\n",
    ];
    for line in want {
        ensure!(script.contains(line), "{line:?} missing from:\n{script}");
    }
    ensure!(!script.contains("--overcommit") && !script.contains("--resume"), "{script}");
    ensure!(
        sbatch_script(&cfg, &spec, &paths, true)?.contains("--output '/home/u/exp/results/e2' --resume\n"),
        "resume"
    );
    // What cannot work is refused before submitting.
    let err = allocation(&cfg, &SlurmSpec { tasks_per_node: Some(16), ..spec.clone() })
        .expect_err("2 per GPU")
        .to_string();
    ensure!(err.contains("16 ranks per node on 8 GPUs per node: two ranks would share a GPU"), "{err}");
    let err =
        allocation(&cfg, &SlurmSpec { nodes: Some(1), ..spec.clone() }).expect_err("too small").to_string();
    ensure!(err.contains("the largest point has 16 ranks, but 1 node(s) x 8 tasks hold 8"), "{err}");
    let err = allocation(&cfg, &SlurmSpec { gpus_per_node: Some(0), ..spec.clone() })
        .expect_err("no GPUs")
        .to_string();
    ensure!(err.contains("ask for GPUs"), "{err}");
    // Without GPUs per node, one per rank a node holds, at most 8: a 2-rank job asks for 2
    // (not 8 with 6 idle), 16 ranks for 2 nodes of 8, 4 ranks per node for 4.
    let two = ExperimentConfig::parse(&config("nccl", "cuda", "[2]"), "e2.toml")?;
    let plain = SlurmSpec::default();
    let a = allocation(&two, &plain)?;
    ensure!((a.nodes, a.tasks_per_node, a.gpus_per_node) == (1, 2, 2), "2 ranks: {a:?}");
    let a = allocation(&cfg, &plain)?;
    ensure!((a.nodes, a.tasks_per_node, a.gpus_per_node) == (2, 8, 8), "16 ranks: {a:?}");
    let a = allocation(&cfg, &SlurmSpec { tasks_per_node: Some(4), ..plain.clone() })?;
    ensure!((a.nodes, a.tasks_per_node, a.gpus_per_node) == (4, 4, 4), "4 per node: {a:?}");
    // CPU ranks ask for no GPUs.
    let cpu = ExperimentConfig::parse(&config("mpi", "cpu", "[4]"), "cpu.toml")?;
    let script = sbatch_script(&cpu, &SlurmSpec { overcommit: true, ..SlurmSpec::default() }, &paths, false)?;
    ensure!(
        !script.contains("--gpus-per-node")
            && script.contains("#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=4\n")
            && script.contains("--overcommit"),
        "{script}"
    );
    Ok(())
}

#[test]
fn gpu_configs_that_cannot_run_are_refused_before_anything_starts() -> Result<()> {
    let err =
        ExperimentConfig::parse(&config("mpi", "cuda", "[2]"), "t").expect_err("mpi + cuda").to_string();
    ensure!(err.contains("parallel.device") && err.contains("the mpi backend moves CPU tensors"), "{err}");
    let err =
        ExperimentConfig::parse(&config("nccl", "cpu", "[2]"), "t").expect_err("nccl + cpu").to_string();
    ensure!(err.contains("backend = \"nccl\" moves CUDA tensors"), "{err}");
    let local =
        config("local", "cpu", "[2]").replace("device = \"cpu\"", "device = \"cpu\"\nranks_per_node = 2");
    let err = ExperimentConfig::parse(&local, "t").expect_err("placement of threads").to_string();
    ensure!(err.contains("parallel.launcher") && err.contains("need backend"), "{err}");

    // NCCL on a machine without the NVIDIA driver: refused at the check, naming what is missing,
    // before any folder is made or process started.
    let nccl = ExperimentConfig::parse(&config("nccl", "cuda", "[2]"), "t")?;
    let gpu_machine = ulysses::device::load_cuda();
    let dir = std::env::temp_dir().join(format!("ulysses-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let opts = ulysses::experiment::RunOptions {
        resume: false,
        base_dir: dir.clone(),
        program: Some("/bin/false".into()),
    };
    match ulysses::experiment::run(&nccl, &opts) {
        Err(e) if !gpu_machine => {
            let e = e.to_string();
            ensure!(
                e.contains("parallel.backend") && (e.contains("libcuda.so") || e.contains("`nccl` feature")),
                "{e}"
            );
            ensure!(std::fs::read_dir(&dir)?.next().is_none(), "a refused run made a folder");
        }
        // A machine with a GPU: the checks pass and the launcher starts /bin/false as every rank,
        // which ends with status 1, or they refuse for this machine's own reason (no mpirun, or
        // fewer GPUs than ranks), naming the field; any other error is wrong.
        Err(e) => {
            let e = e.to_string();
            let launched = e.contains("ended with exit status");
            let refused = e.contains("parallel.backend") || e.contains("parallel.ranks");
            ensure!(launched || refused, "on a GPU machine, neither the ranks' failure nor a refusal: {e}");
        }
        Ok(_) => anyhow::bail!("a run with /bin/false as every rank succeeded"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn the_loaded_libtorch_is_the_one_built_against_and_another_is_refused() -> Result<()> {
    let loaded = loaded_libtorch().expect("libtorch_cpu.so is mapped");
    ensure!(loaded.release() == BUILT_LIBTORCH, "loaded {loaded:?}, built {BUILT_LIBTORCH}");
    let dir = std::env::temp_dir().join(format!("ulysses-libtorch-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("version.py"),
        "__version__ = '2.10.0+cu128'\ndebug = False\ncuda: Optional[str] = '12.8'\ncuda = '12.8'\n",
    )?;
    let other = version_of_libtorch_dir(&dir).expect("a version");
    ensure!(other.version == "2.10.0+cu128" && other.cuda.as_deref() == Some("12.8"), "{other:?}");
    let err = check_libtorch_info(&other, "2.11.0").expect_err("2.10 vs 2.11").to_string();
    ensure!(
        err.contains("built against libtorch 2.11.0 but loaded 2.10.0+cu128")
            && err.contains("torch==2.11.0"),
        "{err}"
    );
    check_libtorch_info(&other, "2.10.0")?;
    std::fs::remove_file(dir.join("version.py"))?;
    std::fs::write(dir.join("build-version"), "2.11.0+cu130\n")?;
    let zip = version_of_libtorch_dir(&dir).expect("a version");
    ensure!(zip.version == "2.11.0+cu130" && zip.cuda.as_deref() == Some("13.0"), "{zip:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `srun --mpi=list` as Slurm 22.05 prints it (this machine's single-node Slurm).
const LIST_22_05: &str = "MPI plugin types are...\n\tpmix\n\tnone\n\tcray_shasta\n\tpmi2\n\
                          specific pmix plugin versions available: pmix_v4\n";

#[test]
fn srun_mpi_plugin_is_chosen_from_what_srun_lists() -> Result<()> {
    // As printed by Slurm 22.05 (above), 23.x-24.x (pmix_v5, with the error lines of a broken
    // PMIx library after it), 19.05 (Ubuntu 20.04: `srun: ` prefixes, on stderr), and older
    // `mpi/` names (read defensively): pmix first, as OpenMPI builds have it.
    let newer = "MPI plugin types are...\n\tnone\n\tpmix\n\tcray_shasta\n\tpmi2\n\
                 specific pmix plugin versions available: pmix_v5\n\
                 srun: error:  mpi/pmix_v5: init: (null) [0]: mpi_pmix.c:193: pmi/pmix: can not load PMIx library\n\
                 srun: error: Couldn't load specified plugin name for mpi/pmix: Plugin init() callback failed\n";
    let v20 = "srun: MPI types are...\nsrun: pmix_v3\nsrun: pmi2\nsrun: none\nsrun: openmpi\nsrun: pmix\n";
    let v17 = "srun: MPI types are...\nsrun: mpi/none\nsrun: mpi/openmpi\nsrun: mpi/pmi2\nsrun: mpi/pmix\n";
    ensure!(
        srun_mpi_plugins(newer) == ["none", "pmix", "cray_shasta", "pmi2", "pmix_v5"],
        "{:?}",
        srun_mpi_plugins(newer)
    );
    ensure!(srun_mpi_plugins(v20) == ["pmix_v3", "pmi2", "none", "openmpi", "pmix"], "19.05");
    let several = "MPI plugin types are...\n\tpmix\nspecific pmix plugin versions available: pmix_v3,pmix_v4, pmix_v5\n";
    ensure!(srun_mpi_plugins(several) == ["pmix", "pmix_v3", "pmix_v4", "pmix_v5"], "commas");
    ensure!(srun_mpi_plugins(LIST_22_05) == ["pmix", "none", "cray_shasta", "pmi2", "pmix_v4"], "22.05");
    ensure!(srun_mpi_plugins(v17) == ["none", "openmpi", "pmi2", "pmix"], "{:?}", srun_mpi_plugins(v17));
    for listing in [LIST_22_05, newer, v20, v17] {
        ensure!(choose_srun_mpi(listing, None)? == "pmix", "{listing}");
        ensure!(choose_srun_mpi(listing, Some("auto"))? == "pmix", "{listing}");
        ensure!(choose_srun_mpi(listing, Some("pmi2"))? == "pmi2", "{listing}");
    }
    // Only versioned PMIx: the newest; only PMI-2: PMI-2.
    let versioned =
        "MPI plugin types are...\n\tnone\nspecific pmix plugin versions available: pmix_v3, pmix_v4\n";
    ensure!(choose_srun_mpi(versioned, None)? == "pmix_v4", "newest pmix_vN");
    ensure!(choose_srun_mpi(versioned, Some("pmix"))? == "pmix_v4", "pmix takes a pmix_vN");
    let pmi2_only = "MPI plugin types are...\n\tnone\n\tpmi2\n\tcray_shasta\n";
    ensure!(choose_srun_mpi(pmi2_only, None)? == "pmi2", "pmi2 where no pmix");
    let cray = "srun: MPI types are...\nsrun: cray_shasta\nsrun: none\nsrun: pmi2\n";
    ensure!(choose_srun_mpi(cray, None)? == "pmi2", "a Slurm built without PMIx");
    // Asked-for plugins, spelled as users do, are checked against the list.
    ensure!(choose_srun_mpi(LIST_22_05, Some("PMIx"))? == "pmix", "case");
    ensure!(choose_srun_mpi(LIST_22_05, Some("mpi/pmi2"))? == "pmi2", "mpi/ prefix");
    ensure!(choose_srun_mpi(LIST_22_05, Some("pmix_v4"))? == "pmix_v4", "a version");
    ensure!(choose_srun_mpi(LIST_22_05, Some("none"))? == "none", "what the user asked, when listed");
    let err = choose_srun_mpi(LIST_22_05, Some("pmix_v3")).expect_err("not listed").to_string();
    ensure!(
        err.contains("slurm.mpi")
            && err.contains("\"pmix_v3\" is not one this Slurm has")
            && err.contains("pmix, none, cray_shasta, pmi2, pmix_v4"),
        "{err}"
    );
    let err = choose_srun_mpi(pmi2_only, Some("pmix")).expect_err("no pmix").to_string();
    ensure!(err.contains("\"pmix\"") && err.contains("offers none, pmi2, cray_shasta"), "{err}");
    // Nothing OpenMPI can start with: refused, naming what there is and the ways out.
    let err = choose_srun_mpi("MPI plugin types are...\n\tnone\n\tcray_shasta\n", None)
        .expect_err("neither")
        .to_string();
    ensure!(
        err.contains("offers none, cray_shasta: none of pmix or pmi2")
            && err.contains("ULYSSES_SRUN_MPI")
            && err.contains("mpirun"),
        "{err}"
    );
    // An unreadable listing (an error line, a format to come): the user's word, else refused.
    let odd = "srun: error: plugin_load_from_file: dlopen(/usr/lib/slurm/mpi_pmix.so): no such file\n";
    ensure!(srun_mpi_plugins(odd).is_empty(), "{:?}", srun_mpi_plugins(odd));
    ensure!(choose_srun_mpi(odd, Some("pmi2"))? == "pmi2", "the preference at its word");
    let err = choose_srun_mpi(odd, None).expect_err("nothing readable").to_string();
    ensure!(err.contains("offers none that can be read"), "{err}");
    Ok(())
}

#[test]
fn cpus_per_rank_default_from_sinfo_or_eight_and_the_script_says_so() -> Result<()> {
    let sinfo = "gpu*|256|gpu:a100:8(S:0-7)\nsmall|48|gpu:4,nvme:1\nsmall|128|gpu:h100:8\ncpu|96+|(null)\n";
    ensure!(node_shapes(sinfo, None) == [NodeShape { cpus: 256, gpus: 8 }], "the default partition");
    ensure!(
        node_shapes(sinfo, Some("small"))
            == [NodeShape { cpus: 48, gpus: 4 }, NodeShape { cpus: 128, gpus: 8 }],
        "{:?}",
        node_shapes(sinfo, Some("small"))
    );
    ensure!(node_shapes(sinfo, Some("cpu")) == [NodeShape { cpus: 96, gpus: 0 }], "96+");
    ensure!(node_shapes("vm|2|(null)\n", None) == [NodeShape { cpus: 2, gpus: 0 }], "no default marked");
    ensure!(node_shapes("garbage\n", None).is_empty(), "unreadable");

    let cfg = ExperimentConfig::parse(&config("nccl", "cuda", "[8, 16]"), "e2.toml")?;
    let spec = SlurmSpec { gpus_per_node: Some(8), ..SlurmSpec::default() };
    // Nothing known of the nodes: 8 per GPU rank.
    let a = allocation(&cfg, &spec)?;
    ensure!(
        a.cpus_per_task == CPUS_PER_GPU_RANK && CPUS_PER_GPU_RANK == 8 && a.threads_per_rank == 1,
        "{a:?}"
    );
    // A DGX A100 (256 CPUs, 8 GPUs): 32 each.
    let a = allocation_on(&cfg, &spec, &node_shapes(sinfo, None))?;
    ensure!(a.cpus_per_task == 32 && a.cpus_reason.contains("256 CPUs over its 8 GPUs"), "{a:?}");
    // Two kinds of node: only those with 8 GPUs can hold the job; 128 / 8.
    let a = allocation_on(&cfg, &spec, &node_shapes(sinfo, Some("small")))?;
    ensure!(a.cpus_per_task == 16, "{a:?}");
    // Four GPUs per node: both fit; the job must fit the smaller share (48 / 4 = 12 < 128 / 8).
    let four = SlurmSpec { gpus_per_node: Some(4), ..SlurmSpec::default() };
    let a = allocation_on(&cfg, &four, &node_shapes(sinfo, Some("small")))?;
    ensure!(a.cpus_per_task == 12 && a.tasks_per_node == 4, "{a:?}");
    // The config's number wins.
    let a = allocation_on(
        &cfg,
        &SlurmSpec { cpus_per_task: Some(6), ..spec.clone() },
        &node_shapes(sinfo, None),
    )?;
    ensure!(a.cpus_per_task == 6, "{a:?}");

    let paths = JobPaths {
        program: "/u/ulysses".into(),
        base: "/u".into(),
        dir: "/u/results/e2".into(),
        config: "/u/results/e2/slurm/config.toml".into(),
    };
    let script = sbatch_script(&cfg, &SlurmSpec { mpi: Some("pmi2".into()), ..spec.clone() }, &paths, false)?;
    for line in [
        "# 8 CPUs per rank: 8 per GPU rank by default",
        "NCCL's proxy thread",
        "#SBATCH --cpus-per-task=8\n",
        "export SRUN_CPUS_PER_TASK=8\n",
        "export OMP_NUM_THREADS=1\n",
        "export ULYSSES_SRUN_MPI='pmi2'\n",
    ] {
        ensure!(script.contains(line), "{line:?} missing from:\n{script}");
    }
    let a = allocation_on(&cfg, &spec, &node_shapes(sinfo, None))?;
    let script = sbatch_script_for(&cfg, &spec, &a, &paths, false)?;
    ensure!(
        script.contains("# 32 CPUs per rank: a node's 256 CPUs over its 8 GPUs (sinfo)")
            && script.contains("#SBATCH --cpus-per-task=32\n")
            && !script.contains("ULYSSES_SRUN_MPI"),
        "{script}"
    );
    // CPU ranks: one CPU per intra-op thread, and OMP_NUM_THREADS the same.
    let cpu = ExperimentConfig::parse(
        &config("mpi", "cpu", "[4]").replace("backend = ", "threads_per_rank = 3\nbackend = "),
        "cpu.toml",
    )?;
    let script = sbatch_script(&cpu, &SlurmSpec::default(), &paths, false)?;
    ensure!(
        script.contains("#SBATCH --cpus-per-task=3\n")
            && script.contains("export OMP_NUM_THREADS=3\n")
            && script.contains("one per intra-op thread (parallel.threads_per_rank = 3)")
            && !script.contains("NCCL"),
        "{script}"
    );
    let err = allocation(&cfg, &SlurmSpec { mpi: Some("pmi 2".into()), ..spec })
        .expect_err("two words")
        .to_string();
    ensure!(err.contains("mpi Some(\"pmi 2\") must be one word"), "{err}");
    Ok(())
}

#[test]
fn following_a_job_backs_off_and_starts_again_at_a_change() -> Result<()> {
    let s = Duration::from_secs_f64;
    let p = Polling::default();
    ensure!((p.first, p.max, p.tail) == (s(2.0), s(30.0), s(1.0)), "{p:?}");
    let waits: Vec<f64> = (0..9).map(|n| p.delay(n).as_secs_f64()).collect();
    let want = [2.0, 3.0, 4.5, 6.75, 10.125, 15.1875, 22.78125, 30.0, 30.0];
    ensure!(waits.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{waits:?}");
    ensure!(p.delay(u32::MAX) == s(30.0), "capped");
    // After each answer: the first counts as a change; a change starts again at 2 s.
    let mut b = Backoff::new(p);
    let seen: Vec<f64> =
        [true, false, false, false, true, false].iter().map(|&c| b.after(c).as_secs_f64()).collect();
    ensure!(seen == [2.0, 3.0, 4.5, 6.75, 2.0, 3.0], "{seen:?}");
    // A Duration is the first wait (what the tests and notebooks pass); never below 100 ms.
    let quick = Polling::from(Duration::from_millis(200));
    ensure!((quick.first, quick.max, quick.tail) == (s(0.2), s(30.0), s(0.2)), "{quick:?}");
    ensure!(Polling::from(Duration::ZERO).delay(0) == s(0.1), "a floor");
    ensure!(Polling::from(s(60.0)).delay(3) == s(60.0) && Polling::from(s(60.0)).tail == s(1.0), "slow");
    Ok(())
}

#[test]
fn a_jobs_record_is_saved_at_submit_and_loaded_later_even_from_a_moved_folder() -> Result<()> {
    let root = std::env::temp_dir().join(format!("ulysses-jobrecord-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("results/e2");
    std::fs::create_dir_all(dir.join("slurm"))?;
    let dir = std::fs::canonicalize(&dir)?;
    let job = SubmittedJob {
        id: "4242".into(),
        paths: JobPaths {
            program: "/opt/ulysses".into(),
            base: root.clone(),
            dir: dir.clone(),
            config: dir.join("slurm/config.toml"),
        },
        script: dir.join("slurm/submit-2.sbatch"),
        log: dir.join("slurm/4242.out"),
    };
    job.save()?;
    let text = std::fs::read_to_string(dir.join("slurm/job.toml"))?;
    ensure!(text.contains("id = \"4242\"") && text.contains("program = \"/opt/ulysses\""), "{text}");
    ensure!(SubmittedJob::load(&dir)? == job, "round trip");
    // Copied elsewhere (from a cluster's scratch to home): the folder's files are found there.
    let moved = root.join("moved");
    std::fs::rename(&dir, &moved)?;
    let back = SubmittedJob::load(&moved)?;
    let moved = std::fs::canonicalize(&moved)?;
    ensure!(
        back.id == "4242"
            && back.paths.dir == moved
            && back.log == moved.join("slurm/4242.out")
            && back.script == moved.join("slurm/submit-2.sbatch")
            && back.paths.config == moved.join("slurm/config.toml")
            && back.paths.program == Path::new("/opt/ulysses"),
        "{back:?}"
    );
    // The older form (job id and folder) still names a job without a record.
    let at = SubmittedJob::at("77", &moved)?;
    ensure!(at.log == moved.join("slurm/77.out"), "{at:?}");
    let err = SubmittedJob::load(&root).expect_err("no record").to_string();
    ensure!(err.contains("job.toml") && err.contains("ulysses follow <job id>"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

#[test]
fn job_states_are_read_from_scontrol_and_sacct() -> Result<()> {
    let line = |state: &str, reason: &str, exit: &str| {
        format!(
            "JobId=12 JobName=ulysses-e2 UserId=me(1000) Priority=1 JobState={state} Reason={reason} \
             Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 ExitCode={exit} RunTime=00:00:07"
        )
    };
    let read = |s: &str, r: &str, e: &str| JobStatus::from_scontrol(&line(s, r, e)).expect("a state");
    let pending = read("PENDING", "Resources", "0:0");
    ensure!(
        pending == JobStatus::Queued { state: "PENDING".into(), reason: "Resources".into() }
            && pending.to_string() == "PENDING (Resources)"
            && !pending.is_done(),
        "{pending:?}"
    );
    ensure!(read("CONFIGURING", "None", "0:0").to_string() == "CONFIGURING", "queued, no reason shown");
    for running in ["RUNNING", "COMPLETING", "SUSPENDED"] {
        ensure!(read(running, "None", "0:0") == JobStatus::Running { state: running.into() }, "{running}");
    }
    let failed = read("FAILED", "NonZeroExitCode", "1:0");
    ensure!(
        failed == JobStatus::Done(JobOutcome { state: "FAILED".into(), exit_code: "1:0".into() })
            && failed.to_string() == "FAILED (exit code 1:0)",
        "{failed:?}"
    );
    for ended in ["COMPLETED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"] {
        ensure!(
            read(ended, "None", "0:15").is_done() && read(ended, "None", "0:15").state() == ended,
            "{ended}"
        );
    }
    ensure!(
        JobStatus::from_scontrol("").is_none() && JobStatus::from_scontrol("JobId=1").is_none(),
        "no state"
    );
    // sacct, after scontrol has forgotten the job.
    let cancelled = JobStatus::from_sacct("CANCELLED by 1000|0:15\n").expect("a line");
    ensure!(
        cancelled == JobStatus::Done(JobOutcome { state: "CANCELLED".into(), exit_code: "0:15".into() }),
        "{cancelled:?}"
    );
    ensure!(
        JobStatus::from_sacct("RUNNING|0:0") == Some(JobStatus::Running { state: "RUNNING".into() }),
        "running"
    );
    ensure!(JobStatus::from_sacct("").is_none(), "accounting off");
    Ok(())
}
