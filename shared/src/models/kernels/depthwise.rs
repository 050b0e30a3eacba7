//! Depthwise convolution (one k×k filter per channel) with TF "SAME" padding, BatchNorm
//! folded in and optional ReLU6: a candle custom op with a direct CPU kernel.
//!
//! candle's CPU backend runs grouped convolutions as one im2col + matmul per group, which made
//! EfficientNet-B0 take about a second per image (`../shared/STACK-NOTES.md` §4). Here
//! (image, channel) planes are independent tasks (small planes grouped), each plane is
//! rearranged once so that every filter tap is one contiguous multiply-add (see
//! [`PlaneGeometry`]), and that loop is compiled for AVX-512 and AVX2 as well as the
//! baseline, chosen at run time. Multiplies and adds stay separate (no FMA contraction), so
//! every instruction set gives the same bits. On a CUDA GPU our GPU kernel runs instead
//! (`gpu.rs`, the same bits); on other devices candle's grouped convolution.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, D, Layout, Shape, Tensor};

use super::layers::{fold_batchnorm, same_padding};
use super::planes::{LANES, PlaneGeometry};
#[cfg(target_arch = "x86_64")]
use super::rows::Avx512;
use super::rows::{PlaneLoops, Portable, RowMap};
use crate::Result;
use crate::models::formats::tensors::NamedTensors;

/// A depthwise convolution with its BatchNorm folded in.
#[derive(Debug, Clone)]
pub struct DepthwiseConvBn {
    op: DepthwiseKernel,
    /// The same parameters as tensors, for devices without the CPU kernel.
    weight: Tensor,
    bias: Tensor,
}

#[derive(Debug, Clone)]
struct DepthwiseKernel {
    /// `[c, k, k]`, scaled by the BatchNorm.
    weight: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    channels: usize,
    kernel: usize,
    stride: usize,
    relu6: bool,
}

impl DepthwiseConvBn {
    /// Loads `{conv}.weight` `[c,1,k,k]` and folds `{bn}.*` into it. The arguments are the
    /// layer's shape as the backbone's config gives it, one value each.
    #[allow(clippy::too_many_arguments)]
    pub fn load(weights: &NamedTensors, conv: &str, bn: &str, channels: usize, kernel: usize, stride: usize, relu6: bool, eps: f64) -> Result<Self> {
        if !(1..=MAX_KERNEL).contains(&kernel) || stride == 0 {
            return Err(crate::Error::InvalidWeights {
                reason: format!("{conv}: depthwise kernel {kernel}×{kernel}, stride {stride}: kernels from 1 to {MAX_KERNEL}, stride ≥ 1"),
            });
        }
        let weight = weights.get(&format!("{conv}.weight"), &[channels, 1, kernel, kernel])?;
        let (scale, shift) = fold_batchnorm(weights, bn, channels, eps)?;
        let weight = weight.broadcast_mul(&scale.reshape((channels, 1, 1, 1))?)?;
        Self::folded(&weight, &shift, stride, relu6)
    }

    /// A depthwise convolution whose BatchNorm is already folded: `weight` `[c, 1, k, k]`,
    /// `bias` `[c]` (as [`Self::parameters`] gives them, e.g. fine-tuned).
    pub fn folded(weight: &Tensor, shift: &Tensor, stride: usize, relu6: bool) -> Result<Self> {
        let (channels, one, kernel, kw) = weight.dims4()?;
        if one != 1 || kw != kernel || !(1..=MAX_KERNEL).contains(&kernel) || stride == 0 {
            return Err(crate::Error::InvalidWeights {
                reason: format!("depthwise weight {:?}, stride {stride}: [c, 1, k, k] with k from 1 to {MAX_KERNEL}, stride ≥ 1", weight.dims()),
            });
        }
        let (weight, shift) = (weight.to_device(&candle_core::Device::Cpu)?.contiguous()?, shift.to_device(&candle_core::Device::Cpu)?);
        let op = DepthwiseKernel { weight: Arc::new(weight.flatten_all()?.to_vec1::<f32>()?), bias: Arc::new(shift.to_vec1::<f32>()?), channels, kernel, stride, relu6 };
        Ok(Self { op, weight, bias: shift })
    }

    /// The folded weight `[c, 1, k, k]` and bias `[c]`.
    pub(crate) fn parameters(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// Moves the tensor copies of the parameters to `device` (the CPU kernel keeps its own).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self { op: self.op.clone(), weight: self.weight.to_device(device)?, bias: self.bias.to_device(device)? })
    }

    /// `x`: `[n, c, h, w]` → `[n, c, ceil(h/s), ceil(w/s)]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() {
            return Ok(x.apply_op1_no_bwd(&self.op)?);
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let op = super::gpu::DepthwiseGpu { weight: self.weight.clone(), bias: self.bias.clone(), kernel: self.op.kernel, stride: self.op.stride, relu6: self.op.relu6 };
            return Ok(x.contiguous()?.apply_op1_no_bwd(&op)?);
        }
        self.forward_reference(x)
    }

    /// The same computation with candle's own grouped convolution.
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let k = self.op.kernel;
        let (pt, pb) = same_padding(h, k, self.op.stride);
        let (pl, pr) = same_padding(w, k, self.op.stride);
        let x = x.pad_with_zeros(D::Minus2, pt, pb)?.pad_with_zeros(D::Minus1, pl, pr)?;
        let y = x.conv2d(&self.weight, 0, self.op.stride, 1, c)?.broadcast_add(&self.bias.reshape((1, c, 1, 1))?)?;
        Ok(if self.op.relu6 { y.clamp(0f32, 6f32)? } else { y })
    }
}

impl CustomOp1 for DepthwiseKernel {
    fn name(&self) -> &'static str {
        "depthwise-conv-bn"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = super::cpu_values(storage, layout, "depthwise conv")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.channels {
            candle_core::bail!("depthwise conv has {} channels, input has {c}", self.channels);
        }
        let geometry = PlaneGeometry::new(h, w, self.kernel, self.stride);
        let (ho, wo) = (geometry.ho, geometry.wo);
        let len = n * c * ho * wo;
        if len == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from((n, c, ho, wo))));
        }
        // Small planes (7×7, 14×14) are grouped so a task is worth its hand-off.
        let planes_per_task = MIN_TASK_OUTPUTS.div_ceil(ho * wo).max(1);
        let (kernel, starts) = (Kernel::detect(), geometry.tap_starts());
        // Not zeroed first: every plane writes all its values (see `plane`).
        let mut out = Vec::with_capacity(len);
        super::team::for_each_chunk_mut_init(
            &mut out.spare_capacity_mut()[..len],
            ho * wo * planes_per_task,
            || geometry.scratch(),
            |scratch, task, chunk| {
                for (j, out) in chunk.chunks_mut(ho * wo).enumerate() {
                    let plane = task * planes_per_task + j;
                    let ch = plane % c;
                    let src = &input[plane * h * w..(plane + 1) * h * w];
                    let filter = &self.weight[ch * self.kernel * self.kernel..(ch + 1) * self.kernel * self.kernel];
                    kernel.plane(&geometry, &starts, src, RowMap::Copy, scratch, filter, self.bias[ch], self.relu6, out);
                }
            },
        );
        // SAFETY: the chunks cover all `len` values, and `plane` wrote every one of them.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

/// An MBConv block's expand convolution (1×1, bias, ReLU6) and its depthwise convolution
/// fused on the CPU, per group of channels: a task multiplies its rows of the expand
/// weight by the block's input (one single-threaded gemm call), adds the bias, clamps,
/// and runs the depthwise kernel on those planes while they are still in its core's cache.
///
/// Unfused, the expanded activation (the largest tensor of the block, 4.8 MB for Lite0's
/// second block) is written by one parallel operation and read back by three more, each
/// handing its work across threads; fused, it never leaves the task that made it.
#[derive(Debug, Clone)]
pub(crate) struct ExpandDepthwise {
    /// `[hidden, in]`, row-major, BatchNorm folded.
    expand_weight: Arc<Vec<f32>>,
    expand_bias: Arc<Vec<f32>>,
    in_channels: usize,
    depthwise: DepthwiseKernel,
}

/// Expanded values a fused task holds at most (512 KB, within the 2 MB L2 of the Xeons we
/// run on): fewer, larger tasks than at 128 KB made a detection 8 % faster, with the same
/// bits (a channel's expanded values do not depend on the other channels of its task).
const FUSED_TASK_VALUES: usize = 128 * 1024;

impl ExpandDepthwise {
    /// `expand_weight` `[hidden, in, 1, 1]` and `expand_bias` `[hidden]` (folded) before
    /// `depthwise`.
    pub fn new(expand_weight: &Tensor, expand_bias: &Tensor, depthwise: &DepthwiseConvBn) -> Result<Self> {
        let (hidden, in_channels, kh, kw) = expand_weight.dims4()?;
        if hidden != depthwise.op.channels || kh != 1 || kw != 1 {
            return Err(crate::Error::InvalidWeights {
                reason: format!("expand {hidden}×{in_channels}×{kh}×{kw} does not feed a depthwise convolution of {} channels", depthwise.op.channels),
            });
        }
        Ok(Self {
            expand_weight: Arc::new(expand_weight.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?),
            expand_bias: Arc::new(expand_bias.to_device(&candle_core::Device::Cpu)?.to_vec1::<f32>()?),
            in_channels,
            depthwise: depthwise.op.clone(),
        })
    }

    /// `x` `[n, in, h, w]` on the CPU → the depthwise output `[n, hidden, ho, wo]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1_no_bwd(self)?)
    }
}

impl CustomOp1 for ExpandDepthwise {
    fn name(&self) -> &'static str {
        "expand-depthwise"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = super::cpu_values(storage, layout, "expand-depthwise")?;
        let (n, cin, h, w) = layout.shape().dims4()?;
        if cin != self.in_channels {
            candle_core::bail!("expand convolution has {} inputs, the tensor has {cin}", self.in_channels);
        }
        let dw = &self.depthwise;
        let hidden = dw.channels;
        let g = PlaneGeometry::new(h, w, dw.kernel, dw.stride);
        let (plane_in, plane_out) = (h * w, g.ho * g.wo);
        let len = n * hidden * plane_out;
        if len == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from((n, hidden, g.ho, g.wo))));
        }
        // Not zeroed first (a memset of the block's largest output): every plane writes all
        // its values (see `plane`).
        let mut out = Vec::with_capacity(len);
        // Channels per task from the sizes alone (never from the thread count), so the
        // results do not depend on how many threads run them; at least 4 tasks per image.
        let group = (FUSED_TASK_VALUES / plane_in).clamp(1, hidden.div_ceil(4).max(1));
        let (kernel, starts) = (Kernel::detect(), g.tap_starts());
        let k2 = dw.kernel * dw.kernel;
        // Tasks: the images' channel groups, one loop over all of them.
        let groups = hidden.div_ceil(group);
        let out_image_len = hidden * plane_out;
        let base = super::SendPtr(out.as_mut_ptr());
        super::team::for_each_task_init(
            n * groups,
            // The expanded values are written whole by gemm before they are read, so their
            // buffer is never zeroed (half a megabyte per task).
            || (Vec::<f32>::with_capacity(group * plane_in), g.scratch()),
            |(expanded, scratch), task| {
                let (image, c0) = (task / groups, (task % groups) * group);
                let x = &input[image * cin * plane_in..(image + 1) * cin * plane_in];
                let channels = group.min(hidden - c0);
                // SAFETY: task (image, group) alone writes this group's planes of the image,
                // all within the `len` values of `out`'s capacity.
                let out_chunk =
                    unsafe { std::slice::from_raw_parts_mut(base.get().add(image * out_image_len + c0 * plane_out).cast::<std::mem::MaybeUninit<f32>>(), channels * plane_out) };
                expanded.clear();
                let weight = &self.expand_weight[c0 * cin..(c0 + channels) * cin];
                // SAFETY: expanded has room for channels×plane_in values, weight is
                // channels×cin and x cin×plane_in, all row-major; with read_dst false gemm
                // writes every value of the destination and reads none, so after it the
                // first channels×plane_in values are initialised.
                unsafe {
                    super::product_on_this_thread(channels, plane_in, cin, expanded.as_mut_ptr(), plane_in, false, weight.as_ptr(), cin, x.as_ptr(), plane_in);
                    expanded.set_len(channels * plane_in);
                }
                for (j, (plane, out)) in expanded.chunks_exact(plane_in).zip(out_chunk.chunks_exact_mut(plane_out)).enumerate() {
                    let ch = c0 + j;
                    let b = self.expand_bias[ch];
                    kernel.plane(&g, &starts, plane, RowMap::BiasRelu6(b), scratch, &dw.weight[ch * k2..(ch + 1) * k2], dw.bias[ch], dw.relu6, out);
                }
            },
        );
        // SAFETY: the tasks cover every image's channel groups, and `plane` wrote every value.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((n, hidden, g.ho, g.wo))))
    }
}

/// Outputs per task at least.
const MIN_TASK_OUTPUTS: usize = 4096;

/// The multiply-add loops, compiled once per instruction set and chosen at run time: the
/// crate is built for baseline x86-64 (SSE2), and this loop is where wider vectors pay.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Self::Avx2Fma;
            }
        }
        Self::Baseline
    }

    /// One plane: copies `src` through `map` into the phase planes at the front of
    /// `scratch`, then convolves them into `out`. `starts` comes from
    /// [`PlaneGeometry::tap_starts`], `filter` holds the plane's k² weights; `out`
    /// (`ho × wo`, possibly uninitialised) is written whole. The copies are
    /// compiled for the chosen instruction set too: on the fused path they are as much work
    /// as the taps.
    #[allow(clippy::too_many_arguments)]
    fn plane(self, g: &PlaneGeometry, starts: &[usize], src: &[f32], map: RowMap, scratch: &mut [f32], filter: &[f32], bias: f32, relu6: bool, out: &mut [MaybeUninit<f32>]) {
        match self {
            Self::Baseline => plane(Portable, g, starts, src, map, scratch, filter, bias, relu6, out),
            // SAFETY: `detect` chose these only where the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Fma => unsafe { plane_avx2(g, starts, src, map, scratch, filter, bias, relu6, out) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { plane_avx512(g, starts, src, map, scratch, filter, bias, relu6, out) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn plane_avx2(g: &PlaneGeometry, starts: &[usize], src: &[f32], map: RowMap, scratch: &mut [f32], filter: &[f32], bias: f32, relu6: bool, out: &mut [MaybeUninit<f32>]) {
    plane(Portable, g, starts, src, map, scratch, filter, bias, relu6, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn plane_avx512(g: &PlaneGeometry, starts: &[usize], src: &[f32], map: RowMap, scratch: &mut [f32], filter: &[f32], bias: f32, relu6: bool, out: &mut [MaybeUninit<f32>]) {
    // SAFETY: this function runs only where the CPU has AVX-512F (its caller checked).
    let rows = unsafe { Avx512::new() };
    plane(rows, g, starts, src, map, scratch, filter, bias, relu6, out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn plane(
    rows: impl PlaneLoops,
    g: &PlaneGeometry,
    starts: &[usize],
    src: &[f32],
    map: RowMap,
    scratch: &mut [f32],
    filter: &[f32],
    bias: f32,
    relu6: bool,
    out: &mut [MaybeUninit<f32>],
) {
    g.fill_phases_mapped(src, scratch, map, rows);
    taps(rows, g, starts, scratch, filter, bias);
    let (acc, map) = (&scratch[g.phases_len()..], if relu6 { RowMap::Relu6 } else { RowMap::Copy });
    for (oy, row) in out.chunks_exact_mut(g.wo).enumerate() {
        rows.copy(&acc[oy * g.wph..oy * g.wph + g.wo], 1, row, map);
    }
}

/// Largest kernel side of the CPU kernel (EfficientNet uses 3 and 5).
const MAX_KERNEL: usize = 7;

/// One plane's sums into the wide accumulator after the phase planes in `scratch`. The
/// plane is computed `wph` wide (see [`PlaneGeometry`]): output position `p` of the wide
/// plane takes tap `t` from `phases[starts[t] + p]`, so every tap of a run of positions is a
/// contiguous slice, and runs of [`LANES`] positions keep their sums in registers across all
/// k² taps (one load per tap, one store at the end).
#[inline(always)]
fn taps(loops: impl PlaneLoops, g: &PlaneGeometry, starts: &[usize], scratch: &mut [f32], filter: &[f32], bias: f32) {
    let (phases, acc) = scratch.split_at_mut(g.phases_len());
    // Whole vectors only: the last one runs past the plane into the zeros after the phases
    // and its extra outputs are dropped with the wide columns. (A scalar tail cost more
    // than the rest of a 7×7 plane.)
    let run = ((g.ho - 1) * g.wph + g.wo).div_ceil(LANES) * LANES;
    loops.taps(phases, &starts[..g.k * g.k], &filter[..g.k * g.k], bias, &mut acc[..run]);
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use std::collections::HashMap;

    use super::*;
    use crate::models::kernels::rows::as_destination;

    fn layer(c: usize, k: usize, s: usize, relu6: bool) -> DepthwiseConvBn {
        let dev = Device::Cpu;
        let mut w = HashMap::<String, Tensor>::new();
        w.insert("d.weight".into(), Tensor::randn(0f32, 1., (c, 1, k, k), &dev).unwrap());
        w.insert("b.weight".into(), Tensor::rand(0.5f32, 1.5, c, &dev).unwrap());
        w.insert("b.bias".into(), Tensor::randn(0f32, 1., c, &dev).unwrap());
        w.insert("b.running_mean".into(), Tensor::randn(0f32, 1., c, &dev).unwrap());
        w.insert("b.running_var".into(), Tensor::rand(0.5f32, 2., c, &dev).unwrap());
        DepthwiseConvBn::load(&NamedTensors::new(w, &dev, "test"), "d", "b", c, k, s, relu6, 1e-3).unwrap()
    }

    #[test]
    fn groups_of_small_planes_keep_each_plane_its_own_channel() {
        // 3 images × 37 channels of 7×7: a task holds many planes and crosses images.
        for (k, s) in [(3, 1), (5, 2)] {
            let conv = layer(37, k, s, true);
            let x = Tensor::randn(0f32, 1., (3, 37, 7, 7), &Device::Cpu).unwrap();
            let diff = (conv.forward(&x).unwrap() - conv.forward_reference(&x).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "k={k} s={s}: {diff}");
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        // Planes whose wide runs take one, four and eight vectors at a time, strides 1 and 2.
        for (h, w, k, s) in [(13usize, 11usize, 5usize, 2usize), (7, 7, 3, 1), (40, 37, 3, 1), (29, 31, 5, 2)] {
            let g = PlaneGeometry::new(h, w, k, s);
            let src: Vec<f32> = (0..h * w).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let filter: Vec<f32> = (0..k * k).map(|i| (i as f32 - 12.0) / 9.0).collect();
            for (map, relu6) in [(RowMap::BiasRelu6(0.5), true), (RowMap::Copy, false)] {
                let run = |kernel: Kernel| {
                    let mut scratch = g.scratch();
                    let mut out = vec![0f32; g.ho * g.wo];
                    kernel.plane(&g, &g.tap_starts(), &src, map, &mut scratch, &filter, 0.25, relu6, as_destination(&mut out));
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(run(Kernel::Baseline), run(Kernel::detect()), "{h}×{w}, k {k}, stride {s}, {map:?}");
            }
        }
    }

    #[test]
    fn matches_candles_grouped_convolution_on_odd_sizes_strides_and_batches() {
        for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
            for (n, h, w) in [(1, 7, 7), (2, 9, 6), (3, 1, 5), (1, 16, 16), (2, 11, 13)] {
                let conv = layer(5, k, s, k == 5);
                let x = Tensor::randn(0f32, 1., (n, 5, h, w), &Device::Cpu).unwrap();
                let fast = conv.forward(&x).unwrap();
                let slow = conv.forward_reference(&x).unwrap();
                assert_eq!(fast.dims(), slow.dims());
                let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "k={k} s={s} n={n} h={h} w={w}: {diff}");
            }
        }
    }
}
