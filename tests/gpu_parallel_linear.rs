//! The fused linear split on device buffers (`DeviceSharded::linear_loss_and_grad`) against the
//! float64 reference: ranks as threads on one GPU, each with its own stream and cuBLAS handle,
//! their exchanges through the host (a test-only collective); 1 to 4 vocabulary ranks with uneven
//! slices, f32 and bf16, the options, ignored targets, a 2x2 grid with a data group, bit-identical
//! reruns, typed errors. Without a GPU every test prints that it skipped; with
//! `FWL_REQUIRE_CUDA=1` and no GPU every test fails.
//!
//! The cases need the `cuda` feature (they live in `cuda_only/gpu_parallel_linear.rs`). A build
//! without it has one test, which skips saying so or fails with `FWL_REQUIRE_CUDA=1`, so this
//! file never passes with no test run where a GPU was required.

mod common;
#[cfg(feature = "cuda")]
#[path = "common/shards.rs"]
mod shards;
#[cfg(feature = "cuda")]
#[path = "common/through_host.rs"]
mod through_host;

#[cfg(feature = "cuda")]
#[path = "cuda_only/gpu_parallel_linear.rs"]
mod cases;

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_parallel_linear_needs_the_cuda_feature() {
    assert!(
        !common::gpu_or_skip("gpu_parallel_linear_needs_the_cuda_feature"),
        "a build without `cuda` cannot use a GPU"
    );
}
