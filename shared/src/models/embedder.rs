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
use serde::{Deserialize, Serialize};

use super::Backbone;
use super::formats::tensors::NamedTensors;
use super::formats::weights_file;
use crate::vision::Preprocess;
use crate::{Error, Result};

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
    /// Taxonomy names of the category head's outputs, in order; empty when the file has no
    /// category head (older embedders).
    #[serde(default)]
    pub categories: Vec<String>,
    /// The embedding's parts (lengths summing to `dim`), each normalised on its own and
    /// scaled by its weight; empty: one part.
    #[serde(default)]
    pub parts: Vec<EmbeddingPart>,
    /// Cosine above which a shop item is taken for the very item photographed and listed
    /// first whatever its category (calibrated on validation); `None`: never.
    #[serde(default)]
    pub exact_match_similarity: Option<f32>,
}

/// A slice of the projection normalised on its own: cosine similarity of two embeddings is
/// then the weight²-weighted sum of their parts' cosines. An instance part (which item) and
/// a kind part (which sort of garment) keep each other from being traded away in training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingPart {
    pub len: usize,
    /// Scale after normalisation; the squares of all parts' weights sum to 1.
    pub weight: f32,
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
    /// See [`EmbeddingPart`]; empty: the whole projection normalised at once.
    pub parts: Vec<EmbeddingPart>,
}

/// Linear classifier on the unit embedding: the category of a garment nobody labelled (a box
/// the shopper draws, a whole photo). Trained with the embedding, so what it reads is what
/// the index ranks by.
#[derive(Debug, Clone)]
pub struct CategoryHead {
    /// `[categories, dim]`.
    pub weight: Tensor,
    /// `[categories]`.
    pub bias: Tensor,
}

impl CategoryHead {
    /// `[n, dim]` unit embeddings → `[n, categories]` logits.
    pub fn logits(&self, embeddings: &Tensor) -> Result<Tensor> {
        Ok(embeddings.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        HashMap::from([("cls.weight".to_string(), self.weight.clone()), ("cls.bias".to_string(), self.bias.clone())])
    }
}

/// The category head's answer for one garment.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryGuess {
    pub category: String,
    /// Softmax probability of `category`.
    pub probability: f32,
}

/// The category head as plain arrays: one garment's guess costs `categories × dim`
/// multiply-adds, not worth a tensor round trip on the search path.
#[derive(Debug, Clone)]
struct Classifier {
    names: Vec<String>,
    /// Row-major `[categories, dim]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Classifier {
    fn from_head(names: &[String], head: &CategoryHead) -> Result<Self> {
        Ok(Self { names: names.to_vec(), weight: head.weight.flatten_all()?.to_vec1()?, bias: head.bias.to_vec1()? })
    }

    /// Softmax probability of every category, in `names` order; `None` when the embedding
    /// does not fit the head.
    fn probabilities(&self, embedding: &[f32]) -> Option<Vec<f32>> {
        let dim = embedding.len();
        if self.names.is_empty() || self.weight.len() != self.names.len() * dim {
            return None;
        }
        let logits: Vec<f32> = self.weight.chunks_exact(dim).zip(&self.bias).map(|(row, b)| b + row.iter().zip(embedding).map(|(w, x)| w * x).sum::<f32>()).collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f32 = exps.iter().sum();
        Some(exps.into_iter().map(|e| e / total).collect())
    }

    fn guess(&self, embedding: &[f32]) -> Option<CategoryGuess> {
        let probabilities = self.probabilities(embedding)?;
        let (best, p) = probabilities.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))?;
        Some(CategoryGuess { category: self.names[best].clone(), probability: *p })
    }
}

impl EmbeddingHead {
    /// `[n, 1280, h, w]` feature maps → `[n, dim]` unit embeddings.
    pub fn forward(&self, feature_map: &Tensor) -> Result<Tensor> {
        self.project(&gem(feature_map, &self.p)?)
    }

    /// `[n, 1280]` GeM-pooled features → `[n, dim]` unit embeddings.
    pub fn project(&self, pooled: &Tensor) -> Result<Tensor> {
        let projected = pooled.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?;
        if self.parts.is_empty() {
            return l2_normalise(&projected);
        }
        let mut start = 0;
        let mut scaled = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            scaled.push((l2_normalise(&projected.narrow(1, start, part.len)?)? * part.weight as f64)?);
            start += part.len;
        }
        Ok(Tensor::cat(&scaled, 1)?)
    }

    /// Named tensors as saved.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        HashMap::from([("gem.p".to_string(), self.p.clone()), ("proj.weight".to_string(), self.weight.clone()), ("proj.bias".to_string(), self.bias.clone())])
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
    backbone: Backbone,
    head: EmbeddingHead,
    classifier: Option<Classifier>,
    device: Device,
}

impl GarmentEmbedder {
    /// Loads an embedder weights file and the backbone it names.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let config: EmbedderConfig = weights_file::read_config(path)?;
        let backbone = Backbone::load(&Self::backbone_path(path, &config), device)?;
        let tensors = NamedTensors::read(path, device)?;
        let get = |name: &str, shape: &[usize]| tensors.get(name, shape);
        let features = backbone.feature_dim();
        let head =
            EmbeddingHead { p: get("gem.p", &[1])?, weight: get("proj.weight", &[config.dim, features])?, bias: get("proj.bias", &[config.dim])?, parts: config.parts.clone() };
        let lengths: usize = head.parts.iter().map(|p| p.len).sum();
        if !head.parts.is_empty() && lengths != config.dim {
            return Err(Error::InvalidWeights { reason: format!("{}: embedding parts cover {lengths} of {} dimensions", path.display(), config.dim) });
        }
        let categories = match config.categories.len() {
            0 => None,
            n => Some(CategoryHead { weight: get("cls.weight", &[n, config.dim])?, bias: get("cls.bias", &[n])? }),
        };
        Self::new(config, backbone, head, categories.as_ref(), device)
    }

    /// An embedder from its parts; `categories` is the category head, whose outputs
    /// `config.categories` names.
    pub fn new(config: EmbedderConfig, backbone: Backbone, head: EmbeddingHead, categories: Option<&CategoryHead>, device: &Device) -> Result<Self> {
        let classifier = match categories {
            Some(c) if c.weight.dims() == [config.categories.len(), config.dim] => Some(Classifier::from_head(&config.categories, c)?),
            Some(c) => {
                return Err(Error::InvalidWeights {
                    reason: format!("category head has shape {:?} for {} categories of a {}-d embedding", c.weight.dims(), config.categories.len(), config.dim),
                });
            }
            None => None,
        };
        Ok(Self { config, backbone, head, classifier, device: device.clone() })
    }

    /// The category head's guess for a unit embedding of this embedder; `None` when its
    /// weights file has no category head.
    pub fn guess_category(&self, embedding: &[f32]) -> Option<CategoryGuess> {
        self.classifier.as_ref()?.guess(embedding)
    }

    /// The category head's probability of each of `config().categories` for a unit
    /// embedding of this embedder; `None` without a category head.
    pub fn category_probabilities(&self, embedding: &[f32]) -> Option<Vec<f32>> {
        self.classifier.as_ref()?.probabilities(embedding)
    }

    /// Where the backbone named by `config` lives for the weights file `path`.
    pub fn backbone_path(path: &Path, config: &EmbedderConfig) -> PathBuf {
        weights_file::sibling(path, &config.backbone)
    }

    /// Writes the head (and the category head, whose outputs `config.categories` names) and
    /// the configuration (the backbone file is not copied).
    pub fn save_head(path: &Path, config: &EmbedderConfig, head: &EmbeddingHead, categories: Option<&CategoryHead>) -> Result<()> {
        let mut tensors = head.tensors();
        if let Some(c) = categories {
            tensors.extend(c.tensors());
        }
        weights_file::save(path, &tensors, config)
    }

    /// Writes the floor every trained embedder is measured against: the untrained ImageNet
    /// backbone, average-pooled (GeM with p = 1), its features as the embedding (identity
    /// projection), no category head. `backbone` is the backbone's file name, beside `path`.
    pub fn save_imagenet_baseline(path: &Path, backbone: &str) -> Result<EmbedderConfig> {
        let device = Device::Cpu;
        let net = Backbone::load(&weights_file::sibling(path, backbone), &device)?;
        let features = net.feature_dim();
        let head = EmbeddingHead {
            p: Tensor::new(&[1f32], &device)?,
            weight: Tensor::eye(features, DType::F32, &device)?,
            bias: Tensor::zeros(features, DType::F32, &device)?,
            parts: Vec::new(),
        };
        let config = EmbedderConfig {
            backbone: backbone.to_string(),
            dim: features,
            preprocess: net.embedding_preprocess(),
            version: format!("{}-imagenet-average", backbone.trim_end_matches(".safetensors")),
            training: serde_json::json!({"note": "untrained ImageNet backbone, average-pooled: the baseline, not a trained model"}),
            categories: Vec::new(),
            parts: Vec::new(),
            exact_match_similarity: None,
        };
        Self::save_head(path, &config, &head, None)?;
        Ok(config)
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

    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// Embeds `[n, 3, s, s]` preprocessed inputs into `n` unit vectors.
    pub fn embed_batch(&self, inputs: &Tensor) -> Result<Vec<Vec<f32>>> {
        super::on_pool(|| {
            let fmap = self.backbone.feature_map(&inputs.to_device(&self.device)?)?;
            Ok(self.head.forward(&fmap)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classifier_guesses_the_highest_logit_with_its_softmax_probability() {
        let dev = Device::Cpu;
        let names = vec!["dress".to_string(), "top".to_string(), "pants".to_string()];
        let head = CategoryHead { weight: Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [-1.0, -1.0]], &dev).unwrap(), bias: Tensor::new(&[0f32, 0.5, 0.0], &dev).unwrap() };
        let classifier = Classifier::from_head(&names, &head).unwrap();
        let guess = classifier.guess(&[0.8, 0.6]).unwrap();
        assert_eq!(guess.category, "top");
        let logits = [0.8f32, 1.1, -1.4];
        let expected = logits[1].exp() / logits.iter().map(|l| l.exp()).sum::<f32>();
        assert!((guess.probability - expected).abs() < 1e-6, "{} vs {expected}", guess.probability);
        assert_eq!(classifier.guess(&[1.0, 0.0]).unwrap().category, "dress");
        // An embedding of another length has no guess rather than a wrong one.
        assert_eq!(classifier.guess(&[1.0, 0.0, 0.0]), None);
    }

    #[test]
    fn parts_are_normalised_each_and_weighted() {
        let dev = Device::Cpu;
        let head = EmbeddingHead {
            p: Tensor::new(&[3f32], &dev).unwrap(),
            weight: Tensor::eye(3, DType::F32, &dev).unwrap(),
            bias: Tensor::zeros(3, DType::F32, &dev).unwrap(),
            parts: vec![EmbeddingPart { len: 2, weight: 0.8 }, EmbeddingPart { len: 1, weight: 0.6 }],
        };
        let e = head.project(&Tensor::new(&[[3f32, 4.0, -2.0]], &dev).unwrap()).unwrap().to_vec2::<f32>().unwrap().remove(0);
        let expected = [0.8 * 0.6, 0.8 * 0.8, -0.6];
        assert!(e.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{e:?}");
        assert!((e.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
