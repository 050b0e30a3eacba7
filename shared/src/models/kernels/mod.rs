//! Our networks' layers: convolutions with BatchNorm folded in, and the custom ops behind
//! them (depthwise, 1×1, the fused epilogue, the phase planes of strided convolutions). On
//! the CPU our own kernels; on a CUDA GPU (`--features cuda`) our GPU kernels for the
//! depthwise convolution and the epilogue ([`gpu`]) and candle's ops for the rest.

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
pub mod trainable;

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
