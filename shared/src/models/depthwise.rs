//! Depthwise convolution (one k×k filter per channel) with TF "SAME" padding, BatchNorm
//! folded in and optional ReLU6: a candle custom op with a direct CPU kernel.
//!
//! candle's CPU backend runs grouped convolutions as one im2col + matmul per group, which made
//! EfficientNet-B0 take about a second per image (`../shared/STACK-NOTES.md` §4). Here each
//! (image, channel) plane is an independent task for rayon, and for stride 1 the innermost loop
//! runs over contiguous output columns, which the compiler vectorises. On other devices the
//! op falls back to candle's grouped convolution.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, D, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::layers::{Weights, fold_batchnorm, same_padding, take};
use crate::Result;

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
    /// Loads `{conv}.weight` `[c,1,k,k]` and folds `{bn}.*` into it.
    pub fn load(weights: &Weights, conv: &str, bn: &str, channels: usize, kernel: usize, stride: usize, relu6: bool, eps: f64) -> Result<Self> {
        let weight = take(weights, &format!("{conv}.weight"), &[channels, 1, kernel, kernel])?;
        let (scale, shift) = fold_batchnorm(weights, bn, channels, eps)?;
        let weight = weight.broadcast_mul(&scale.reshape((channels, 1, 1, 1))?)?.contiguous()?;
        let op = DepthwiseKernel {
            weight: Arc::new(weight.flatten_all()?.to_vec1::<f32>()?),
            bias: Arc::new(shift.to_vec1::<f32>()?),
            channels,
            kernel,
            stride,
            relu6,
        };
        Ok(Self { op, weight, bias: shift })
    }

    /// Moves the tensor copies of the parameters to `device` (the CPU kernel keeps its own).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            op: self.op.clone(),
            weight: self.weight.to_device(device)?,
            bias: self.bias.to_device(device)?,
        })
    }

    /// `x`: `[n, c, h, w]` → `[n, c, ceil(h/s), ceil(w/s)]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() {
            return Ok(x.apply_op1_no_bwd(&self.op)?);
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
        let y = x
            .conv2d(&self.weight, 0, self.op.stride, 1, c)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)?;
        Ok(if self.op.relu6 { y.clamp(0f32, 6f32)? } else { y })
    }
}

impl CustomOp1 for DepthwiseKernel {
    fn name(&self) -> &'static str {
        "depthwise-conv-bn"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("depthwise conv expects f32 input");
        };
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.channels {
            candle_core::bail!("depthwise conv has {} channels, input has {c}", self.channels);
        }
        let input = match layout.contiguous_offsets() {
            Some((start, end)) => &data[start..end],
            None => candle_core::bail!("depthwise conv expects a contiguous input"),
        };
        let (k, s) = (self.kernel, self.stride);
        let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
        let (pt, _) = same_padding(h, k, s);
        let (pl, _) = same_padding(w, k, s);
        let mut out = vec![0f32; n * c * ho * wo];
        out.par_chunks_mut(ho * wo).enumerate().for_each(|(plane, out)| {
            let ch = plane % c;
            let src = &input[plane * h * w..(plane + 1) * h * w];
            let filter = &self.weight[ch * k * k..(ch + 1) * k * k];
            out.fill(self.bias[ch]);
            for oy in 0..ho {
                let row = &mut out[oy * wo..(oy + 1) * wo];
                for ky in 0..k {
                    let iy = (oy * s + ky) as isize - pt as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let src_row = &src[iy as usize * w..(iy as usize + 1) * w];
                    for kx in 0..k {
                        let wt = filter[ky * k + kx];
                        // Output columns whose input column ox*s + kx - pl lies inside the row.
                        let first = pl.saturating_sub(kx).div_ceil(s);
                        let last = ((w + pl).saturating_sub(kx)).div_ceil(s).min(wo);
                        if first >= last {
                            continue;
                        }
                        if s == 1 {
                            let offset = first + kx - pl;
                            let src_part = &src_row[offset..offset + (last - first)];
                            for (o, i) in row[first..last].iter_mut().zip(src_part) {
                                *o += wt * i;
                            }
                        } else {
                            for (ox, o) in row.iter_mut().enumerate().take(last).skip(first) {
                                *o += wt * src_row[ox * s + kx - pl];
                            }
                        }
                    }
                }
            }
            if self.relu6 {
                out.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn layer(c: usize, k: usize, s: usize, relu6: bool) -> DepthwiseConvBn {
        let dev = Device::Cpu;
        let mut w = Weights::new();
        w.insert("d.weight".into(), Tensor::randn(0f32, 1., (c, 1, k, k), &dev).unwrap());
        w.insert("b.weight".into(), Tensor::rand(0.5f32, 1.5, c, &dev).unwrap());
        w.insert("b.bias".into(), Tensor::randn(0f32, 1., c, &dev).unwrap());
        w.insert("b.running_mean".into(), Tensor::randn(0f32, 1., c, &dev).unwrap());
        w.insert("b.running_var".into(), Tensor::rand(0.5f32, 2., c, &dev).unwrap());
        DepthwiseConvBn::load(&w, "d", "b", c, k, s, relu6, 1e-3).unwrap()
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
