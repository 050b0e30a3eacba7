//! Inference layers shared by our networks: convolutions with BatchNorm folded in at load
//! time, TensorFlow "SAME" padding, ReLU6.

use candle_core::{CpuStorage, CustomOp1, D, Device, Layout, Shape, Tensor};

use super::epilogue::Epilogue;
use super::planes::PlaneGeometry;
use super::pointwise::Pointwise;
use super::shifted::ShiftedConv;
use crate::Result;
use crate::models::formats::tensors::NamedTensors;

/// TensorFlow "SAME" padding for input `n`, kernel `k`, stride `s`: `(before, after)`, the
/// odd pixel after (bottom/right).
pub fn same_padding(n: usize, k: usize, s: usize) -> (usize, usize) {
    let out = n.div_ceil(s);
    let total = ((out - 1) * s + k).saturating_sub(n);
    (total / 2, total - total / 2)
}

/// BatchNorm statistics folded into a scale and shift per channel:
/// `bn(x) = x * scale + shift`.
pub fn fold_batchnorm(weights: &NamedTensors, prefix: &str, channels: usize, eps: f64) -> Result<(Tensor, Tensor)> {
    let gamma = weights.get(&format!("{prefix}.weight"), &[channels])?;
    let beta = weights.get(&format!("{prefix}.bias"), &[channels])?;
    let mean = weights.get(&format!("{prefix}.running_mean"), &[channels])?;
    let var = weights.get(&format!("{prefix}.running_var"), &[channels])?;
    let scale = (gamma / (var + eps)?.sqrt()?)?;
    let shift = (beta - (mean * &scale)?)?;
    Ok((scale, shift))
}

/// `min(max(x, 0), 6)`.
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    Ok(x.clamp(0f32, 6f32)?)
}

/// A dense convolution (groups = 1) with its BatchNorm folded into weight and bias.
#[derive(Debug, Clone)]
pub struct ConvBn {
    /// `[out, in, k, k]`, scaled by the BatchNorm.
    weight: Tensor,
    /// `[out]`.
    bias: Tensor,
    /// The bias (and what may follow it) applied in place after the product.
    epilogue: Epilogue,
    /// The CPU kernel of a 1×1, stride-1 convolution.
    pointwise: Option<Pointwise>,
    /// The CPU kernel of a k×k (k > 1), stride-1 convolution.
    shifted: Option<ShiftedConv>,
    /// A strided k×k convolution's product with its unfolded input (`[out, in·k·k]`).
    unfolded: Option<Pointwise>,
    kernel: usize,
    stride: usize,
    out_channels: usize,
}

impl ConvBn {
    /// Loads `{conv}.weight` `[out,in,k,k]` and folds `{bn}.*` into it. The arguments are
    /// the layer's shape as the backbone's config gives it, one value each.
    #[allow(clippy::too_many_arguments)]
    pub fn load(weights: &NamedTensors, conv: &str, bn: &str, in_channels: usize, out_channels: usize, kernel: usize, stride: usize, eps: f64) -> Result<Self> {
        let weight = weights.get(&format!("{conv}.weight"), &[out_channels, in_channels, kernel, kernel])?;
        let (scale, shift) = fold_batchnorm(weights, bn, out_channels, eps)?;
        let weight = weight.broadcast_mul(&scale.reshape((out_channels, 1, 1, 1))?)?;
        Self::folded(&weight, &shift, stride)
    }

    /// A convolution whose BatchNorm is already folded: `weight` `[out, in, k, k]` and
    /// `bias` `[out]` (as [`Self::parameters`] gives them, e.g. fine-tuned).
    pub fn folded(weight: &Tensor, shift: &Tensor, stride: usize) -> Result<Self> {
        let (out_channels, in_channels, kernel, _) = weight.dims4()?;
        let (weight, shift) = (weight.to_device(&Device::Cpu)?, shift.to_device(&Device::Cpu)?);
        let product = |inputs: usize| -> Result<Pointwise> {
            Ok(Pointwise {
                weight: std::sync::Arc::new(weight.flatten_all()?.to_vec1::<f32>()?),
                bias: std::sync::Arc::new(shift.to_vec1::<f32>()?),
                out_channels,
                in_channels: inputs,
                relu6: false,
            })
        };
        let pointwise = (kernel == 1 && stride == 1).then(|| product(in_channels)).transpose()?;
        let unfolded = (kernel > 1 && stride > 1).then(|| product(in_channels * kernel * kernel)).transpose()?;
        let shifted = (kernel > 1 && stride == 1)
            .then(|| -> Result<ShiftedConv> { Ok(ShiftedConv::new(&weight.flatten_all()?.to_vec1::<f32>()?, &shift.to_vec1::<f32>()?, out_channels, in_channels, kernel)) })
            .transpose()?;
        Ok(Self { weight: weight.contiguous()?, epilogue: Epilogue::new(&shift, false)?, pointwise, shifted, unfolded, bias: shift, kernel, stride, out_channels })
    }

    /// The folded weight `[out, in, k, k]` and bias `[out]`.
    pub(crate) fn parameters(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// Moves the parameters to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self { weight: self.weight.to_device(device)?, bias: self.bias.to_device(device)?, epilogue: self.epilogue.to_device(device)?, ..self.clone() })
    }

    /// `x`: `[n, in, h, w]` → `[n, out, ceil(h/s), ceil(w/s)]`, TF "SAME" padded.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false, None)
    }

    /// [`Self::forward`], then `+ residual` and ReLU6 if asked, fused into the bias pass.
    pub fn forward_with(&self, x: &Tensor, relu6: bool, residual: Option<&Tensor>) -> Result<Tensor> {
        if let Some(p) = &self.pointwise
            && x.device().is_cpu()
        {
            let op = Pointwise { relu6, ..p.clone() };
            let x = x.contiguous()?;
            return Ok(match residual {
                None => x.apply_op1_no_bwd(&op)?,
                Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op)?,
            });
        }
        if let Some(op) = &self.shifted
            && x.device().is_cpu()
            && residual.is_none()
        {
            return Ok(x.contiguous()?.apply_op1_no_bwd(&op.with_relu6(relu6))?);
        }
        let y = if self.kernel == 1 && self.stride == 1 {
            // A 1×1 convolution is a matrix product over the channel axis: no im2col copy.
            let (n, c, h, w) = x.dims4()?;
            let x = x.reshape((n, c, h * w))?;
            let wmat = self.weight.reshape((self.out_channels, c))?;
            wmat.broadcast_left(n)?.matmul(&x)?.reshape((n, self.out_channels, h, w))?
        } else if x.device().is_cpu() {
            // k×k neighbourhoods unfolded (TF-SAME, strided) and one matrix product: candle's
            // own im2col was 9 % of a backbone pass for the stem alone. The product runs on
            // the 1×1 kernel's blocks, bias and ReLU6 in the block, unless a residual comes.
            let (n, c, h, w) = x.dims4()?;
            let (k, s) = (self.kernel, self.stride);
            let cols = x.contiguous()?.apply_op1_no_bwd(&Unfold { kernel: k, stride: s })?;
            let shape = (n, self.out_channels, h.div_ceil(s), w.div_ceil(s));
            if let Some(op) = &self.unfolded
                && residual.is_none()
            {
                return Ok(cols.apply_op1_no_bwd(&Pointwise { relu6, ..op.clone() })?.reshape(shape)?);
            }
            let wmat = self.weight.reshape((self.out_channels, c * k * k))?;
            wmat.broadcast_left(n)?.matmul(&cols)?.reshape(shape)?
        } else {
            let (_, _, h, w) = x.dims4()?;
            let (pt, pb) = same_padding(h, self.kernel, self.stride);
            let (pl, pr) = same_padding(w, self.kernel, self.stride);
            let x = x.pad_with_zeros(D::Minus2, pt, pb)?.pad_with_zeros(D::Minus1, pl, pr)?;
            x.conv2d(&self.weight, 0, self.stride, 1, 1)?
        };
        self.epilogue.with_relu6(relu6).apply(y, residual)
    }

    /// The same convolution with candle's own `conv2d` whatever the kernel: the plain path
    /// our optimised one is measured and tested against.
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (pt, pb) = same_padding(h, self.kernel, self.stride);
        let (pl, pr) = same_padding(w, self.kernel, self.stride);
        let x = x.pad_with_zeros(D::Minus2, pt, pb)?.pad_with_zeros(D::Minus1, pl, pr)?;
        let y = x.conv2d(&self.weight, 0, self.stride, 1, 1)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, self.out_channels, 1, 1))?)?)
    }
}

/// `[n, c, h, w]` → `[n, c·k·k, ho·wo]`: the k×k neighbourhood of every output position
/// (TF "SAME" padding, stride s), rows in a convolution weight's `(c, ky, kx)` order.
#[derive(Debug, Clone, Copy)]
struct Unfold {
    kernel: usize,
    stride: usize,
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold-same"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = super::cpu_values(storage, layout, "unfold")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let g = PlaneGeometry::new(h, w, self.kernel, self.stride);
        let rows = self.kernel * self.kernel * g.ho * g.wo;
        let mut out = vec![0f32; n * c * rows];
        if !out.is_empty() {
            super::team::for_each_chunk_mut_init(
                &mut out,
                rows,
                || g.scratch(),
                |scratch, plane, chunk| {
                    g.fill_phases(&input[plane * h * w..(plane + 1) * h * w], scratch);
                    g.unfold(scratch, chunk);
                },
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c * self.kernel * self.kernel, g.ho * g.wo))))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(224, 3, 1), (1, 1));
        assert_eq!(same_padding(112, 5, 2), (1, 2));
        assert_eq!(same_padding(7, 5, 1), (2, 2));
        assert_eq!(same_padding(225, 3, 2), (1, 1));
        assert_eq!(same_padding(1, 5, 2), (2, 2));
    }

    #[test]
    fn unfolded_convolutions_equal_candles_conv2d_on_odd_sizes_strides_and_batches() {
        let dev = Device::Cpu;
        for (k, s) in [(3, 1), (3, 2), (5, 2)] {
            for (n, h, w) in [(1usize, 7usize, 7usize), (2, 9, 6), (1, 1, 5), (2, 16, 15)] {
                let mut wts = HashMap::<String, Tensor>::new();
                wts.insert("c.weight".into(), Tensor::randn(0f32, 1., (4, 3, k, k), &dev).unwrap());
                wts.insert("b.weight".into(), Tensor::rand(0.5f32, 1.5, 4, &dev).unwrap());
                wts.insert("b.bias".into(), Tensor::randn(0f32, 1., 4, &dev).unwrap());
                wts.insert("b.running_mean".into(), Tensor::randn(0f32, 1., 4, &dev).unwrap());
                wts.insert("b.running_var".into(), Tensor::rand(0.5f32, 2., 4, &dev).unwrap());
                let conv = ConvBn::load(&NamedTensors::new(wts, &dev, "test"), "c", "b", 3, 4, k, s, 1e-3).unwrap();
                let x = Tensor::randn(0f32, 1., (n, 3, h, w), &dev).unwrap();
                let fast = conv.forward_with(&x, true, None).unwrap();
                let plain = conv.forward_reference(&x).unwrap().clamp(0f32, 6f32).unwrap();
                assert_eq!(fast.dims(), plain.dims());
                let diff = (fast - plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "k={k} s={s} {n}×{h}×{w}: {diff}");
            }
        }
    }

    #[test]
    fn pointwise_blocks_with_residual_and_relu6_equal_candles_ops() {
        // 70 outputs and 33×40 positions: several blocks in both directions, ragged edges.
        let dev = Device::Cpu;
        let mut w = HashMap::<String, Tensor>::new();
        w.insert("c.weight".into(), Tensor::randn(0f32, 1., (70, 5, 1, 1), &dev).unwrap());
        w.insert("b.weight".into(), Tensor::rand(0.5f32, 1.5, 70, &dev).unwrap());
        w.insert("b.bias".into(), Tensor::randn(0f32, 1., 70, &dev).unwrap());
        w.insert("b.running_mean".into(), Tensor::randn(0f32, 1., 70, &dev).unwrap());
        w.insert("b.running_var".into(), Tensor::rand(0.5f32, 2., 70, &dev).unwrap());
        let conv = ConvBn::load(&NamedTensors::new(w, &dev, "test"), "c", "b", 5, 70, 1, 1, 1e-3).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 5, 33, 40), &dev).unwrap();
        let r = Tensor::randn(0f32, 2., (2, 70, 33, 40), &dev).unwrap();
        let fast = conv.forward_with(&x, true, Some(&r)).unwrap();
        let plain = (conv.forward_reference(&x).unwrap() + &r).unwrap().clamp(0f32, 6f32).unwrap();
        let diff = (fast - plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
        assert!(conv.forward_with(&x, false, Some(&x)).is_err(), "a residual of the wrong shape is refused");
    }

    #[test]
    fn pointwise_path_equals_the_general_convolution() {
        let dev = Device::Cpu;
        let mut w = HashMap::<String, Tensor>::new();
        w.insert("c.weight".into(), Tensor::randn(0f32, 1., (6, 4, 1, 1), &dev).unwrap());
        w.insert("b.weight".into(), Tensor::new(&[1f32, 2., 3., 4., 5., 6.], &dev).unwrap());
        w.insert("b.bias".into(), Tensor::new(&[0.5f32; 6], &dev).unwrap());
        w.insert("b.running_mean".into(), Tensor::new(&[0.1f32; 6], &dev).unwrap());
        w.insert("b.running_var".into(), Tensor::new(&[2f32; 6], &dev).unwrap());
        let conv = ConvBn::load(&NamedTensors::new(w, &dev, "test"), "c", "b", 4, 6, 1, 1, 1e-3).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 4, 5, 3), &dev).unwrap();
        let fast = conv.forward(&x).unwrap();
        let slow = x.conv2d(&conv.weight, 0, 1, 1, 1).unwrap().broadcast_add(&conv.bias.reshape((1, 6, 1, 1)).unwrap()).unwrap();
        let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
