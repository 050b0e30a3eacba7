//! The detection network: finds every garment of a photo with its box and category.
//!
//! One-stage and anchor-free, after FCOS (Tian et al., arXiv 1904.01355), on the shared
//! EfficientNet-Lite backbone: the backbone's stride-8/16/32 block outputs → a light
//! feature pyramid (1×1 laterals, nearest-neighbour top-down sums) → one tower of 3×3
//! convolutions with GroupNorm, shared by all levels → one 3×3 output convolution giving,
//! per location, a logit per category, four distances to the box sides (`exp(s_l · raw)`
//! strides) and a centre-ness logit. Score = `sqrt(sigmoid(class) · sigmoid(centreness))`,
//! then class-wise non-maximum suppression.
//!
//! Why FCOS rather than CenterNet or SSD: no anchor shapes to tune for garments whose
//! aspect ranges from belts to dresses, a loss that converges in tens of epochs on a few
//! hundred photos (CenterNet needs many more), and a single output convolution whose cost
//! is small next to the backbone's.
//!
//! Weights: `models/detector-*.safetensors` holds the head (the backbone stays frozen and
//! is named by file, as for the embedder) and its [`DetectorConfig`] as metadata: the
//! taxonomy, input size and preprocessing, thresholds and the training record.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::efficientnet_lite::EfficientNetLite;
use super::weights_file;
use crate::geometry::BBox;
use crate::vision::{LetterboxGeometry, Preprocess};
use crate::{Error, Result};

/// Largest `s_l · raw` before `exp`: boxes up to e^8 ≈ 3000 strides, far beyond any input.
const MAX_LOG_DISTANCE: f64 = 8.0;
const GN_EPS: f64 = 1e-5;

/// A category the detector knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Category {
    /// The id in the training data's annotations (`category_id`).
    pub id: u32,
    pub name: String,
}

/// What a detector's weights file says about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// The backbone weights file, relative to this file's directory.
    pub backbone: String,
    /// Output index → category, from the training data.
    pub categories: Vec<Category>,
    /// Square letterboxed input (side a multiple of 32) and normalisation.
    pub preprocess: Preprocess,
    /// Pyramid and tower width.
    pub channels: usize,
    /// 3×3 convolutions in the shared tower.
    pub tower: usize,
    /// GroupNorm groups in the tower.
    pub groups: usize,
    /// Strides of the pyramid levels, finest first.
    pub strides: Vec<usize>,
    /// The coarsest level is the backbone's 1280-channel head features (its ImageNet
    /// semantics) instead of the last block's output.
    #[serde(default)]
    pub semantic_top: bool,
    /// Default post-processing for serving and indexing.
    pub postprocess: Postprocess,
    /// Recorded with every garment it finds; a change means re-detecting. A hash of the
    /// weights and of `postprocess` (see [`DetectorConfig::versioned`]).
    pub version: String,
    /// How the weights were trained (data, command, seed, validation AP).
    #[serde(default)]
    pub training: serde_json::Value,
}

impl DetectorConfig {
    pub fn num_classes(&self) -> usize {
        self.categories.len()
    }

    /// The config with `version` set from the head's weights and the post-processing, so
    /// that retuning thresholds also re-detects the catalog.
    pub fn versioned(mut self, head: &DetectorHead) -> Result<Self> {
        let mut hasher = blake3::Hasher::new();
        let mut named: Vec<(String, Tensor)> = head.tensors().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in named {
            hasher.update(name.as_bytes());
            for v in t.flatten_all()?.to_vec1::<f32>()? {
                hasher.update(&v.to_le_bytes());
            }
        }
        hasher.update(serde_json::to_string(&self.postprocess).expect("postprocess serialises").as_bytes());
        self.version = format!("detector-{}-fcos-{}", super::backbone_tag(&self.backbone), &hasher.finalize().to_hex()[..12]);
        Ok(self)
    }

    /// Checks what the network's shapes depend on.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidWeights { reason: format!("detector config: {reason}") });
        if self.categories.is_empty() {
            return bad("no categories".into());
        }
        if self.preprocess.size == 0 || !self.preprocess.size.is_multiple_of(32) {
            return bad(format!("input size {} is not a positive multiple of 32", self.preprocess.size));
        }
        if self.channels == 0 || self.groups == 0 || !self.channels.is_multiple_of(self.groups) {
            return bad(format!("{} channels do not split into {} groups", self.channels, self.groups));
        }
        if self.strides.is_empty() {
            return bad("no pyramid levels".into());
        }
        Ok(())
    }
}

/// Score threshold, overlap suppression and the cap on garments per photo.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Postprocess {
    /// Detections scoring below are dropped.
    pub min_score: f32,
    /// Two boxes of one category overlapping more than this: the lower-scoring one goes.
    pub nms_iou: f32,
    /// At most this many garments per photo, best first.
    pub max_detections: usize,
    /// Two boxes of different categories overlapping more than this: one garment seen
    /// twice (a top that might be a dress); the lower-scoring one goes. 1 turns it off.
    #[serde(default = "off")]
    pub cross_class_iou: f32,
    /// A box of one category lying more than this share inside a better box of the same
    /// category: a part of that garment (a dress's bodice, one shoe of the pair), which IoU
    /// misses because the part is small; it goes. 1 turns it off.
    #[serde(default = "off")]
    pub containment: f32,
    /// The same across categories: a box of another category almost wholly inside a better
    /// box (the lower legs of trousers read as a skirt). Street photos have real garments
    /// inside others (a top under an open jacket), so this stays near 1. 1 turns it off.
    #[serde(default = "off")]
    pub cross_class_containment: f32,
}

/// The value that turns an overlap rule off: nothing overlaps more than all of itself.
fn off() -> f32 {
    1.0
}

impl Postprocess {
    /// For measuring AP: everything down to a low score, class by class, as COCO
    /// evaluations do.
    pub const EVALUATION: Postprocess = Postprocess { min_score: 0.05, nms_iou: 0.6, max_detections: 100, cross_class_iou: 1.0, containment: 1.0, cross_class_containment: 1.0 };
    /// For shoppers and indexing: confident garments, each once.
    pub const SERVING: Postprocess = Postprocess { min_score: 0.45, nms_iou: 0.5, max_detections: 8, cross_class_iou: 0.7, containment: 0.8, cross_class_containment: 1.0 };
}

/// The smallest garment side, in photo pixels, a detection may have. The letterbox scales a
/// tiny photo up, so a 1×1 upload would otherwise come back as several "garments" of a
/// fraction of a pixel; no garment is recognisable below this.
pub const MIN_GARMENT_SIDE: f32 = 4.0;

/// One garment found in a photo, in the photo's pixel coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub bbox: BBox,
    /// Index into [`DetectorConfig::categories`].
    pub class: usize,
    pub category: String,
    pub score: f32,
}

/// One convolution's parameters.
#[derive(Debug, Clone)]
pub struct Conv {
    /// `[out, in, k, k]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
}

impl Conv {
    /// Stride 1, "same" zero padding, as matrix products: candle's CPU `conv2d` runs a
    /// direct convolution that was 14 % of a detection's profile; unfolding the k×k
    /// neighbourhoods and multiplying by the weight matrix lands on the gemm kernels.
    /// Built from differentiable ops, so training uses it as well.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
    /// `num_classes + 4 + 1` outputs: class logits, box distances, centre-ness.
    pub output: Conv,
    /// Per-level scale of the box distances, `[levels]`.
    pub scales: Tensor,
    groups: usize,
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
            Ok(Conv { weight: param(&format!("{name}.weight"), &[out, inp, k, k], ParamInit::Normal(std))?, bias: param(&format!("{name}.bias"), &[out], bias)? })
        };
        // He initialisation where ReLU follows; the output starts small (std 0.01, FCOS).
        let he = |inp: usize, k: usize| (2.0 / (inp * k * k) as f64).sqrt();
        let lateral = in_channels
            .iter()
            .enumerate()
            .map(|(i, &ch)| conv(&mut *param, &format!("fpn.lateral.{i}"), c, ch, 1, he(ch, 1), ParamInit::Const(0.0)))
            .collect::<Result<Vec<_>>>()?;
        let mut tower = Vec::new();
        for i in 0..config.tower {
            let t = conv(&mut *param, &format!("tower.{i}"), c, c, 3, he(c, 3), ParamInit::Const(0.0))?;
            let gamma = param(&format!("tower.{i}.gn.weight"), &[c], ParamInit::Const(1.0))?;
            let beta = param(&format!("tower.{i}.gn.bias"), &[c], ParamInit::Const(0.0))?;
            tower.push((t, gamma, beta));
        }
        // Focal-loss prior: every class starts at probability 0.01 (FCOS, RetinaNet), so
        // the thousands of background locations do not swamp the first steps.
        let k = config.num_classes();
        let prior = -((1.0 - 0.01f32) / 0.01).ln();
        let mut bias = vec![prior; k];
        bias.extend([0.0; 5]);
        let output = conv(&mut *param, "output", k + 5, c, 3, 0.01, ParamInit::Values(bias))?;
        let scales = param("scales", &[config.strides.len()], ParamInit::Const(1.0))?;
        Ok(Self { lateral, tower, output, scales, groups: config.groups })
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
            let mut x = p.clone();
            for (conv, gamma, beta) in &self.tower {
                x = group_norm(&conv.forward(&x)?, self.groups, gamma, beta)?.relu()?;
            }
            let y = self.output.forward(&x)?;
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

    /// Named tensors as saved.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, l) in self.lateral.iter().enumerate() {
            out.insert(format!("fpn.lateral.{i}.weight"), l.weight.clone());
            out.insert(format!("fpn.lateral.{i}.bias"), l.bias.clone());
        }
        for (i, (c, g, b)) in self.tower.iter().enumerate() {
            out.insert(format!("tower.{i}.weight"), c.weight.clone());
            out.insert(format!("tower.{i}.bias"), c.bias.clone());
            out.insert(format!("tower.{i}.gn.weight"), g.clone());
            out.insert(format!("tower.{i}.gn.bias"), b.clone());
        }
        out.insert("output.weight".into(), self.output.weight.clone());
        out.insert("output.bias".into(), self.output.bias.clone());
        out.insert("scales".into(), self.scales.clone());
        out
    }

    /// A copy detached from any training graph.
    pub fn detached(&self) -> Result<Self> {
        let c = |x: &Conv| -> Result<Conv> { Ok(Conv { weight: x.weight.detach().copy()?, bias: x.bias.detach().copy()? }) };
        Ok(Self {
            lateral: self.lateral.iter().map(c).collect::<Result<_>>()?,
            tower: self.tower.iter().map(|(x, g, b)| Ok((c(x)?, g.detach().copy()?, b.detach().copy()?))).collect::<Result<_>>()?,
            output: c(&self.output)?,
            scales: self.scales.detach().copy()?,
            groups: self.groups,
        })
    }
}

/// GroupNorm (Wu & He, arXiv 1803.08494) from primitive ops, so that it trains.
fn group_norm(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let g = x.reshape((n, groups, (c / groups) * h * w))?;
    let mean = g.mean_keepdim(D::Minus1)?;
    let centred = g.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + GN_EPS)?.sqrt()?)?.reshape((n, c, h, w))?;
    Ok(normed.broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?.broadcast_add(&beta.reshape((1, c, 1, 1))?)?)
}

/// Centre of every location, in input pixels, levels finest first (the order of
/// [`DetectorHead::forward`]'s locations), with the level's stride.
pub fn location_grid(size: usize, strides: &[usize]) -> Vec<(f32, f32, f32)> {
    let mut out = Vec::new();
    for &s in strides {
        let n = size.div_ceil(s);
        for i in 0..n {
            for j in 0..n {
                out.push(((j as f32 + 0.5) * s as f32, (i as f32 + 0.5) * s as f32, s as f32));
            }
        }
    }
    out
}

/// Decodes one image's head output `[num_classes + 5, locations]` into boxes in input
/// coordinates, then suppresses overlaps class by class.
pub fn decode(output: &[f32], num_classes: usize, grid: &[(f32, f32, f32)], post: &Postprocess) -> Vec<(BBox, usize, f32)> {
    let n = grid.len();
    debug_assert_eq!(output.len(), (num_classes + 5) * n);
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    let mut candidates = Vec::new();
    for (loc, &(cx, cy, s)) in grid.iter().enumerate() {
        let centreness = sigmoid(output[(num_classes + 4) * n + loc]);
        for class in 0..num_classes {
            let score = (sigmoid(output[class * n + loc]) * centreness).sqrt();
            if score >= post.min_score {
                let d = |i: usize| output[(num_classes + i) * n + loc] * s;
                candidates.push((BBox::new(cx - d(0), cy - d(1), cx + d(2), cy + d(3)), class, score));
            }
        }
    }
    // Before suppression keep the 1,000 best, as FCOS does: bounds the quadratic NMS.
    candidates.sort_by(|a, b| b.2.total_cmp(&a.2));
    candidates.truncate(1000);
    let mut kept: Vec<(BBox, usize, f32)> = Vec::new();
    for c in candidates {
        if kept.len() >= post.max_detections {
            break;
        }
        if kept.iter().all(|k| !post.suppresses(k, &c)) {
            kept.push(c);
        }
    }
    kept
}

impl Postprocess {
    /// Whether `kept` (scoring higher) suppresses `candidate`: the same garment seen twice,
    /// or a part of it.
    fn suppresses(&self, kept: &(BBox, usize, f32), candidate: &(BBox, usize, f32)) -> bool {
        let iou = kept.0.iou(&candidate.0);
        if kept.1 != candidate.1 {
            return iou > self.cross_class_iou || kept.0.containment(&candidate.0) > self.cross_class_containment;
        }
        // Either way round: a part scoring above its whole still means one garment, told
        // once, by its best-scoring box.
        iou > self.nms_iou || kept.0.containment(&candidate.0) > self.containment
    }
}

/// Channels of the head's inputs for `config` on `backbone`.
pub fn input_channels(backbone: &EfficientNetLite, config: &DetectorConfig) -> Vec<usize> {
    let mut channels = backbone.pyramid_channels();
    if config.semantic_top
        && let Some(last) = channels.last_mut()
    {
        *last = super::efficientnet_lite::FEATURE_DIM;
    }
    channels
}

/// The head's inputs from the backbone's pyramid (f32): the coarsest level through the
/// backbone's head convolution when the config asks for it. Training applies it to cached
/// pyramids the same way.
pub fn head_inputs(backbone: &EfficientNetLite, config: &DetectorConfig, mut levels: Vec<Tensor>) -> Result<Vec<Tensor>> {
    if config.semantic_top
        && let Some(last) = levels.pop()
    {
        levels.push(backbone.head_features(&last)?);
    }
    Ok(levels)
}

/// Backbone + head, ready to detect.
#[derive(Debug, Clone)]
pub struct GarmentDetector {
    config: DetectorConfig,
    backbone: EfficientNetLite,
    head: DetectorHead,
    grid: Vec<(f32, f32, f32)>,
    device: Device,
}

impl GarmentDetector {
    /// Loads a detector weights file and the backbone it names.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let config: DetectorConfig = weights_file::read_config(path)?;
        let backbone = EfficientNetLite::load(&weights_file::sibling(path, &config.backbone), device)?;
        let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::InvalidWeights { reason: format!("{}: {e}", path.display()) })?;
        let head = DetectorHead::build(&config, &input_channels(&backbone, &config), &mut |name, shape, _| {
            let t = tensors.get(name).ok_or_else(|| Error::InvalidWeights { reason: format!("{}: {name} missing", path.display()) })?;
            if t.dims() != shape {
                return Err(Error::InvalidWeights { reason: format!("{}: {name} has shape {:?}, expected {shape:?}", path.display(), t.dims()) });
            }
            Ok(t.to_dtype(DType::F32)?)
        })?;
        Ok(Self::new(config, backbone, head, device))
    }

    pub fn new(config: DetectorConfig, backbone: EfficientNetLite, head: DetectorHead, device: &Device) -> Self {
        let grid = location_grid(config.preprocess.size as usize, &config.strides);
        Self { config, backbone, head, grid, device: device.clone() }
    }

    /// Writes the head and the configuration (the backbone file is not copied).
    pub fn save_head(path: &Path, config: &DetectorConfig, head: &DetectorHead) -> Result<()> {
        weights_file::save(path, &head.tensors(), config)
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    pub fn head(&self) -> &DetectorHead {
        &self.head
    }

    pub fn version(&self) -> &str {
        &self.config.version
    }

    pub fn backbone(&self) -> &EfficientNetLite {
        &self.backbone
    }

    /// Garments of `image` with the weights' default post-processing.
    pub fn detect(&self, image: &RgbImage) -> Result<Vec<Detection>> {
        self.detect_with(image, &self.config.postprocess)
    }

    /// Garments of `image`, best first, in its pixel coordinates; none narrower or shorter
    /// than [`MIN_GARMENT_SIDE`] photo pixels.
    pub fn detect_with(&self, image: &RgbImage, post: &Postprocess) -> Result<Vec<Detection>> {
        Ok(self.detect_each(image, &[post])?.pop().unwrap_or_default())
    }

    /// The garments of `image` under each post-processing of `posts`, from one forward pass
    /// (an evaluation that measures two operating points runs the network once).
    pub fn detect_each(&self, image: &RgbImage, posts: &[&Postprocess]) -> Result<Vec<Vec<Detection>>> {
        let pre = &self.config.preprocess;
        let input = pre.crop_to_tensor(image, None, &self.device)?.unsqueeze(0)?;
        let raw = self.forward(&input)?;
        let raw = raw.squeeze(0)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let geometry = LetterboxGeometry::new(image.width(), image.height(), pre.size);
        let in_photo = |(b, class, score): (BBox, usize, f32)| {
            let bbox = geometry.to_source(b);
            let big_enough = bbox.x2 - bbox.x1 >= MIN_GARMENT_SIDE && bbox.y2 - bbox.y1 >= MIN_GARMENT_SIDE;
            (bbox.is_valid() && big_enough).then(|| Detection { bbox, class, category: self.config.categories[class].name.clone(), score })
        };
        Ok(posts.iter().map(|post| decode(&raw, self.config.num_classes(), &self.grid, post).into_iter().filter_map(in_photo).collect()).collect())
    }

    /// The network alone: preprocessed inputs `[n, 3, size, size]` → raw outputs
    /// `[n, num_classes + 5, locations]` (see [`DetectorHead::forward`]).
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        super::on_pool(|| self.head.forward(&head_inputs(&self.backbone, &self.config, self.backbone.pyramid(input)?)?))
    }

    /// Head outputs of pre-computed pyramid features (training and evaluation reuse them).
    pub fn head_output(&self, features: &[Tensor]) -> Result<Tensor> {
        self.head.forward(features)
    }

    /// The location grid of the input.
    pub fn grid(&self) -> &[(f32, f32, f32)] {
        &self.grid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_orders_levels_finest_first() {
        let g = location_grid(64, &[8, 16, 32]);
        assert_eq!(g.len(), 64 + 16 + 4);
        assert_eq!(g[0], (4.0, 4.0, 8.0));
        assert_eq!(g[1], (12.0, 4.0, 8.0));
        assert_eq!(g[8], (4.0, 12.0, 8.0));
        assert_eq!(g[64], (8.0, 8.0, 16.0));
        assert_eq!(g[83], (48.0, 48.0, 32.0));
    }

    #[test]
    fn decode_thresholds_and_suppresses_per_class() {
        // Two classes, three locations of stride 8.
        let grid = [(8.0, 8.0, 8.0), (12.0, 8.0, 8.0), (40.0, 40.0, 8.0)];
        let big = 10.0f32;
        // Rows: class 0, class 1, l, t, r, b (in strides), centre-ness.
        let out = [
            [big, big, -big], // class 0: locations 0 and 1
            [-big, big, big], // class 1: locations 1 and 2
            [1.0, 1.5, 1.0],  // l
            [1.0, 1.0, 1.0],  // t
            [1.0, 0.5, 1.0],  // r
            [1.0, 1.0, 1.0],  // b
            [big, big, big],  // centre-ness
        ]
        .concat();
        let post = Postprocess { min_score: 0.5, nms_iou: 0.5, max_detections: 10, cross_class_iou: 1.0, containment: 1.0, cross_class_containment: 1.0 };
        let mut d = decode(&out, 2, &grid, &post);
        d.sort_by_key(|a| (a.1, a.0.x1 as i32));
        // Class 0: locations 0 and 1 decode to the same box [0,0,16,16]: one survives.
        // Class 1: location 1's box and location 2's box [32,32,48,48] do not overlap.
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!((d[0].1, d[0].0), (0, BBox::new(0.0, 0.0, 16.0, 16.0)));
        assert_eq!((d[1].1, d[1].0), (1, BBox::new(0.0, 0.0, 16.0, 16.0)));
        assert_eq!((d[2].1, d[2].0), (1, BBox::new(32.0, 32.0, 48.0, 48.0)));
        let capped = decode(&out, 2, &grid, &Postprocess { max_detections: 1, ..post });
        assert_eq!(capped.len(), 1);
        assert!(decode(&out, 2, &grid, &Postprocess { min_score: 0.9999999, ..post }).is_empty());
        // Across classes: the class-1 box at location 1 is the class-0 box seen again.
        let merged = decode(&out, 2, &grid, &Postprocess { cross_class_iou: 0.8, ..post });
        assert_eq!(merged.len(), 2, "{merged:?}");
    }

    #[test]
    fn parts_inside_a_better_box_of_their_class_go() {
        // One class, three locations of stride 8: a whole dress (score high), its bodice
        // inside it (lower score) and, elsewhere, another garment of the class.
        let grid = [(40.0, 40.0, 8.0), (40.0, 24.0, 8.0), (120.0, 40.0, 8.0)];
        let out = [
            [4.0, 2.0, 3.0], // class 0 logits: whole, part, elsewhere
            [4.0, 1.0, 1.0], // l (strides)
            [4.0, 1.0, 1.0], // t
            [4.0, 1.0, 1.0], // r
            [4.0, 1.0, 1.0], // b
            [9.0, 9.0, 9.0], // centre-ness
        ]
        .concat();
        let post = Postprocess { min_score: 0.5, nms_iou: 0.5, max_detections: 10, cross_class_iou: 1.0, containment: 0.8, cross_class_containment: 1.0 };
        let d = decode(&out, 1, &grid, &post);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![BBox::new(8.0, 8.0, 72.0, 72.0), BBox::new(112.0, 32.0, 128.0, 48.0)], "{d:?}");
        // Off, the part (IoU 1/16 with the whole) stays.
        assert_eq!(decode(&out, 1, &grid, &Postprocess { containment: 1.0, ..post }).len(), 3);
        // A part scoring above its whole: still one garment, by the better box.
        let part_first = [[2.0, 4.0, 3.0], [4.0, 1.0, 1.0], [4.0, 1.0, 1.0], [4.0, 1.0, 1.0], [4.0, 1.0, 1.0], [9.0, 9.0, 9.0]].concat();
        assert_eq!(decode(&part_first, 1, &grid, &post).iter().map(|x| x.0).collect::<Vec<_>>(), vec![BBox::new(32.0, 16.0, 48.0, 32.0), BBox::new(112.0, 32.0, 128.0, 48.0)]);
    }

    #[test]
    fn unfolded_convolution_matches_candles() {
        let dev = Device::Cpu;
        for (k, c, o, h, w) in [(3usize, 5usize, 4usize, 7usize, 6usize), (1, 8, 3, 5, 5), (3, 2, 2, 1, 3)] {
            let conv = Conv { weight: Tensor::randn(0f32, 1., (o, c, k, k), &dev).unwrap(), bias: Tensor::randn(0f32, 1., o, &dev).unwrap() };
            let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let fast = conv.forward(&x).unwrap();
            let slow = x.conv2d(&conv.weight, k / 2, 1, 1, 1).unwrap().broadcast_add(&conv.bias.reshape((1, o, 1, 1)).unwrap()).unwrap();
            let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "k={k}: {diff}");
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
