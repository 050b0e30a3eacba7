//! Differentiable CPU ops for fine-tuning backbone blocks: a depthwise convolution (TF
//! "SAME", any stride) and ReLU6, each a candle custom op with its own backward.
//!
//! Why not candle's ops: its grouped convolution runs one convolution per channel, a sum of
//! k² shifted views costs k² zero-padded copies backwards, and `clamp`'s backward goes
//! through comparisons and selects (130 ms for one 1152×10×10 activation at batch 16,
//! against about 1 ms here). Plain loops over (image, channel) planes, one rayon task per
//! plane, each summing in a fixed order: the results do not depend on the thread count.
//! Other devices take the same computation from candle's ops (see [`depthwise`],
//! [`relu6`]).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_values;
use super::layers::same_padding;
use crate::Result;

/// `x` `[n, c, h, w]` through the depthwise filters `w` `[c, 1, k, k]` at stride `s`, TF
/// "SAME" padded, without bias: `[n, c, ceil(h/s), ceil(w/s)]`, differentiable in both.
pub fn depthwise(x: &Tensor, w: &Tensor, s: usize) -> Result<Tensor> {
    if x.device().is_cpu() {
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Depthwise { stride: s })?);
    }
    let (_, c, h, wd) = x.dims4()?;
    let k = w.dim(2)?;
    let (pt, pb) = same_padding(h, k, s);
    let (pl, pr) = same_padding(wd, k, s);
    Ok(x.pad_with_zeros(D::Minus2, pt, pb)?.pad_with_zeros(D::Minus1, pl, pr)?.conv2d(w, 0, s, 1, c)?)
}

/// `min(max(x, 0), 6)`, differentiable (gradient 1 strictly inside, 0 outside).
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return Ok(x.contiguous()?.apply_op1(Relu6)?);
    }
    Ok(x.clamp(0f32, 6f32)?)
}

/// Where a depthwise layer's output positions read their input.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    ho: usize,
    wo: usize,
    /// Padding before the first row and column.
    pt: usize,
    pl: usize,
}

impl Geometry {
    fn new(h: usize, w: usize, k: usize, s: usize) -> Self {
        Self { h, w, k, s, ho: h.div_ceil(s), wo: w.div_ceil(s), pt: same_padding(h, k, s).0, pl: same_padding(w, k, s).0 }
    }

    /// Calls `f(output index, input index, tap index)` for every tap of every output
    /// position that reads inside the plane, in a fixed order.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        for oy in 0..self.ho {
            for ty in 0..self.k {
                let Some(iy) = (oy * self.s + ty).checked_sub(self.pt).filter(|&iy| iy < self.h) else { continue };
                for ox in 0..self.wo {
                    for tx in 0..self.k {
                        let Some(ix) = (ox * self.s + tx).checked_sub(self.pl).filter(|&ix| ix < self.w) else { continue };
                        f(oy * self.wo + ox, iy * self.w + ix, ty * self.k + tx);
                    }
                }
            }
        }
    }
}

/// The depthwise convolution of `x` (arg 1) by `w` (arg 2).
struct Depthwise {
    stride: usize,
}

/// Shapes of the depthwise op's operands: `(n, c, geometry)`.
fn depthwise_shapes(x: &Layout, w: &Layout, stride: usize) -> candle_core::Result<(usize, usize, Geometry)> {
    let (n, c, h, wd) = x.shape().dims4()?;
    let (wc, one, k, kw) = w.shape().dims4()?;
    if wc != c || one != 1 || kw != k || stride == 0 {
        candle_core::bail!("depthwise: input {:?} and filters {:?} (stride {stride}) do not fit", x.shape(), w.shape());
    }
    Ok((n, c, Geometry::new(h, wd, k, stride)))
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "trainable-depthwise"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (cpu_values(xs, xl, "depthwise")?, cpu_values(ws, wl, "depthwise")?);
        let (n, c, g) = depthwise_shapes(xl, wl, self.stride)?;
        let (plane_in, plane_out, taps) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
        let mut y = vec![0f32; n * c * plane_out];
        y.par_chunks_mut(plane_out.max(1)).enumerate().for_each(|(plane, out)| {
            let (src, filter) = (&x[plane * plane_in..][..plane_in], &w[(plane % c) * taps..][..taps]);
            g.for_each_tap(|o, i, t| out[o] += src[i] * filter[t]);
        });
        Ok((CpuStorage::F32(y), Shape::from((n, c, g.ho, g.wo))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_y = grad_y.contiguous()?;
        let grad_x = grad_y.apply_op2_no_bwd(w, &DepthwiseGradInput { stride: self.stride, input: x.dims4()? })?;
        let grad_w = x.apply_op2_no_bwd(&grad_y, &DepthwiseGradFilter { stride: self.stride, kernel: w.dim(2)? })?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// The gradient of the depthwise op's input: `grad_y` (arg 1) spread back through `w` (arg 2).
struct DepthwiseGradInput {
    stride: usize,
    /// The input's shape `(n, c, h, w)`.
    input: (usize, usize, usize, usize),
}

impl CustomOp2 for DepthwiseGradInput {
    fn name(&self) -> &'static str {
        "trainable-depthwise-grad-input"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (grad_y, w) = (cpu_values(gs, gl, "depthwise backward")?, cpu_values(ws, wl, "depthwise backward")?);
        let (n, c, h, wd) = self.input;
        let k = wl.shape().dims4()?.2;
        let g = Geometry::new(h, wd, k, self.stride);
        if gl.shape().dims4()? != (n, c, g.ho, g.wo) {
            candle_core::bail!("depthwise backward: gradient {:?} does not fit input {:?}", gl.shape(), self.input);
        }
        let (plane_in, plane_out, taps) = (h * wd, g.ho * g.wo, k * k);
        let mut grad_x = vec![0f32; n * c * plane_in];
        grad_x.par_chunks_mut(plane_in.max(1)).enumerate().for_each(|(plane, out)| {
            let (src, filter) = (&grad_y[plane * plane_out..][..plane_out], &w[(plane % c) * taps..][..taps]);
            g.for_each_tap(|o, i, t| out[i] += src[o] * filter[t]);
        });
        Ok((CpuStorage::F32(grad_x), Shape::from(self.input)))
    }
}

/// The gradient of the depthwise filters: input `x` (arg 1) against `grad_y` (arg 2),
/// summed over the batch.
struct DepthwiseGradFilter {
    stride: usize,
    kernel: usize,
}

impl CustomOp2 for DepthwiseGradFilter {
    fn name(&self) -> &'static str {
        "trainable-depthwise-grad-filter"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, grad_y) = (cpu_values(xs, xl, "depthwise backward")?, cpu_values(gs, gl, "depthwise backward")?);
        let (n, c, h, wd) = xl.shape().dims4()?;
        let k = self.kernel;
        let g = Geometry::new(h, wd, k, self.stride);
        if gl.shape().dims4()? != (n, c, g.ho, g.wo) {
            candle_core::bail!("depthwise backward: gradient {:?} does not fit input {:?}", gl.shape(), xl.shape());
        }
        let (plane_in, plane_out) = (h * wd, g.ho * g.wo);
        let mut grad_w = vec![0f32; c * k * k];
        // One task per channel, images in order: a fixed summation order.
        grad_w.par_chunks_mut(k * k).enumerate().for_each(|(ch, out)| {
            for image in 0..n {
                let plane = image * c + ch;
                let (src, grad) = (&x[plane * plane_in..][..plane_in], &grad_y[plane * plane_out..][..plane_out]);
                g.for_each_tap(|o, i, t| out[t] += grad[o] * src[i]);
            }
        });
        Ok((CpuStorage::F32(grad_w), Shape::from((c, 1, k, k))))
    }
}

/// ReLU6 with its own backward.
struct Relu6;

impl CustomOp1 for Relu6 {
    fn name(&self) -> &'static str {
        "trainable-relu6"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_values(storage, layout, "relu6")?;
        Ok((CpuStorage::F32(x.par_iter().map(|v| v.clamp(0.0, 6.0)).collect()), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad_y.contiguous()?, &Relu6Grad)?))
    }
}

/// `grad_y` (arg 2) where the input `x` (arg 1) lies strictly inside (0, 6), else 0.
struct Relu6Grad;

impl CustomOp2 for Relu6Grad {
    fn name(&self) -> &'static str {
        "trainable-relu6-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, grad) = (cpu_values(xs, xl, "relu6 backward")?, cpu_values(gs, gl, "relu6 backward")?);
        if x.len() != grad.len() {
            candle_core::bail!("relu6 backward: input {:?}, gradient {:?}", xl.shape(), gl.shape());
        }
        let out = x.par_iter().zip(grad).map(|(&v, &g)| if v > 0.0 && v < 6.0 { g } else { 0.0 }).collect();
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Forward and both gradients against candle's grouped convolution (its own autograd),
    /// over kernels, strides and odd sizes.
    #[test]
    fn depthwise_and_its_gradients_match_candles_grouped_convolution() {
        let dev = Device::Cpu;
        for (k, s, h, w) in [(3usize, 1usize, 7usize, 6usize), (5, 2, 10, 9), (3, 2, 8, 8), (5, 1, 5, 5), (1, 1, 3, 4)] {
            let (n, c) = (2, 3);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, w), &dev).unwrap()).unwrap();
            let f = Var::from_tensor(&Tensor::randn(0f32, 1., (c, 1, k, k), &dev).unwrap()).unwrap();
            let weights = Tensor::randn(0f32, 1., (n, c, h.div_ceil(s), w.div_ceil(s)), &dev).unwrap();
            let ours = depthwise(x.as_tensor(), f.as_tensor(), s).unwrap();
            let (pt, pb) = same_padding(h, k, s);
            let (pl, pr) = same_padding(w, k, s);
            let padded = x.as_tensor().pad_with_zeros(D::Minus2, pt, pb).unwrap().pad_with_zeros(D::Minus1, pl, pr).unwrap();
            let theirs = padded.conv2d(f.as_tensor(), 0, s, 1, c).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-4, "k={k} s={s}: forward");
            let ours_grads = (ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let theirs_grads = (theirs * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("input", &x), ("filters", &f)] {
                let (a, b) = (ours_grads.get(var).unwrap(), theirs_grads.get(var).unwrap());
                assert!(max_diff(a, b) < 1e-4, "k={k} s={s}: gradient of the {name}");
            }
        }
    }

    #[test]
    fn relu6_passes_the_gradient_only_strictly_inside() {
        let x = Var::from_tensor(&Tensor::new(&[-1f32, 0.0, 0.5, 5.9, 6.0, 7.0], &Device::Cpu).unwrap()).unwrap();
        let y = relu6(x.as_tensor()).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), [0.0, 0.0, 0.5, 5.9, 6.0, 6.0]);
        let grads = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(&x).unwrap().to_vec1::<f32>().unwrap(), [0.0, 0.0, 3.0, 3.0, 0.0, 0.0]);
    }
}
