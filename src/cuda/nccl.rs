//! NCCL as the split's [`DeviceCollective`] (feature `nccl`): `ncclAllGather` on the caller's
//! stream, no host synchronisation.
//!
//! The library is opened at run time, as the driver is: `FWL_NCCL_LIBRARY` (a path) if set, else
//! `libnccl.so.2` (the name NCCL installs, also inside PyTorch's `nvidia-nccl` wheel), else
//! `libnccl.so`. A machine without it gets [`Error::BackendUnavailable`] from every constructor,
//! never a panic. The types are cudarc's NCCL bindings (`cudarc::nccl::sys`); the five entry
//! points used are looked up here, so that a missing library or symbol is an error, not a panic.
//!
//! ```no_run
//! # fn main() -> Result<(), fused_weighted_loss::Error> {
//! use fused_weighted_loss::cuda::cudarc::driver::CudaContext;
//! use fused_weighted_loss::cuda::nccl::{NcclGroup, NcclId};
//!
//! // rank 0 makes the id and sends its bytes to the other ranks (by any means: a file, TCP, MPI)
//! let id = NcclId::new()?;
//! let bytes: [u8; 128] = id.to_bytes();
//! // every rank, on its own GPU:
//! let (rank, ranks) = (0, 1);
//! let ctx = CudaContext::new(rank).map_err(|e| fused_weighted_loss::Error::Cuda { context: "ctx", message: e.to_string() })?;
//! let group = NcclGroup::new(&ctx, &NcclId::from_bytes(bytes), rank, ranks)?;
//! # drop(group); Ok(()) }
//! ```

use super::split::DeviceCollective;
use super::{drv, status};
use crate::error::{Error, Result};
use crate::Backend;
use cudarc::driver::{CudaContext, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, OnceLock};

type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int;
type AllGather =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, *mut c_void) -> c_int;
type CommDestroy = unsafe extern "C" fn(ncclComm_t) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;

/// The NCCL entry points, from the library opened once per process.
struct Nccl {
    _lib: libloading::Library,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_gather: AllGather,
    comm_destroy: CommDestroy,
    get_error_string: GetErrorString,
    version: c_int,
}

impl Nccl {
    fn open() -> std::result::Result<Nccl, String> {
        let mut names: Vec<String> = std::env::var("FWL_NCCL_LIBRARY").into_iter().filter(|p| !p.is_empty()).collect();
        names.extend(["libnccl.so.2".to_string(), "libnccl.so".to_string()]);
        // SAFETY: loads NCCL, whose initialisers are its own (as cudarc would load it).
        let lib = names.iter().find_map(|n| unsafe { libloading::Library::new(n) }.ok());
        let lib = lib.ok_or_else(|| format!("no NCCL library (tried {names:?})"))?;
        // SAFETY: each symbol is looked up with the C signature NCCL's nccl.h declares for it.
        unsafe {
            let sym = |name: &str| format!("NCCL has no {name}");
            let get_unique_id = *lib.get::<GetUniqueId>(b"ncclGetUniqueId\0").map_err(|_| sym("ncclGetUniqueId"))?;
            let comm_init_rank =
                *lib.get::<CommInitRank>(b"ncclCommInitRank\0").map_err(|_| sym("ncclCommInitRank"))?;
            let all_gather = *lib.get::<AllGather>(b"ncclAllGather\0").map_err(|_| sym("ncclAllGather"))?;
            let comm_destroy = *lib.get::<CommDestroy>(b"ncclCommDestroy\0").map_err(|_| sym("ncclCommDestroy"))?;
            let get_error_string =
                *lib.get::<GetErrorString>(b"ncclGetErrorString\0").map_err(|_| sym("ncclGetErrorString"))?;
            let get_version = *lib.get::<GetVersion>(b"ncclGetVersion\0").map_err(|_| sym("ncclGetVersion"))?;
            let mut version = 0;
            if get_version(&mut version) != 0 {
                return Err("ncclGetVersion failed".into());
            }
            Ok(Nccl { _lib: lib, get_unique_id, comm_init_rank, all_gather, comm_destroy, get_error_string, version })
        }
    }

    /// NCCL's result code as an error with NCCL's message.
    fn check(&self, what: &str, code: c_int) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.get_error_string)(code)) }.to_string_lossy().into_owned();
        Err(Error::Collective(format!("{what}: NCCL error {code}: {msg}")))
    }
}

/// The NCCL library, or why it cannot be used (checked once per process).
fn nccl() -> Result<&'static Nccl> {
    static LIB: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    LIB.get_or_init(Nccl::open)
        .as_ref()
        .map_err(|reason| Error::BackendUnavailable { backend: Backend::Cuda, reason: format!("NCCL: {reason}") })
}

/// Whether NCCL can be used here, with its version (`22703` for 2.27.3), or why not.
pub fn nccl_status() -> std::result::Result<i32, String> {
    nccl().map(|n| n.version).map_err(|e| e.to_string())
}

/// The id that lets the ranks of a group find each other: made by one rank ([`NcclId::new`]),
/// sent to the others as bytes, rebuilt there ([`NcclId::from_bytes`]).
#[derive(Debug, Clone, Copy)]
pub struct NcclId(ncclUniqueId);

impl NcclId {
    /// A fresh id (on one rank only).
    pub fn new() -> Result<NcclId> {
        let lib = nccl()?;
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid ncclUniqueId to fill.
        lib.check("ncclGetUniqueId", unsafe { (lib.get_unique_id)(&mut id) })?;
        Ok(NcclId(id))
    }

    /// The id's bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0.internal.map(|c| c as u8)
    }

    /// The id from the bytes rank 0 sent.
    pub fn from_bytes(bytes: [u8; 128]) -> NcclId {
        NcclId(ncclUniqueId { internal: bytes.map(|b| b as c_char) })
    }
}

/// One rank's NCCL communicator: a [`DeviceCollective`] whose all-gathers are queued on the
/// stream each call is given (which must belong to the communicator's device).
#[derive(Debug)]
pub struct NcclGroup {
    comm: ncclComm_t,
    rank: usize,
    size: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `NcclGroup` is
// not `Sync`, so no two threads use it at once.
unsafe impl Send for NcclGroup {}

impl NcclGroup {
    /// Joins the group of `size` ranks named by `id` as rank `rank`, on `ctx`'s device (one GPU
    /// per rank). Blocks until every rank has joined (NCCL's `ncclCommInitRank`).
    pub fn new(ctx: &Arc<CudaContext>, id: &NcclId, rank: usize, size: usize) -> Result<NcclGroup> {
        status().map_err(|reason| Error::BackendUnavailable { backend: Backend::Cuda, reason })?;
        let lib = nccl()?;
        crate::parallel::check_group(rank, size)?;
        // NCCL takes the device from the calling thread's current context
        ctx.bind_to_thread().map_err(drv("binding the context"))?;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is one made by ncclGetUniqueId.
        lib.check("ncclCommInitRank", unsafe { (lib.comm_init_rank)(&mut comm, size as c_int, id.0, rank as c_int) })?;
        Ok(NcclGroup { comm, rank, size, ctx: ctx.clone() })
    }

    /// A group of one rank on `ctx`'s device (NCCL's path with nothing to exchange: for checks).
    pub fn single(ctx: &Arc<CudaContext>) -> Result<NcclGroup> {
        Self::new(ctx, &NcclId::new()?, 0, 1)
    }

    /// The communicator's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn gather<T>(
        &self,
        dtype: ncclDataType_t,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, T>,
        recv: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        if recv.len() != send.len() * self.size {
            let expected = send.len() * self.size;
            return Err(Error::ExchangeLength { what: "all-gather receive buffer", expected, got: recv.len() });
        }
        super::same_context(&self.ctx, stream)?;
        let lib = nccl()?;
        let (s, _g1) = send.device_ptr(stream);
        let (r, _g2) = recv.device_ptr_mut(stream);
        // SAFETY: send holds `send.len()` elements and recv `size` times that, of the type
        // `dtype` names, on this communicator's device; the call is queued on `stream`, which
        // keeps both alive through the guards' recorded events.
        let code = unsafe {
            (lib.all_gather)(
                s as *const c_void,
                r as *mut c_void,
                send.len(),
                dtype,
                self.comm,
                stream.cu_stream() as *mut c_void,
            )
        };
        lib.check("ncclAllGather", code)
    }
}

impl DeviceCollective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather_f32(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.gather(ncclDataType_t::ncclFloat32, stream, send, recv)
    }
    fn all_gather_f64(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, f64>,
        recv: &mut CudaViewMut<'_, f64>,
    ) -> Result<()> {
        self.gather(ncclDataType_t::ncclFloat64, stream, send, recv)
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if let Ok(lib) = nccl() {
            // SAFETY: the communicator was made by ncclCommInitRank and is destroyed once; an
            // error here has nobody to report to.
            let _ = unsafe { (lib.comm_destroy)(self.comm) };
        }
    }
}
