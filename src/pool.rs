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
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

/// The id of the first process that ran CPU work through this module (0: none yet): its global
/// pool is live.
static FIRST: AtomicU32 = AtomicU32::new(0);

/// A forked child's own pool, with the id of the process that built it (a child of that child
/// finds another id and builds its own); null until a child needs one. Each entry is a leaked
/// box, never freed: a parent's entry, seen in its child, holds a pool whose threads did not
/// survive the fork, and dropping it would signal them.
///
/// No lock anywhere here: a lock held by one thread while another forks stays held, ownerless,
/// in the child, and the child's first CPU call waited on it forever (seen: a child forking
/// grandchildren while one of its threads ran CPU work, 1–3 hung grandchildren in 3000).
static CHILD: AtomicPtr<(u32, ThreadPool)> = AtomicPtr::new(std::ptr::null_mut());

/// The entry of [`CHILD`] at `p`, if any.
fn entry(p: *mut (u32, ThreadPool)) -> Option<&'static (u32, ThreadPool)> {
    // SAFETY: every non-null value stored in CHILD is a leaked `Box` (never freed, never
    // mutated after its store), published with Release and loaded with Acquire.
    unsafe { p.as_ref() }
}

/// The pool to run CPU work on from this thread: `None` for where it is (the global pool, or the
/// pool whose worker this thread is), `Some` in a forked child of a process whose global pool
/// had started.
fn forked_pool() -> Option<&'static ThreadPool> {
    let pid = std::process::id();
    // recorded on any thread, a pool's worker included: a process whose calls all came from
    // inside its own parallel loops started the global pool too
    let first = match FIRST.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => pid,
        Err(first) => first,
    };
    if rayon::current_thread_index().is_some() {
        // a worker of a live pool (the child's own included): nested work stays on it
        return None;
    }
    if first == pid {
        return None;
    }
    let mut seen = CHILD.load(Ordering::Acquire);
    if let Some((owner, pool)) = entry(seen) {
        if *owner == pid {
            return Some(pool);
        }
    }
    let mine = Box::into_raw(Box::new((pid, build())));
    loop {
        match CHILD.compare_exchange(seen, mine, Ordering::AcqRel, Ordering::Acquire) {
            // in place of nothing or of a parent's entry (left as it is, see CHILD)
            Ok(_) => return entry(mine).map(|(_, pool)| pool),
            Err(now) => match entry(now) {
                // another thread of this process stored one meanwhile: that one serves, and
                // this one (whose threads are live here) is dropped
                Some((owner, pool)) if *owner == pid => {
                    // SAFETY: `mine` came from Box::into_raw above and was never stored.
                    drop(unsafe { Box::from_raw(mine) });
                    return Some(pool);
                }
                _ => seen = now,
            },
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
