//! The detector's head: a 1×1 lateral pyramid, a shared GroupNorm tower and one output
//! convolution, built from named parameters so that loading and training share it.

use std::collections::HashMap;

use candle_core::{D, Tensor};

use super::DetectorConfig;
use crate::models::Backbone;
use crate::models::kernels::group_norm::GroupNormRelu;
use crate::models::kernels::layers::ConvBn;
use crate::{Error, Result};

/// Largest `s_l · raw` before `exp`: boxes up to e^8 ≈ 3000 strides, far beyond any input.
const MAX_LOG_DISTANCE: f64 = 8.0;
const GN_EPS: f64 = 1e-5;

/// One convolution's parameters.
#[derive(Debug, Clone)]
pub struct Conv {
    /// `[out, in, k, k]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
    /// The same convolution as a CPU inference kernel ([`DetectorHead::for_inference`]).
    kernel: Option<ConvBn>,
}

impl Conv {
    pub fn new(weight: Tensor, bias: Tensor) -> Self {
        Self { weight, bias, kernel: None }
    }

    /// With its CPU inference kernel: the same function, no gradient.
    fn for_inference(&self) -> Result<Self> {
        let (weight, bias) = (self.weight.detach(), self.bias.detach());
        Ok(Self { kernel: Some(ConvBn::folded(&weight, &bias, 1)?), weight, bias })
    }

    /// The convolution on the CPU kernel when it has one and `x` is on the CPU.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.kernel {
            Some(kernel) if x.device().is_cpu() => kernel.forward(x),
            _ => self.forward_differentiable(x),
        }
    }

    /// Stride 1, "same" zero padding, as matrix products: candle's CPU `conv2d` runs a
    /// direct convolution that was 14 % of a detection's profile; unfolding the k×k
    /// neighbourhoods and multiplying by the weight matrix lands on the gemm kernels.
    /// Built from differentiable ops, so training uses it as well.
    fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        let (out, inp, k, _) = self.weight.dims4()?;
        let (n, c, h, w) = x.dims4()?;
        let cols = if k == 1 {
            x.reshape((n, c, h * w))?
        } else {
            let p = k / 2;
            let padded = x.pad_with_zeros(D::Minus2, p, p)?.pad_with_zeros(D::Minus1, p, p)?;
            let mut shifts = Vec::with_capacity(k * k);
            for dy in 0..k {
                for dx in 0..k {
                    shifts.push(padded.narrow(2, dy, h)?.narrow(3, dx, w)?);
                }
            }
            // [n, c, k·k, h, w] → [n, c·k·k, h·w], rows in the weight's (c, ky, kx) order.
            Tensor::stack(&shifts, 2)?.reshape((n, c * k * k, h * w))?
        };
        let wmat = self.weight.reshape((out, inp * k * k))?;
        let y = wmat.broadcast_left(n)?.matmul(&cols)?.reshape((n, out, h, w))?;
        Ok(y.broadcast_add(&self.bias.reshape((1, out, 1, 1))?)?)
    }
}

/// The trainable part: pyramid, tower and output convolution.
#[derive(Debug, Clone)]
pub struct DetectorHead {
    pub lateral: Vec<Conv>,
    /// Tower convolutions with their GroupNorm `(gamma, beta)`.
    pub tower: Vec<(Conv, Tensor, Tensor)>,
    /// The class logits' own tower (`DetectorConfig::class_tower`); empty: they read `tower`.
    pub class_tower: Vec<(Conv, Tensor, Tensor)>,
    /// `num_classes + 4 + 1` outputs: class logits, box distances, centre-ness.
    pub output: Conv,
    /// Per-level scale of the box distances, `[levels]`.
    pub scales: Tensor,
    groups: usize,
    /// Set by [`Self::for_inference`]: GroupNorm and ReLU run as one CPU kernel.
    inference: bool,
}

/// How a parameter starts when training from scratch.
#[derive(Debug, Clone)]
pub enum ParamInit {
    /// Normal with this standard deviation.
    Normal(f64),
    Const(f64),
    /// These exact values (the output bias: class logits start at a prior).
    Values(Vec<f32>),
}

/// Supplies a parameter by name, shape and initialisation.
pub type ParamSource<'a> = dyn FnMut(&str, &[usize], ParamInit) -> Result<Tensor> + 'a;

impl DetectorHead {
    /// Builds the head, asking `param(name, shape, init)` for each tensor: a variable store
    /// when training, a weights file when loading.
    pub fn build(config: &DetectorConfig, in_channels: &[usize], param: &mut ParamSource<'_>) -> Result<Self> {
        config.validate()?;
        if in_channels.len() != config.strides.len() {
            return Err(Error::InvalidWeights { reason: format!("the backbone gives {} pyramid levels, the detector expects {}", in_channels.len(), config.strides.len()) });
        }
        let c = config.channels;
        let conv = |param: &mut ParamSource<'_>, name: &str, out: usize, inp: usize, k: usize, std: f64, bias: ParamInit| -> Result<Conv> {
            Ok(Conv::new(param(&format!("{name}.weight"), &[out, inp, k, k], ParamInit::Normal(std))?, param(&format!("{name}.bias"), &[out], bias)?))
        };
        // He initialisation where ReLU follows; the output starts small (std 0.01, FCOS).
        let he = |inp: usize, k: usize| (2.0 / (inp * k * k) as f64).sqrt();
        let lateral = in_channels
            .iter()
            .enumerate()
            .map(|(i, &ch)| conv(&mut *param, &format!("fpn.lateral.{i}"), c, ch, 1, he(ch, 1), ParamInit::Const(0.0)))
            .collect::<Result<Vec<_>>>()?;
        let mut tower_of = |prefix: &str| -> Result<Vec<(Conv, Tensor, Tensor)>> {
            (0..config.tower)
                .map(|i| {
                    let t = conv(&mut *param, &format!("{prefix}.{i}"), c, c, 3, he(c, 3), ParamInit::Const(0.0))?;
                    let gamma = param(&format!("{prefix}.{i}.gn.weight"), &[c], ParamInit::Const(1.0))?;
                    let beta = param(&format!("{prefix}.{i}.gn.bias"), &[c], ParamInit::Const(0.0))?;
                    Ok((t, gamma, beta))
                })
                .collect()
        };
        let tower = tower_of("tower")?;
        let class_tower = if config.class_tower { tower_of("class_tower")? } else { Vec::new() };
        // Focal-loss prior: every class starts at probability 0.01 (FCOS, RetinaNet), so
        // the thousands of background locations do not swamp the first steps.
        let k = config.num_classes();
        let prior = -((1.0 - 0.01f32) / 0.01).ln();
        let mut bias = vec![prior; k];
        bias.extend([0.0; 5]);
        let output = conv(&mut *param, "output", k + 5, c, 3, 0.01, ParamInit::Values(bias))?;
        let scales = param("scales", &[config.strides.len()], ParamInit::Const(1.0))?;
        Ok(Self { lateral, tower, class_tower, output, scales, groups: config.groups, inference: false })
    }

    /// The same head with CPU kernels for its convolutions and its GroupNorm: what detection
    /// runs (the differentiable form, which training needs, cost a quarter of a detection
    /// for a fifth of its arithmetic). The class rows of the output convolution, when the
    /// class tower feeds them, still run the differentiable form.
    pub fn for_inference(&self) -> Result<Self> {
        let tower = |t: &[(Conv, Tensor, Tensor)]| t.iter().map(|(c, g, b)| Ok((c.for_inference()?, g.detach(), b.detach()))).collect::<Result<Vec<_>>>();
        Ok(Self {
            lateral: self.lateral.iter().map(Conv::for_inference).collect::<Result<_>>()?,
            tower: tower(&self.tower)?,
            class_tower: tower(&self.class_tower)?,
            output: self.output.for_inference()?,
            scales: self.scales.detach(),
            groups: self.groups,
            inference: true,
        })
    }

    /// Pyramid features (finest first) → `[n, num_classes + 5, locations]`, levels
    /// concatenated finest first, row-major within a level.
    pub fn forward(&self, features: &[Tensor]) -> Result<Tensor> {
        let mut laterals = features.iter().zip(&self.lateral).map(|(f, l)| l.forward(f)).collect::<Result<Vec<_>>>()?;
        for i in (0..laterals.len().saturating_sub(1)).rev() {
            let (_, _, h, w) = laterals[i].dims4()?;
            let up = laterals[i + 1].upsample_nearest2d(h, w)?;
            laterals[i] = (&laterals[i] + up)?;
        }
        let mut outputs = Vec::with_capacity(laterals.len());
        for (level, p) in laterals.iter().enumerate() {
            let x = self.run_tower(&self.tower, p)?;
            let y = if self.class_tower.is_empty() {
                self.output.forward(&x)?
            } else {
                // The output convolution's class rows read the class tower, its box and
                // centre-ness rows the shared one.
                let k = self.output.weight.dim(0)? - 5;
                let rows = |start: usize, len: usize| -> Result<Conv> { Ok(Conv::new(self.output.weight.narrow(0, start, len)?, self.output.bias.narrow(0, start, len)?)) };
                let classes = rows(0, k)?.forward(&self.run_tower(&self.class_tower, p)?)?;
                Tensor::cat(&[&classes, &rows(k, 5)?.forward(&x)?], 1)?
            };
            let (n, ch, h, w) = y.dims4()?;
            let y = y.reshape((n, ch, h * w))?;
            // Distances: exp(scale_level · raw), clamped so a wild logit cannot overflow.
            let k = ch - 5;
            let scale = self.scales.narrow(0, level, 1)?;
            let dist = y.narrow(1, k, 4)?.broadcast_mul(&scale)?.clamp(-MAX_LOG_DISTANCE, MAX_LOG_DISTANCE)?.exp()?;
            outputs.push(Tensor::cat(&[&y.narrow(1, 0, k)?, &dist, &y.narrow(1, k + 4, 1)?], 1)?);
        }
        Ok(Tensor::cat(&outputs, 2)?)
    }

    fn run_tower(&self, tower: &[(Conv, Tensor, Tensor)], p: &Tensor) -> Result<Tensor> {
        let mut x = p.clone();
        for (conv, gamma, beta) in tower {
            let y = conv.forward(&x)?;
            x = if self.inference && y.device().is_cpu() {
                GroupNormRelu::new(gamma, beta, self.groups, GN_EPS)?.apply(y.contiguous()?)?
            } else {
                group_norm(&y, self.groups, gamma, beta)?.relu()?
            };
        }
        Ok(x)
    }

    /// Named tensors as saved.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, l) in self.lateral.iter().enumerate() {
            out.insert(format!("fpn.lateral.{i}.weight"), l.weight.clone());
            out.insert(format!("fpn.lateral.{i}.bias"), l.bias.clone());
        }
        for (prefix, tower) in [("tower", &self.tower), ("class_tower", &self.class_tower)] {
            for (i, (c, g, b)) in tower.iter().enumerate() {
                out.insert(format!("{prefix}.{i}.weight"), c.weight.clone());
                out.insert(format!("{prefix}.{i}.bias"), c.bias.clone());
                out.insert(format!("{prefix}.{i}.gn.weight"), g.clone());
                out.insert(format!("{prefix}.{i}.gn.bias"), b.clone());
            }
        }
        out.insert("output.weight".into(), self.output.weight.clone());
        out.insert("output.bias".into(), self.output.bias.clone());
        out.insert("scales".into(), self.scales.clone());
        out
    }

    /// A copy detached from any training graph.
    pub fn detached(&self) -> Result<Self> {
        let c = |x: &Conv| -> Result<Conv> { Ok(Conv::new(x.weight.detach().copy()?, x.bias.detach().copy()?)) };
        Ok(Self {
            lateral: self.lateral.iter().map(c).collect::<Result<_>>()?,
            tower: self.tower.iter().map(|(x, g, b)| Ok((c(x)?, g.detach().copy()?, b.detach().copy()?))).collect::<Result<_>>()?,
            class_tower: self.class_tower.iter().map(|(x, g, b)| Ok((c(x)?, g.detach().copy()?, b.detach().copy()?))).collect::<Result<_>>()?,
            output: c(&self.output)?,
            scales: self.scales.detach().copy()?,
            groups: self.groups,
            inference: self.inference,
        })
    }
}

/// GroupNorm (Wu & He, arXiv 1803.08494) from primitive ops, so that it trains.
pub(crate) fn group_norm(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let g = x.reshape((n, groups, (c / groups) * h * w))?;
    let mean = g.mean_keepdim(D::Minus1)?;
    let centred = g.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + GN_EPS)?.sqrt()?)?.reshape((n, c, h, w))?;
    Ok(normed.broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?.broadcast_add(&beta.reshape((1, c, 1, 1))?)?)
}

/// Channels of the head's inputs for `config` on `backbone`.
pub fn input_channels(backbone: &Backbone, config: &DetectorConfig) -> Vec<usize> {
    let mut channels = backbone.pyramid_channels();
    if config.semantic_top
        && let Some(last) = channels.last_mut()
    {
        *last = backbone.feature_dim();
    }
    channels
}

/// The head's inputs from the backbone's pyramid (f32): the coarsest level through the
/// backbone's head convolution when the config asks for it. Training applies it to cached
/// pyramids the same way.
pub fn head_inputs(backbone: &Backbone, config: &DetectorConfig, mut levels: Vec<Tensor>) -> Result<Vec<Tensor>> {
    if config.semantic_top
        && let Some(last) = levels.pop()
    {
        levels.push(backbone.head_features(&last)?);
    }
    Ok(levels)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn unfolded_convolution_matches_candles() {
        let dev = Device::Cpu;
        for (k, c, o, h, w) in [(3usize, 5usize, 4usize, 7usize, 6usize), (1, 8, 3, 5, 5), (3, 2, 2, 1, 3)] {
            let conv = Conv::new(Tensor::randn(0f32, 1., (o, c, k, k), &dev).unwrap(), Tensor::randn(0f32, 1., o, &dev).unwrap());
            let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let fast = conv.forward(&x).unwrap();
            let slow = x.conv2d(&conv.weight, k / 2, 1, 1, 1).unwrap().broadcast_add(&conv.bias.reshape((1, o, 1, 1)).unwrap()).unwrap();
            let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "k={k}: {diff}");
        }
    }

    /// A head of the shipped detector's shape, every parameter drawn from its name (the
    /// class tower's from its shared twin's, unless `nudge`d), on 3 pyramid levels.
    fn head(class_tower: bool, nudge: f32) -> (DetectorHead, Vec<Tensor>) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/detector-lite0.safetensors");
        let mut config: DetectorConfig = crate::models::formats::weights_file::read_config(&path).unwrap();
        config.class_tower = class_tower;
        let in_channels = [40usize, 112, 320];
        let mut param = |name: &str, shape: &[usize], _: ParamInit| -> Result<Tensor> {
            let twin = name.strip_prefix("class_").filter(|_| name.starts_with("class_tower.")).unwrap_or(name);
            let seed = twin.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| (((seed.wrapping_add(i as u64 * 2654435761)) % 1000) as f32 / 1000.0 - 0.5) * 0.2).collect();
            let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
            Ok(if name.starts_with("class_tower.") { (t + nudge as f64)? } else { t })
        };
        let head = DetectorHead::build(&config, &in_channels, &mut param).unwrap();
        let features = in_channels.iter().zip([8usize, 4, 2]).map(|(&c, s)| Tensor::randn(0f32, 1., (1, c, s, s), &Device::Cpu).unwrap()).collect();
        (head, features)
    }

    #[test]
    fn a_class_tower_copied_from_the_shared_one_gives_its_outputs_and_then_moves_only_the_classes() {
        let (shared, features) = head(false, 0.0);
        let (copied, _) = head(true, 0.0);
        assert_eq!(copied.class_tower.len(), shared.tower.len());
        let a = shared.forward(&features).unwrap();
        let b = copied.forward(&features).unwrap();
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
        // A class tower of its own changes the class logits, never the boxes or centre-ness.
        let (moved, _) = head(true, 0.05);
        let c = moved.forward(&features).unwrap();
        let k = a.dim(1).unwrap() - 5;
        let max_diff = |x: &Tensor, y: &Tensor| (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max_diff(&c.narrow(1, 0, k).unwrap(), &b.narrow(1, 0, k).unwrap()) > 1e-3);
        assert_eq!(max_diff(&c.narrow(1, k, 5).unwrap(), &b.narrow(1, k, 5).unwrap()), 0.0);
        assert!(moved.tensors().contains_key("class_tower.1.gn.bias"));
    }

    #[test]
    fn the_inference_head_computes_what_the_trained_one_does() {
        for class_tower in [false, true] {
            let (trained, features) = head(class_tower, 0.05);
            let inference = trained.for_inference().unwrap();
            assert!(inference.lateral.iter().chain([&inference.output]).all(|c| c.kernel.is_some()));
            let (want, got) = (trained.forward(&features).unwrap(), inference.forward(&features).unwrap());
            let diff = (&want - &got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4 * scale.max(1.0), "class tower {class_tower}: {diff} of {scale}");
        }
    }

    #[test]
    fn group_norm_normalises_each_group() {
        let x = Tensor::arange(0f32, 32., &Device::Cpu).unwrap().reshape((1, 4, 2, 4)).unwrap();
        let ones = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let zeros = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let y = group_norm(&x, 2, &ones, &zeros).unwrap();
        let g = y.reshape((2, 16)).unwrap();
        let mean = g.mean(1).unwrap().to_vec1::<f32>().unwrap();
        let var = g.sqr().unwrap().mean(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(mean.iter().all(|m| m.abs() < 1e-5), "{mean:?}");
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-3), "{var:?}");
    }
}
