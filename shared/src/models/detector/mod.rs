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

mod decode;
mod head;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use self::decode::{Located, Postprocess, decode, decode_located, location_grid, location_probabilities};
/// The training form of the head's GroupNorm, which the inference kernel is tested against.
#[cfg(test)]
pub(crate) use self::head::group_norm;
pub use self::head::{Conv, DetectorHead, ParamInit, ParamSource, head_inputs, input_channels};
use super::Backbone;
use super::backbone::FoldedBlock;
use super::formats::tensors::NamedTensors;
use super::formats::weights_file;
use crate::geometry::BBox;
use crate::vision::{LetterboxGeometry, Preprocess};
use crate::{Error, Result};

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
    /// The class logits get a tower of their own (`class_tower.*`, as deep as `tower`),
    /// the shared one keeping boxes and centre-ness: naming a garment and framing it stop
    /// competing for the same 64 channels. Files from before the field share one tower.
    #[serde(default)]
    pub class_tower: bool,
    /// Backbone blocks the detector fine-tuned (the stage before the stride-32 level, see
    /// `Backbone::coarsest_stage`): the file holds their folded parameters as
    /// `backbone.{block}.*`, and the detector runs its own copy of the backbone with them.
    /// Empty: the ImageNet backbone as it is (files from before the field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tuned_blocks: Vec<usize>,
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

    /// The config with `version` set from the detector's weights (head and tuned blocks,
    /// see [`GarmentDetector::tensors`]) and the post-processing, so that retuning
    /// thresholds also re-detects the catalog.
    pub fn versioned(mut self, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let mut hasher = blake3::Hasher::new();
        let mut named: Vec<(&String, &Tensor)> = tensors.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        for (name, t) in named {
            hasher.update(name.as_bytes());
            for v in t.flatten_all()?.to_vec1::<f32>()? {
                hasher.update(&v.to_le_bytes());
            }
        }
        hasher.update(serde_json::to_string(&self.postprocess).expect("postprocess serialises").as_bytes());
        // The input side changes every box, so it changes the version (`weights
        // retune-detector --input-size`): a catalog indexed at another side is re-detected.
        hasher.update(&self.preprocess.size.to_le_bytes());
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

/// The smallest garment side, in photo pixels, a detection may have. The letterbox scales a
/// tiny photo up, so a 1×1 upload would otherwise come back as several "garments" of a
/// fraction of a pixel; no garment is recognisable below this.
pub const MIN_GARMENT_SIDE: f32 = 4.0;

/// A detector file's parameters: the head's and each tuned block's (see
/// [`DetectorConfig::tuned_blocks`]).
pub fn detector_tensors(head: &DetectorHead, tuned: &[(usize, FoldedBlock)]) -> HashMap<String, Tensor> {
    let mut tensors = head.tensors();
    tensors.extend(tuned.iter().flat_map(|(i, block)| block.tensors(&tuned_block_prefix(*i))));
    tensors
}

/// One garment found in a photo, in the photo's pixel coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub bbox: BBox,
    /// Index into [`DetectorConfig::categories`].
    pub class: usize,
    pub category: String,
    pub score: f32,
    /// The detector's probability of every category at the location that found the box
    /// (sigmoid of each class logit): what the second look weighs against the category
    /// head's reading (see [`crate::models::fusion`]).
    #[serde(default, skip_serializing)]
    pub class_probs: Vec<f32>,
    /// The location's centre-ness (the score is `sqrt(probability × centre-ness)`).
    #[serde(default, skip_serializing)]
    pub centreness: f32,
}

/// Where the tuned backbone blocks' parameters live in a detector file's names.
pub const TUNED_BLOCKS: &str = "backbone.";

/// The name prefix of a tuned backbone block's parameters in a detector file.
pub fn tuned_block_prefix(block: usize) -> String {
    format!("{TUNED_BLOCKS}{block}.")
}

/// Backbone + head, ready to detect.
#[derive(Debug, Clone)]
pub struct GarmentDetector {
    config: DetectorConfig,
    /// The ImageNet backbone with the detector's tuned blocks, if any.
    backbone: Backbone,
    head: DetectorHead,
    tuned: Vec<(usize, FoldedBlock)>,
    grid: Vec<(f32, f32, f32)>,
    device: Device,
}

impl GarmentDetector {
    /// Loads a detector weights file and the backbone it names.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let config: DetectorConfig = weights_file::read_config(path)?;
        let backbone = Backbone::load(&weights_file::sibling(path, &config.backbone), device)?;
        let tensors = NamedTensors::read(path, device)?;
        let head = DetectorHead::build(&config, &input_channels(&backbone, &config), &mut |name, shape, _| tensors.get(name, shape))?;
        let tuned = config
            .tuned_blocks
            .iter()
            .map(|&i| Ok((i, FoldedBlock::read(&backbone.block_config(i)?, &tuned_block_prefix(i), &mut |name, shape| tensors.get(name, shape))?)))
            .collect::<Result<Vec<_>>>()?;
        let backbone = backbone.with_blocks(&tuned)?;
        let grid = location_grid(config.preprocess.size as usize, &config.strides);
        Ok(Self { config, backbone, head: head.for_inference()?, tuned, grid, device: device.clone() })
    }

    /// Every parameter the detector's file holds: the head's and the tuned blocks'.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        detector_tensors(&self.head, &self.tuned)
    }

    /// Writes the parameters and the configuration (the backbone file is not copied).
    pub fn save(path: &Path, config: &DetectorConfig, tensors: &HashMap<String, Tensor>) -> Result<()> {
        weights_file::save(path, tensors, config)
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

    pub fn backbone(&self) -> &Backbone {
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
        Ok(self.decode_output(&raw, image, posts))
    }

    /// The garments of each of `images` with the default post-processing, from one forward
    /// pass of them all: the GPU's way (see `indexing`). Kernels block by batch size, so a
    /// photo's detections may differ in the last bits from [`Self::detect`]'s; the same
    /// batch gives the same bits.
    pub fn detect_batch(&self, images: &[&RgbImage]) -> Result<Vec<Vec<Detection>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pre = &self.config.preprocess;
        let inputs = images.par_iter().map(|image| pre.crop_to_tensor(image, None, &Device::Cpu)).collect::<Result<Vec<_>>>()?;
        let raw = self.forward(&Tensor::stack(&inputs, 0)?.to_device(&self.device)?)?.to_device(&Device::Cpu)?;
        let post = &self.config.postprocess;
        images
            .iter()
            .enumerate()
            .map(|(i, image)| {
                let raw = raw.get(i)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(self.decode_output(&raw, image, &[post]).pop().unwrap_or_default())
            })
            .collect()
    }

    /// One photo's raw network output `[num_classes + 5, locations]`, flattened, as
    /// detections in its pixel coordinates under each of `posts`.
    fn decode_output(&self, raw: &[f32], image: &RgbImage, posts: &[&Postprocess]) -> Vec<Vec<Detection>> {
        let pre = &self.config.preprocess;
        let geometry = LetterboxGeometry::new(image.width(), image.height(), pre.size);
        let (classes, locations) = (self.config.num_classes(), self.grid.len());
        let in_photo = |d: Located| {
            let bbox = geometry.to_source(d.bbox);
            let big_enough = bbox.x2 - bbox.x1 >= MIN_GARMENT_SIDE && bbox.y2 - bbox.y1 >= MIN_GARMENT_SIDE;
            (bbox.is_valid() && big_enough).then(|| {
                let (class_probs, centreness) = location_probabilities(raw, classes, locations, d.location);
                Detection { bbox, class: d.class, category: self.config.categories[d.class].name.clone(), score: d.score, class_probs, centreness }
            })
        };
        posts.iter().map(|post| decode_located(raw, classes, &self.grid, post).into_iter().filter_map(in_photo).collect()).collect()
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
