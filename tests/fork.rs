//! A process forked after the CPU pool started (Python's `multiprocessing` on Linux forks by
//! default) runs the CPU passes on a pool of its own, with the parent's bits, instead of waiting
//! forever on the parent's pool, whose threads the fork did not copy; so does a child of that
//! child. One test in its own binary: `fork()` copies only the calling thread, and the other
//! threads of a test binary must be idle when it runs.
#![cfg(unix)]

use fused_weighted_loss::parallel::{Sharded, Solo};
use fused_weighted_loss::{synthetic, Chunking, Grad, LinearGrads, LinearInputs, LinearShape, LossSpec, Shape, Tokens};

/// Bits of what a process computes: the plain call's loss and gradient, the same in place, one
/// rank's chunked split steps (the pipelined driver) and the fused linear call's loss and
/// gradients.
fn everything() -> Vec<u32> {
    let shape = Shape::new(4, 32, 4096).unwrap();
    let logits = synthetic::logits::<f32>(11, shape.logits_len(), 4.0);
    let ids = synthetic::ids::<i64>(12, shape.rows(), shape.vocab());
    let spec = LossSpec::builder().keywords([3, 7]).softcap(30.0).build().unwrap();
    let mut bits = Vec::new();

    let mut grad = vec![0f32; logits.len()];
    let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad)).unwrap();
    push_f64(&mut bits, out.loss);
    bits.extend(grad.iter().map(|g| g.to_bits()));

    let mut in_place = logits.clone();
    let out = spec.loss_and_grad_in_place(shape, &mut in_place, Tokens::new(&ids)).unwrap();
    push_f64(&mut bits, out.loss);
    bits.extend(in_place.iter().map(|g| g.to_bits()));

    let mut grad = vec![0f32; logits.len()];
    let out = Sharded::data_parallel(shape.vocab(), &Solo)
        .with_split_steps()
        .with_chunk_rows(8)
        .loss_and_grad(&spec, shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad))
        .unwrap();
    push_f64(&mut bits, out.loss);
    bits.extend(grad.iter().map(|g| g.to_bits()));

    let ls = LinearShape::new(4, 32, 64, 3000).unwrap();
    let hidden = synthetic::logits::<f32>(13, ls.hidden_len(), 1.0);
    let weight = synthetic::logits::<f32>(14, ls.weight_len(), 0.4);
    let ids = synthetic::ids::<i64>(15, ls.rows(), 3000);
    let (mut dh, mut dw) = (vec![0f32; hidden.len()], vec![0f32; weight.len()]);
    let grads = LinearGrads::new().hidden(Grad::Into(&mut dh)).weight(Grad::Into(&mut dw));
    let inputs = LinearInputs::new(&hidden, &weight);
    let out = spec.linear_loss_and_grad(ls, inputs, Tokens::new(&ids), grads, Chunking::Rows(24)).unwrap();
    push_f64(&mut bits, out.loss.loss);
    bits.extend(dh.iter().chain(&dw).map(|g| g.to_bits()));
    bits
}

fn push_f64(bits: &mut Vec<u32>, x: f64) {
    bits.extend([(x.to_bits() >> 32) as u32, x.to_bits() as u32]);
}

/// Forks; the child runs `child` under a 120 s alarm (a hang kills it) and exits 0 when it
/// returns true. Returns how the child ended.
fn in_child(child: impl FnOnce() -> bool) -> Result<(), String> {
    // SAFETY: the other threads of this process are idle (the pool's workers asleep, the test
    // harness waiting for this test); the child only computes and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: plain libc calls in the child; `_exit` skips the parent's atexit handlers.
        unsafe {
            libc::alarm(120);
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(false);
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid");
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGALRM {
        Err("the child hung (killed by its 120 s alarm)".into())
    } else {
        Err(format!("the child failed (wait status {status:#x})"))
    }
}

#[test]
fn a_forked_child_and_its_child_compute_the_parents_bits() {
    // the parent's first calls run on a worker of the global pool, which starts here: the
    // process still counts as the one whose pool is live, and its child as a child
    let (parent, ()) = rayon::join(everything, || ());
    let child = in_child(|| {
        if everything() != parent {
            return false;
        }
        // a child of the child: neither the global pool nor the child's own has threads there
        in_child(|| everything() == parent).is_ok()
    });
    child.unwrap();
    // the parent's pool still works, with the same bits, from this thread too
    assert!(everything() == parent, "the parent's bits changed after the fork");
}
