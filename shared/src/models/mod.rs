//! Neural networks in candle, one file per family (see `../../STYLE` habits): the
//! EfficientNet-Lite backbone and the layers it is made of.

pub mod depthwise;
pub mod detector;
pub mod efficientnet_lite;
pub mod embedder;
pub mod epilogue;
pub mod layers;
mod planes;
mod pointwise;
pub mod torch_import;
pub mod weights_file;

/// The backbone's short name in model versions, from the backbone file a config names:
/// `efficientnet-lite2.safetensors` → `lite2`; another file gives its stem.
pub fn backbone_tag(backbone_file: &str) -> &str {
    let stem = backbone_file.strip_suffix(".safetensors").unwrap_or(backbone_file);
    stem.strip_prefix("efficientnet-").unwrap_or(stem)
}

/// Runs a forward pass on a worker of rayon's global pool (directly when already on one).
///
/// Our kernels and gemm parallelise each operation with rayon. Called from a thread outside
/// the pool, every one of the ~100 operations of a pass would hand its work to the pool and
/// put the caller to sleep until done: a cross-thread wake-up per operation, which the
/// profile showed as scheduler time and which kept two threads no faster than one. On a
/// worker, an operation's first half runs where it is and only the rest is stolen.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() { f() } else { rayon::scope(|_| f()) }
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn a_backbone_file_gives_its_short_name() {
        assert_eq!(super::backbone_tag("efficientnet-lite0.safetensors"), "lite0");
        assert_eq!(super::backbone_tag("efficientnet-lite2.safetensors"), "lite2");
        assert_eq!(super::backbone_tag("resnet50.safetensors"), "resnet50");
    }
}
