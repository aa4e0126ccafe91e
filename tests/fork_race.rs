//! A child of a forked child while another thread of that child runs CPU work: the fork can land
//! while that thread is inside the pool lookup, and nothing it holds there may stay held in the
//! grandchild (a lock did: the grandchild's first CPU call then waited forever, in 1–3 of 3000
//! grandchildren). Its own test binary: `fork()` copies only the calling thread, and the test
//! harness's other threads must be idle when the first fork runs.
#![cfg(unix)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One small CPU call through the pool lookup.
fn touch() -> bool {
    let (src, mut dst) = ([1.5f32; 64], [0f32; 64]);
    fused_weighted_loss::scale_into(&src, 2.0, &mut dst).is_ok() && dst.iter().all(|&d| d == 3.0)
}

/// Waits up to `limit` for child `pid`, killing it after that; its exit code, or `None` when it
/// hung or died of a signal.
fn wait_or_kill(pid: libc::pid_t, limit: Duration) -> Option<i32> {
    let t0 = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: polls the child forked by the caller.
        let w = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if w == pid {
            return libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        }
        if t0.elapsed() > limit {
            // SAFETY: the same child, which has not been reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn grandchildren_forked_while_a_thread_runs_cpu_work_do_not_hang() {
    // the parent's global pool is live; its child gets a pool of its own
    assert!(touch());
    // SAFETY: the harness's other threads are idle; the child computes, forks and exits.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    if child == 0 {
        // SAFETY (each libc call below): plain calls in the child and its children; `_exit`
        // skips the atexit handlers copied from the parent.
        unsafe { libc::alarm(300) };
        if !touch() {
            unsafe { libc::_exit(4) };
        }
        let stop = Arc::new(AtomicBool::new(false));
        let busy = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    touch();
                }
            })
        };
        let (mut hung, mut wrong) = (0, 0);
        for _ in 0..2000 {
            let g = unsafe { libc::fork() };
            if g == 0 {
                let ok = touch();
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            match wait_or_kill(g, Duration::from_secs(5)) {
                Some(0) => {}
                Some(_) => wrong += 1,
                None => hung += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = busy.join();
        eprintln!("grandchildren: {hung} hung, {wrong} wrong, of 2000");
        unsafe { libc::_exit(if hung + wrong == 0 { 0 } else { 3 }) };
    }
    let code = wait_or_kill(child, Duration::from_secs(400));
    assert_eq!(code, Some(0), "a grandchild hung or computed wrongly (child exit code; None: the child itself hung)");
}
