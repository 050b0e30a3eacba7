//! Our GPU kernels (`cuda/kernels.cu`, compiled to PTX by `build.rs`) behind candle's
//! custom-op CUDA path: the depthwise convolution and the epilogue, which candle would
//! otherwise run as one grouped convolution split into a convolution per channel (hundreds
//! of kernel launches per layer) and as three out-of-place passes. Each kernel computes
//! what its CPU kernel computes in the same order, so the two agree bit for bit
//! (`shared/tests/integration/gpu.rs`). Only in `--features cuda` builds.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Storage, Tensor, bail};

use super::layers::same_padding;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/shoplens_kernels.ptx"));
const MODULE: &str = "shoplens_kernels";

/// Runs `f` on the values of `t`, a contiguous f32 tensor on a CUDA device.
fn with_values<R>(t: &Tensor, what: &str, f: impl FnOnce(CudaView<'_, f32>) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else { bail!("{what}: expected a CUDA tensor") };
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{what}: expected a contiguous tensor") };
    f(s.as_cuda_slice::<f32>()?.slice(start..end))
}

/// The depthwise convolution of [`super::depthwise::DepthwiseConvBn`] on a GPU: TF "SAME"
/// padding, BatchNorm folded into `weight` `[c, 1, k, k]` and `bias` `[c]` (both on the
/// input's device), optional ReLU6.
#[derive(Debug, Clone)]
pub(crate) struct DepthwiseGpu {
    pub weight: Tensor,
    pub bias: Tensor,
    pub kernel: usize,
    pub stride: usize,
    pub relu6: bool,
}

impl CustomOp1 for DepthwiseGpu {
    fn name(&self) -> &'static str {
        "depthwise-conv-bn-gpu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("the GPU depthwise kernel takes CUDA tensors (the CPU has its own kernel)")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let (k, s) = (self.kernel, self.stride);
        if self.weight.dims() != [c, 1, k, k] || self.bias.dims() != [c] {
            bail!("depthwise kernel of weight {:?} and bias {:?} applied to {c} channels", self.weight.dims(), self.bias.dims());
        }
        let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
        let count = n * c * ho * wo;
        if count == 0 {
            bail!("depthwise convolution of an empty input {:?}", layout.shape().dims());
        }
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("depthwise convolution expects a contiguous input") };
        let (pad_top, _) = same_padding(h, k, s);
        let (pad_left, _) = same_padding(w, k, s);
        let x = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = &storage.device;
        // SAFETY: every value is written by the kernel below.
        let out = unsafe { dev.alloc::<f32>(count)? };
        let func = dev.get_or_load_custom_func("shoplens_depthwise_f32", MODULE, PTX)?;
        with_values(&self.weight, "depthwise weight", |weight| {
            with_values(&self.bias, "depthwise bias", |bias| {
                let mut args = func.builder();
                args.arg(&x);
                args.arg(&weight);
                args.arg(&bias);
                args.arg(&out);
                let dims = [n, c, h, w, ho, wo, k, s, pad_top, pad_left].map(|v| v as u32);
                for d in &dims {
                    args.arg(d);
                }
                let relu6 = self.relu6 as i32;
                args.arg(&relu6);
                // SAFETY: the argument list matches the kernel's signature.
                unsafe { args.launch(LaunchConfig::for_num_elems(count as u32)) }.w()?;
                Ok(())
            })
        })?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((n, c, ho, wo))))
    }
}

/// The epilogue of [`super::epilogue::Epilogue`] on a GPU, in place on `y` `[n, c, ...]`:
/// `+ bias` (`[c]`, on `y`'s device) `+ residual` (same shape as `y`), then ReLU6 if asked.
pub(crate) fn epilogue(y: &mut CudaStorage, layout: &Layout, bias: &Tensor, residual: Option<(&CudaStorage, &Layout)>, relu6: bool) -> candle_core::Result<()> {
    let dims = layout.shape().dims();
    if dims.len() < 2 || bias.dims() != [dims[1]] {
        bail!("epilogue of bias {:?} applied to shape {dims:?}", bias.dims());
    }
    let (c, plane, total) = (dims[1], dims[2..].iter().product::<usize>(), layout.shape().elem_count());
    if total == 0 {
        return Ok(());
    }
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("epilogue expects a contiguous tensor") };
    let residual = match residual {
        Some((r, r_layout)) => match r_layout.contiguous_offsets() {
            Some((rs, re)) if re - rs == total => Some(r.as_cuda_slice::<f32>()?.slice(rs..re)),
            _ => bail!("epilogue residual {:?} does not match {dims:?} or is not contiguous", r_layout.shape().dims()),
        },
        None => None,
    };
    let dev = y.device.clone();
    let func = dev.get_or_load_custom_func("shoplens_epilogue_f32", MODULE, PTX)?;
    let mut values = y.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
    with_values(bias, "epilogue bias", |bias| {
        let mut args = func.builder();
        args.arg(&mut values);
        args.arg(&bias);
        // The kernel reads a null residual pointer as "none".
        let null = 0u64;
        match &residual {
            Some(r) => args.arg(r),
            None => args.arg(&null),
        };
        let (total_arg, c_arg, plane_arg, relu6_arg) = (total as u64, c as u32, plane as u32, relu6 as i32);
        args.arg(&total_arg);
        args.arg(&c_arg);
        args.arg(&plane_arg);
        args.arg(&relu6_arg);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { args.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
        Ok(())
    })
}
