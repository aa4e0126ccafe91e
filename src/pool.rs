//! The rayon pool the CPU work runs on, in this process and in a process forked from it.
//!
//! The CPU passes run on rayon's global pool. `fork()` copies a process with only the thread
//! that called it: in a child of a process whose global pool had started, the pool's state says
//! its threads exist and none does, so work handed to it never runs and the call waits forever
//! (`multiprocessing`'s default start method on Linux forks, after the parent has trained with
//! this crate). Every entry of the CPU backend therefore goes through [`install`], which in such
//! a child runs the work on a pool of its own, built on first use in that process (rayon's default
//! size: `RAYON_NUM_THREADS`, else the cores), with the same bits: a pass's results do not depend
//! on its threads. Elsewhere [`install`] runs the work where it is, on the global pool.
//!
//! The process that first runs CPU work here (from any thread) is taken as the one whose global
//! pool is live; a process whose id differs is a child of it (or a child's child) and gets its
//! own pool. Not covered: a child of a process whose global pool was started by other code only
//! (another crate's rayon work) before this crate ran anything there; rayon work of any crate
//! waits forever in such a child.

use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, Mutex, OnceLock};

/// The id of the first process that ran CPU work through this module: its global pool is live.
static FIRST: OnceLock<u32> = OnceLock::new();

/// A forked child's own pool, with the id of the process that built it (a child of that child
/// finds another id and builds its own).
static CHILD: Mutex<Option<(u32, Arc<ThreadPool>)>> = Mutex::new(None);

/// The pool to run CPU work on from this thread: `None` for where it is (the global pool, or the
/// pool whose worker this thread is), `Some` in a forked child of a process whose global pool
/// had started.
fn forked_pool() -> Option<Arc<ThreadPool>> {
    // recorded on any thread, a pool's worker included: a process whose calls all came from
    // inside its own parallel loops started the global pool too
    let first = *FIRST.get_or_init(std::process::id);
    if rayon::current_thread_index().is_some() {
        // a worker of a live pool (the child's own included): nested work stays on it
        return None;
    }
    let pid = std::process::id();
    if first == pid {
        return None;
    }
    let lock = || CHILD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, pool)) = lock().as_ref() {
        if *owner == pid {
            return Some(pool.clone());
        }
    }
    // built outside the lock (a fork while it is held would leave it held in that child)
    let pool = Arc::new(build());
    let mut child = lock();
    match child.as_ref() {
        // another thread of this process built one meanwhile: that one serves
        Some((owner, theirs)) if *owner == pid => Some(theirs.clone()),
        _ => {
            // a pool built by a parent of this process: its threads did not survive the fork
            // either, and dropping it would signal them; it is left as it is
            if let Some(stale) = child.take() {
                std::mem::forget(stale);
            }
            *child = Some((pid, pool.clone()));
            Some(pool)
        }
    }
}

/// A pool of rayon's default size, or of one thread when that cannot start (as rayon's global
/// pool, it panics when not even one thread can).
fn build() -> ThreadPool {
    ThreadPoolBuilder::new()
        .build()
        .or_else(|_| ThreadPoolBuilder::new().num_threads(1).build())
        .unwrap_or_else(|e| panic!("fused-weighted-loss: no thread for the CPU pool of a forked process: {e}"))
}

/// Runs `f` where CPU work of this process can run: here, or in a forked child of a process
/// whose global pool had started, on the child's own pool (see the module docs).
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match forked_pool() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// `rayon::in_place_scope` on the pool [`install`] would take: `op` runs on this thread, what it
/// spawns on that pool.
pub(crate) fn in_place_scope<'scope, R>(op: impl FnOnce(&rayon::Scope<'scope>) -> R) -> R {
    match forked_pool() {
        Some(pool) => pool.in_place_scope(op),
        None => rayon::in_place_scope(op),
    }
}
