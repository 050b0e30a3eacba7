//! Inference layers shared by our networks: convolutions with BatchNorm folded in at load
//! time, TensorFlow "SAME" padding, ReLU6.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor};

use super::epilogue::Epilogue;
use crate::{Error, Result};

/// Named tensors of a weights file.
pub type Weights = HashMap<String, Tensor>;

/// Takes a tensor out of `weights`, checking its shape.
pub fn take(weights: &Weights, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = weights.get(name).ok_or_else(|| Error::InvalidWeights {
        reason: format!("tensor {name} is missing"),
    })?;
    if t.dims() != shape {
        return Err(Error::InvalidWeights {
            reason: format!("tensor {name} has shape {:?}, expected {shape:?}", t.dims()),
        });
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// TensorFlow "SAME" padding for input `n`, kernel `k`, stride `s`: `(before, after)`, the
/// odd pixel after (bottom/right).
pub fn same_padding(n: usize, k: usize, s: usize) -> (usize, usize) {
    let out = n.div_ceil(s);
    let total = ((out - 1) * s + k).saturating_sub(n);
    (total / 2, total - total / 2)
}

/// BatchNorm statistics folded into a scale and shift per channel:
/// `bn(x) = x * scale + shift`.
pub fn fold_batchnorm(weights: &Weights, prefix: &str, channels: usize, eps: f64) -> Result<(Tensor, Tensor)> {
    let gamma = take(weights, &format!("{prefix}.weight"), &[channels])?;
    let beta = take(weights, &format!("{prefix}.bias"), &[channels])?;
    let mean = take(weights, &format!("{prefix}.running_mean"), &[channels])?;
    let var = take(weights, &format!("{prefix}.running_var"), &[channels])?;
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
    kernel: usize,
    stride: usize,
    out_channels: usize,
}

impl ConvBn {
    /// Loads `{conv}.weight` `[out,in,k,k]` and folds `{bn}.*` into it.
    pub fn load(weights: &Weights, conv: &str, bn: &str, in_channels: usize, out_channels: usize, kernel: usize, stride: usize, eps: f64) -> Result<Self> {
        let weight = take(weights, &format!("{conv}.weight"), &[out_channels, in_channels, kernel, kernel])?;
        let (scale, shift) = fold_batchnorm(weights, bn, out_channels, eps)?;
        let weight = weight.broadcast_mul(&scale.reshape((out_channels, 1, 1, 1))?)?;
        Ok(Self {
            weight: weight.contiguous()?,
            epilogue: Epilogue::new(&shift, false)?,
            bias: shift,
            kernel,
            stride,
            out_channels,
        })
    }

    /// Moves the parameters to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_device(device)?,
            bias: self.bias.to_device(device)?,
            epilogue: self.epilogue.to_device(device)?,
            ..self.clone()
        })
    }

    /// `x`: `[n, in, h, w]` → `[n, out, ceil(h/s), ceil(w/s)]`, TF "SAME" padded.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false, None)
    }

    /// [`Self::forward`], then `+ residual` and ReLU6 if asked, fused into the bias pass.
    pub fn forward_with(&self, x: &Tensor, relu6: bool, residual: Option<&Tensor>) -> Result<Tensor> {
        let y = if self.kernel == 1 && self.stride == 1 {
            // A 1×1 convolution is a matrix product over the channel axis: no im2col copy.
            let (n, c, h, w) = x.dims4()?;
            let x = x.reshape((n, c, h * w))?;
            let wmat = self.weight.reshape((self.out_channels, c))?;
            wmat.broadcast_left(n)?.matmul(&x)?.reshape((n, self.out_channels, h, w))?
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

#[cfg(test)]
mod tests {
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
    fn pointwise_path_equals_the_general_convolution() {
        let dev = Device::Cpu;
        let mut w = Weights::new();
        w.insert("c.weight".into(), Tensor::randn(0f32, 1., (6, 4, 1, 1), &dev).unwrap());
        w.insert("b.weight".into(), Tensor::new(&[1f32, 2., 3., 4., 5., 6.], &dev).unwrap());
        w.insert("b.bias".into(), Tensor::new(&[0.5f32; 6], &dev).unwrap());
        w.insert("b.running_mean".into(), Tensor::new(&[0.1f32; 6], &dev).unwrap());
        w.insert("b.running_var".into(), Tensor::new(&[2f32; 6], &dev).unwrap());
        let conv = ConvBn::load(&w, "c", "b", 4, 6, 1, 1, 1e-3).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 4, 5, 3), &dev).unwrap();
        let fast = conv.forward(&x).unwrap();
        let slow = x
            .conv2d(&conv.weight, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&conv.bias.reshape((1, 6, 1, 1)).unwrap())
            .unwrap();
        let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
