//! Launching P ranks as P threads of this process (the local backend).
//!
//! ```no_run
//! # fn main() -> ulysses::Result<()> {
//! let shapes = ulysses::comm::launch(4, |ctx| {
//!     let x = tch::Tensor::ones([2, 8, 4], (tch::Kind::Float, tch::Device::Cpu));
//!     // [2, 8, 4] -> [2, 32, 1]: scatter dim 2, gather dim 1
//!     let y = ctx.world().all_to_all(&x, 2, 1)?;
//!     Ok::<_, ulysses::Error>(y.size())
//! })?;
//! assert_eq!(shapes[3], vec![2, 32, 1]);
//! # Ok(()) }
//! ```

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::group::{Group, GroupInfo};
use super::local::LocalWorld;
use super::mesh::{Mesh, MeshShape};
use crate::{Error, Result};

/// How long a rank waits for a peer inside one collective before the launch fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// What a rank's function receives: its handle on the world group.
pub struct RankCtx {
    world: Group,
}

impl RankCtx {
    pub(crate) fn new(world: Group) -> RankCtx {
        RankCtx { world }
    }

    /// This rank's global rank.
    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    /// Number of ranks in the launch.
    pub fn world_size(&self) -> usize {
        self.world.size()
    }

    /// The group of all ranks.
    pub fn world(&self) -> &Group {
        &self.world
    }

    /// Builds this rank's [`Mesh`]; every rank must call it with the same shape.
    pub fn mesh(&self, shape: MeshShape) -> Result<Mesh> {
        Mesh::new(&self.world, shape)
    }
}

/// A launch of P ranks as threads, with its options.
#[derive(Debug, Clone)]
pub struct LocalLaunch {
    world_size: usize,
    timeout: Duration,
    threads_per_rank: usize,
}

impl LocalLaunch {
    /// P ranks, a 120 s collective timeout, one intra-op thread per rank (so P ranks do not
    /// oversubscribe the cores).
    pub fn new(world_size: usize) -> LocalLaunch {
        LocalLaunch { world_size, timeout: DEFAULT_TIMEOUT, threads_per_rank: 1 }
    }

    /// How long a rank waits for a peer inside one collective before it gives up.
    pub fn timeout(mut self, timeout: Duration) -> LocalLaunch {
        self.timeout = timeout;
        self
    }

    /// libtorch intra-op threads for each rank.
    pub fn threads_per_rank(mut self, threads: usize) -> LocalLaunch {
        self.threads_per_rank = threads.max(1);
        self
    }

    /// Runs `f` once per rank, each on its own thread, and returns each rank's result in rank
    /// order. If any rank returns an error or panics, every rank's pending collective returns an
    /// error at once (no hang), and the launch returns [`Error::RankFailed`] naming the rank that
    /// failed first and its message.
    pub fn run<T, E, F>(&self, f: F) -> Result<Vec<T>>
    where
        F: Fn(RankCtx) -> std::result::Result<T, E> + Sync,
        T: Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let n = self.world_size;
        if n == 0 {
            return Err(Error::InvalidArgument {
                op: "launch",
                group: "world".into(),
                msg: "world size must be at least 1".into(),
            });
        }
        let world = LocalWorld::new(n, self.timeout);
        let info = GroupInfo { id: "world".into(), name: "world".into(), ranks: (0..n).collect() };
        let threads = self.threads_per_rank as i32;
        let outcomes: Vec<std::result::Result<T, String>> = thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|rank| {
                    let (world, info, f) = (Arc::clone(&world), info.clone(), &f);
                    thread::Builder::new().name(format!("rank-{rank}")).spawn_scoped(scope, move || {
                        tch::set_num_threads(threads);
                        let run = || -> std::result::Result<T, String> {
                            let group =
                                Group::new(info, rank, world.endpoint(rank)).map_err(|e| e.to_string())?;
                            f(RankCtx::new(group)).map_err(|e| error_chain(&*e.into()))
                        };
                        let outcome = catch_unwind(AssertUnwindSafe(run))
                            .unwrap_or_else(|panic| Err(panic_message(panic)));
                        match &outcome {
                            Ok(_) => world.exit(rank),
                            Err(msg) => world.fail(rank, msg.clone()),
                        }
                        outcome
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h.join().unwrap_or_else(|panic| Err(panic_message(panic))),
                    Err(e) => Err(format!("could not start the thread: {e}")),
                })
                .collect()
        });

        let failed: Vec<usize> = (0..n).filter(|&r| outcomes[r].is_err()).collect();
        let Some(&first_failed) = failed.first() else {
            return Ok(outcomes.into_iter().flatten().collect());
        };
        // The root cause is the first failure recorded, not the lowest failing rank.
        let (rank, message) = match world.first_failure() {
            Some((rank, recorded)) => match &outcomes[rank] {
                Err(own) => (rank, own.clone()),
                Ok(_) => (rank, recorded),
            },
            None => (first_failed, outcomes[first_failed].as_ref().err().cloned().unwrap_or_default()),
        };
        let others = failed.into_iter().filter(|&r| r != rank).collect();
        Err(Error::RankFailed { rank, message, others })
    }
}

/// [`LocalLaunch::new`]`(world_size).run(f)`: P ranks as threads with the default options.
pub fn launch<T, E, F>(world_size: usize, f: F) -> Result<Vec<T>>
where
    F: Fn(RankCtx) -> std::result::Result<T, E> + Sync,
    T: Send,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    LocalLaunch::new(world_size).run(f)
}

/// An error and its sources, joined by ": ".
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

pub(crate) fn panic_message(panic: Box<dyn Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into());
    format!("panicked: {text}")
}
