//! The match network's embedding (after Match R-CNN, DeepFashion2 arXiv 1901.07973, made
//! indexable): a garment crop → backbone feature map → generalised-mean pooling (GeM,
//! Radenović et al., arXiv 1711.02512, learned exponent) → linear projection → L2
//! normalisation. Consumer and shop photos of one item land close; cosine similarity is
//! the score.
//!
//! Weights: `models/embedder-*.safetensors` holds the trained head (`gem.p`,
//! `proj.weight`, `proj.bias`) and its [`EmbedderConfig`] as metadata; the backbone file it
//! names sits beside it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::efficientnet_lite::{EfficientNetLite, FEATURE_DIM};
use super::weights_file;
use crate::geometry::BBox;
use crate::vision::Preprocess;
use crate::{Error, Result};

/// Crops embedded per forward pass.
pub const EMBED_BATCH: usize = 8;
const GEM_EPS: f64 = 1e-6;

/// What the embedder's weights file says about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedderConfig {
    /// The backbone weights file, relative to this file's directory.
    pub backbone: String,
    /// Embedding length.
    pub dim: usize,
    pub preprocess: Preprocess,
    /// Recorded in every garment the embedder produces; a change means re-embedding.
    pub version: String,
    /// How the weights were trained (data, command, seed), for the model card.
    #[serde(default)]
    pub training: serde_json::Value,
}

/// The trainable part: GeM exponent and projection.
#[derive(Debug, Clone)]
pub struct EmbeddingHead {
    /// Scalar GeM exponent, shape `[1]`.
    pub p: Tensor,
    /// `[dim, 1280]`.
    pub weight: Tensor,
    /// `[dim]`.
    pub bias: Tensor,
}

impl EmbeddingHead {
    /// `[n, 1280, h, w]` feature maps → `[n, dim]` unit embeddings.
    pub fn forward(&self, feature_map: &Tensor) -> Result<Tensor> {
        let pooled = gem(feature_map, &self.p)?;
        let projected = pooled.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?;
        l2_normalise(&projected)
    }

    /// Named tensors as saved.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        HashMap::from([
            ("gem.p".to_string(), self.p.clone()),
            ("proj.weight".to_string(), self.weight.clone()),
            ("proj.bias".to_string(), self.bias.clone()),
        ])
    }
}

/// Generalised mean over the spatial positions: `(mean(x^p))^(1/p)`, `x` clamped above 0.
pub fn gem(feature_map: &Tensor, p: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = feature_map.dims4()?;
    let logs = feature_map.reshape((n, c, h * w))?.clamp(GEM_EPS, f64::MAX)?.log()?;
    let powered = logs.broadcast_mul(p)?.exp()?;
    Ok(powered.mean(D::Minus1)?.log()?.broadcast_div(p)?.exp()?)
}

/// Rows scaled to unit length.
pub fn l2_normalise(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Backbone + head, ready to embed crops.
#[derive(Debug, Clone)]
pub struct GarmentEmbedder {
    config: EmbedderConfig,
    backbone: EfficientNetLite,
    head: EmbeddingHead,
    device: Device,
}

impl GarmentEmbedder {
    /// Loads an embedder weights file and the backbone it names.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let config: EmbedderConfig = weights_file::read_config(path)?;
        let backbone = EfficientNetLite::load(&Self::backbone_path(path, &config), device)?;
        let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::InvalidWeights {
            reason: format!("{}: {e}", path.display()),
        })?;
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.get(name).ok_or_else(|| Error::InvalidWeights { reason: format!("{}: {name} missing", path.display()) })?;
            if t.dims() != shape {
                return Err(Error::InvalidWeights { reason: format!("{}: {name} has shape {:?}, expected {shape:?}", path.display(), t.dims()) });
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let head = EmbeddingHead {
            p: get("gem.p", &[1])?,
            weight: get("proj.weight", &[config.dim, FEATURE_DIM])?,
            bias: get("proj.bias", &[config.dim])?,
        };
        Ok(Self::new(config, backbone, head, device))
    }

    pub fn new(config: EmbedderConfig, backbone: EfficientNetLite, head: EmbeddingHead, device: &Device) -> Self {
        Self { config, backbone, head, device: device.clone() }
    }

    /// Where the backbone named by `config` lives for the weights file `path`.
    pub fn backbone_path(path: &Path, config: &EmbedderConfig) -> PathBuf {
        weights_file::sibling(path, &config.backbone)
    }

    /// Writes the head and the configuration (the backbone file is not copied).
    pub fn save_head(path: &Path, config: &EmbedderConfig, head: &EmbeddingHead) -> Result<()> {
        weights_file::save(path, &head.tensors(), config)
    }

    pub fn config(&self) -> &EmbedderConfig {
        &self.config
    }

    pub fn dim(&self) -> usize {
        self.config.dim
    }

    pub fn version(&self) -> &str {
        &self.config.version
    }

    pub fn backbone(&self) -> &EfficientNetLite {
        &self.backbone
    }

    /// Embeds `[n, 3, s, s]` preprocessed inputs into `n` unit vectors.
    pub fn embed_batch(&self, inputs: &Tensor) -> Result<Vec<Vec<f32>>> {
        super::on_pool(|| {
            let fmap = self.backbone.feature_map(&inputs.to_device(&self.device)?)?;
            Ok(self.head.forward(&fmap)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
        })
    }

    /// Embeds garments of one image: each box (or the whole image for `None`) goes through
    /// the same crop/letterbox/normalise path as every other input, in batches.
    pub fn embed_crops(&self, image: &RgbImage, boxes: &[Option<BBox>]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(boxes.len());
        for chunk in boxes.chunks(EMBED_BATCH) {
            let inputs = chunk
                .iter()
                .map(|b| self.config.preprocess.crop_to_tensor(image, *b, &Device::Cpu))
                .collect::<Result<Vec<_>>>()?;
            out.extend(self.embed_batch(&Tensor::stack(&inputs, 0)?)?);
        }
        Ok(out)
    }
}
