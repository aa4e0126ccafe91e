//! The split on device buffers: ranks simulated on one GPU (each rank's statistics written into
//! its part of one gathered buffer), the one-call API over a group of one, the data-parallel
//! steps, and NCCL (feature `nccl`): a group of one rank through `ncclAllGather`, and one rank per
//! GPU when the machine has several. Against the float64 reference and the CPU split. Without a
//! GPU every test prints that it skipped; with `FWL_REQUIRE_CUDA=1` and no GPU (or, for the NCCL
//! tests, no NCCL library) they fail.
//!
//! The cases need the `cuda` feature (they live in `cuda_only/gpu_parallel.rs`). A build
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
#[path = "cuda_only/gpu_parallel.rs"]
mod cases;

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_parallel_needs_the_cuda_feature() {
    assert!(!common::gpu_or_skip("gpu_parallel_needs_the_cuda_feature"), "a build without `cuda` cannot use a GPU");
}
