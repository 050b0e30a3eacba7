//! Our networks' layers: convolutions with BatchNorm folded in, and the custom ops behind
//! them (depthwise and its inner loops, 1×1, k×k stride-1 as shifted products, GroupNorm,
//! the fused epilogue, the phase planes of strided convolutions). On the CPU our own
//! kernels; on a CUDA GPU (`--features cuda`) our GPU kernels for the depthwise convolution
//! and the epilogue ([`gpu`]) and candle's ops for the rest. The CPU kernels' parallel loops
//! go through [`team`]: helper threads of their own for a pass alone on the machine, rayon
//! for passes side by side.

pub mod depthwise;
pub mod epilogue;
#[cfg(feature = "cuda")]
mod gpu;
pub(crate) mod group_norm;
pub mod layers;
mod planes;
mod pointwise;
mod rows;
mod shifted;
mod team;
pub mod trainable;

pub(crate) use team::ForwardPass;
pub use team::side_by_side;

/// The f32 values of a custom op's contiguous CPU input; `op` names it in errors.
pub(crate) fn cpu_values<'a>(storage: &'a candle_core::CpuStorage, layout: &candle_core::Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} expects f32 input");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op} expects a contiguous input"),
    }
}

/// A raw pointer that may cross threads: the parallel blocks of a kernel write disjoint parts
/// of one output through it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so closures capture the whole wrapper (which is `Send`), not its
    /// raw pointer field.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` with `accumulate`: an `m × k` by `k × n`
/// product of row-major matrices with the given row strides (columns contiguous), on the
/// calling thread — our kernels cut their products into blocks and parallelise those.
///
/// # Safety
/// The pointers must hold their matrices at those strides, `dst` must be valid for writes
/// (and reads with `accumulate`) and alias neither input.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_on_this_thread(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_stride: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_stride: usize,
    rhs: *const f32,
    rhs_stride: usize,
) {
    // SAFETY: as the caller promises; without `accumulate` gemm reads no destination value.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            accumulate,
            lhs,
            1,
            lhs_stride as isize,
            rhs,
            1,
            rhs_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
