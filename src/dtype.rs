//! Element types: logits (`f32`, `f16`, `bf16`) and token ids (`i32`, `i64`, `u32`).

use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use half::{bf16, f16};
use std::fmt;
use std::str::FromStr;

/// Precision of logits or gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The short name used by the CLI and in JSON output (`f32`, `f16`, `bf16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => Err(format!("unknown dtype '{other}' (expected f32, f16 or bf16)")),
        }
    }
}

mod sealed {
    /// With the `cuda` feature every element type can live in device memory.
    #[cfg(feature = "cuda")]
    pub trait Device: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
    #[cfg(feature = "cuda")]
    impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> Device for T {}
    #[cfg(not(feature = "cuda"))]
    pub trait Device {}
    #[cfg(not(feature = "cuda"))]
    impl<T> Device for T {}

    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
    impl Sealed for u32 {}
}

/// A logits (and gradient) element type: `f32`, [`half::f16`] or [`half::bf16`].
///
/// All arithmetic is done in `f32`; narrower types are widened on load and rounded to nearest
/// even on store, except that the CPU backend's bf16 stores turn results below `f32`'s smallest
/// normal (about 1.2e-38, bf16's too) into zeros of their sign, at every instruction-set level
/// (as the AVX-512 BF16 conversion does; `half::bf16::from_f32` keeps them as subnormals). The
/// trait is sealed.
pub trait Logit:
    Copy + Default + Send + Sync + PartialEq + fmt::Debug + 'static + sealed::Sealed + sealed::Device
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widen one value.
    fn to_f32(self) -> f32;
    /// Round one value from `f32`.
    fn from_f32(x: f32) -> Self;
    /// `n` zeros from the allocator's zeroed memory: no fill pass (pages are touched when
    /// first written), unlike `vec![Self::default(); n]` for the 16-bit types.
    fn zeroed(n: usize) -> Vec<Self>;
    /// The raw bits of a 16-bit type (converted by the crate's own vector code), `None` for f32.
    #[doc(hidden)]
    fn as_bits(s: &[Self]) -> Option<&[u16]>;
    /// The raw bits of a 16-bit type, `None` for f32.
    #[doc(hidden)]
    fn as_bits_mut(s: &mut [Self]) -> Option<&mut [u16]>;
    /// The slice itself when `Self` is `f32` (no copy needed), `None` otherwise.
    #[doc(hidden)]
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// The slice itself when `Self` is `f32`, `None` otherwise.
    #[doc(hidden)]
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
}

impl Logit for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn zeroed(n: usize) -> Vec<Self> {
        vec![0.0; n]
    }
    #[inline(always)]
    fn as_bits(_: &[Self]) -> Option<&[u16]> {
        None
    }
    #[inline(always)]
    fn as_bits_mut(_: &mut [Self]) -> Option<&mut [u16]> {
        None
    }
    #[inline(always)]
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline(always)]
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
}

macro_rules! half_logit {
    ($t:ty, $tag:expr) => {
        impl Logit for $t {
            const DTYPE: DType = $tag;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }
            fn zeroed(n: usize) -> Vec<Self> {
                // bits 0 are +0.0; a vector of integer zeros comes from zeroed memory
                vec![0u16; n].reinterpret_into()
            }
            #[inline(always)]
            fn as_bits(s: &[Self]) -> Option<&[u16]> {
                Some(s.reinterpret_cast())
            }
            #[inline(always)]
            fn as_bits_mut(s: &mut [Self]) -> Option<&mut [u16]> {
                Some(s.reinterpret_cast_mut())
            }
            #[inline(always)]
            fn as_f32(_: &[Self]) -> Option<&[f32]> {
                None
            }
            #[inline(always)]
            fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
                None
            }
        }
    };
}
half_logit!(f16, DType::F16);
half_logit!(bf16, DType::BF16);

/// A token id element type: `i32`, `i64` or `u32`. The trait is sealed.
pub trait TokenId: Copy + Send + Sync + fmt::Debug + 'static + sealed::Sealed + sealed::Device {
    /// The kernel-name suffix of this type (`i32`, `i64`, `u32`).
    #[doc(hidden)]
    const NAME: &'static str;
    /// The id as a signed 64-bit integer.
    fn to_i64(self) -> i64;
    /// An index below [`MAX_VOCAB`](crate::MAX_VOCAB) as this type (it always fits).
    #[doc(hidden)]
    fn from_index(i: u32) -> Self;
}

impl TokenId for i32 {
    const NAME: &'static str = "i32";
    #[inline(always)]
    fn from_index(i: u32) -> Self {
        i as i32
    }
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
}
impl TokenId for i64 {
    const NAME: &'static str = "i64";
    #[inline(always)]
    fn from_index(i: u32) -> Self {
        i as i64
    }
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self
    }
}
impl TokenId for u32 {
    const NAME: &'static str = "u32";
    #[inline(always)]
    fn from_index(i: u32) -> Self {
        i
    }
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
}
