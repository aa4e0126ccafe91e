//! Temporary output files removed when the run is interrupted or aborted (unix: every signal
//! whose default action ends the process and that the standard library leaves alone: SIGINT,
//! SIGTERM, SIGHUP, SIGQUIT, SIGABRT, SIGXCPU, SIGXFSZ, SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM,
//! SIGPROF, and on Linux SIGIO, SIGPWR and SIGSTKFLT; not SIGKILL, which no process can catch,
//! nor SIGSEGV and SIGBUS, whose handler reports a stack overflow, nor SIGPIPE, which Rust
//! programs ignore, nor SIGILL, SIGFPE, SIGTRAP and SIGSYS, which report a fault of the process
//! itself (returning from a handler would run the faulting instruction again), nor the
//! real-time signals). A signal that already has a handler when the first path is registered
//! (a profiler's SIGPROF, an embedding program's SIGUSR1) or that is ignored (SIGHUP under
//! `nohup`) keeps it: only signals still at their default action get this one.
//!
//! A pending output (see [`output`](super::output)) removes its temporary file when it is
//! dropped, but a signal ends the process without running any destructor: a Ctrl-C during a
//! long `eval` left a `.<name>.<pid>.<n>.tmp` file as large as the gradient beside the
//! destination, and so did an allocation the allocator refused inside the library (Rust's
//! allocation failure aborts, by SIGABRT), a CPU-time limit, a file-size limit, and until
//! 2026-12-04 a `kill -USR1` or a `timeout -s ALRM`. [`track`] registers a temporary file's
//! path; the first call installs handlers that remove every registered path (`unlink`, which is
//! async-signal-safe) and then end the process by the same signal with its default action, so
//! the exit status is what it would have been. [`untrack`] forgets a path once it is renamed or
//! removed. The destination is never touched: it changes only by the rename of a complete file.
//!
//! Paths are kept as leaked C strings in a fixed table of atomic pointers, so that the handler
//! reads nothing that another thread may free. Elsewhere (not unix) both calls do nothing.

#[cfg(unix)]
mod imp {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::sync::atomic::{AtomicPtr, Ordering};
    use std::sync::Once;

    /// More than the CLI ever has pending at once (gradient, per-token losses, JSON).
    const SLOTS: usize = 16;

    static PENDING: [AtomicPtr<libc::c_char>; SLOTS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];
    static INSTALL: Once = Once::new();

    /// The signals whose default action ends the process (see the module docs for those left
    /// out).
    const SIGNALS: &[libc::c_int] = &[
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGABRT,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGVTALRM,
        libc::SIGPROF,
        #[cfg(any(target_os = "linux", target_os = "android"))]
        libc::SIGIO,
        #[cfg(any(target_os = "linux", target_os = "android"))]
        libc::SIGPWR,
        #[cfg(any(target_os = "linux", target_os = "android"))]
        libc::SIGSTKFLT,
    ];

    extern "C" fn on_signal(sig: libc::c_int) {
        for slot in &PENDING {
            let p = slot.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: a non-null slot holds a leaked, NUL-terminated C string (never freed).
                unsafe { libc::unlink(p) };
            }
        }
        // SAFETY: signal and raise are async-signal-safe; the default action then ends the
        // process as the signal would have without this handler.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }

    fn install() {
        for &sig in SIGNALS {
            // SAFETY: a zeroed sigaction with the handler set and an empty mask is valid.
            // Only signals at their default action are taken: an ignored one (SIGHUP under
            // nohup) stays ignored and one with a handler (a profiler's SIGPROF) keeps it.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction != libc::SIG_DFL {
                    continue;
                }
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
        }
    }

    /// A registered path: the slot that holds it.
    pub struct Tracked(Option<usize>);

    pub fn track(path: &Path) -> Tracked {
        INSTALL.call_once(install);
        let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return Tracked(None) };
        let p = c.into_raw();
        for (i, slot) in PENDING.iter().enumerate() {
            if slot.compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Tracked(Some(i));
            }
        }
        // every slot taken: this path is not removed on a signal (its drop still removes it)
        // SAFETY: `p` came from `into_raw` above and was stored nowhere.
        drop(unsafe { CString::from_raw(p) });
        Tracked(None)
    }

    pub fn untrack(t: &mut Tracked) {
        if let Some(i) = t.0.take() {
            // the string is left allocated: a handler running on another thread may hold it
            PENDING[i].store(std::ptr::null_mut(), Ordering::Release);
        }
    }
}

#[cfg(not(unix))]
mod imp {
    use std::path::Path;

    pub struct Tracked;

    pub fn track(_: &Path) -> Tracked {
        Tracked
    }

    pub fn untrack(_: &mut Tracked) {}
}

pub use imp::{track, untrack, Tracked};
