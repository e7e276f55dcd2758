//! Launching processes for real clusters, checked without a GPU: where a process sits and which
//! GPU it drives from each launcher's variables (mpirun, mpirun inside a Slurm job, srun, a
//! PMIx launcher inside a job), the refusals made before anything starts (ranks sharing a GPU,
//! more ranks per node than GPUs, MPI with CUDA, NCCL without a driver or with another
//! libtorch), the launch commands, and the sbatch script of a 2-node x 8-GPU config.

use std::path::Path;

use anyhow::{ensure, Result};
use ulysses::comm::{check_distinct_gpus, choose_gpu, process_place, LauncherEnv};
use ulysses::device::{check_libtorch_info, loaded_libtorch, version_of_libtorch_dir, BUILT_LIBTORCH};
use ulysses::experiment::slurm::{allocation, sbatch_script, JobPaths};
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

    // Inside a 4-node allocation of 8 tasks per node: srun, ranks packed 8 per node.
    let job = env(&[("SLURM_JOB_ID", "42"), ("SLURM_JOB_NUM_NODES", "4"), ("SLURM_NTASKS_PER_NODE", "8")]);
    let plan = LaunchPlan::new(32, Launcher::Auto, None, None, &job)?;
    ensure!(
        plan.launcher == Launcher::Srun && plan.ranks_per_node == Some(8) && plan.nodes() == Some(4),
        "{plan:?}"
    );
    let a = args(&plan.command(program, &rest));
    for w in [["--mpi=pmix", "--label"], ["-n", "32"], ["--ntasks-per-node", "8"], ["-N", "4"]] {
        ensure!(a.windows(2).any(|x| x == w), "{w:?} missing from {a:?}");
    }
    plan.check_gpus(8)?;
    let small = LaunchPlan::new(8, Launcher::Auto, None, None, &job)?;
    ensure!(small.nodes() == Some(1), "8 ranks fit one node: {small:?}");
    let err = LaunchPlan::new(32, Launcher::Auto, Some(4), None, &job).expect_err("8 nodes").to_string();
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
        Err(e) => {
            ensure!(!e.to_string().is_empty(), "on a GPU machine the check may pass; /bin/false then fails")
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
