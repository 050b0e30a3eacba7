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
use super::backbone::FoldedBlock;
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
    /// The backbone blocks (the coarsest stage) the category head reads through its own,
    /// tuned copy of them, from the crop's features where the embedding's frozen blocks
    /// begin: the head then names garments from features trained for naming, and the
    /// embedding is what it was. Empty: the head reads the embedding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category_stage: Vec<usize>,
}

/// Tensor names of the category head's tuned copy of backbone block `i`.
pub fn category_stage_prefix(i: usize) -> String {
    format!("category_stage.{i}.")
}

/// Tensor names of the linear layer on the tuned stage's average-pooled output.
pub const CATEGORY_STAGE_WEIGHT: &str = "category_stage.cls.weight";
pub const CATEGORY_STAGE_BIAS: &str = "category_stage.cls.bias";

/// What the embedder reads from one garment crop: its embedding and, with a category
/// head, the probability of each of `EmbedderConfig::categories`.
#[derive(Debug, Clone, PartialEq)]
pub struct GarmentReading {
    pub embedding: Vec<f32>,
    pub categories: Option<Vec<f32>>,
}

/// The category head over its own tuned copy of the backbone's coarsest stage.
#[derive(Debug, Clone)]
struct StagedClassifier {
    /// The first tuned block: the crop's features before it are the embedding's.
    start: usize,
    /// The backbone with the tuned blocks in place of the ImageNet ones.
    tuned: Backbone,
    /// `[categories, channels]`.
    weight: Tensor,
    /// `[categories]`.
    bias: Tensor,
}

impl StagedClassifier {
    fn load(config: &EmbedderConfig, backbone: &Backbone, tensors: &NamedTensors) -> Result<Option<Self>> {
        let Some(&start) = config.category_stage.first() else { return Ok(None) };
        let contiguous = config.category_stage.windows(2).all(|w| w[1] == w[0] + 1);
        let last = *config.category_stage.last().expect("not empty");
        let ends_the_network = backbone.folded_block(last + 1).is_err() && backbone.folded_block(last).is_ok();
        if !contiguous || !ends_the_network || config.categories.is_empty() {
            return Err(Error::InvalidWeights {
                reason: format!("the category stage must be the backbone's last blocks in order, with categories; got blocks {:?}", config.category_stage),
            });
        }
        let mut blocks = Vec::with_capacity(config.category_stage.len());
        for &i in &config.category_stage {
            let layout = backbone.block_config(i)?;
            blocks.push((i, FoldedBlock::read(&layout, &category_stage_prefix(i), &mut |name, shape| tensors.get(name, shape))?));
        }
        let channels = backbone.block_config(last)?.out_channels;
        let n = config.categories.len();
        Ok(Some(Self { start, tuned: backbone.with_blocks(&blocks)?, weight: tensors.get(CATEGORY_STAGE_WEIGHT, &[n, channels])?, bias: tensors.get(CATEGORY_STAGE_BIAS, &[n])? }))
    }

    /// `[n, c, h, w]` features before block `start` → `[n, categories]` probabilities.
    fn probabilities(&self, before: &Tensor) -> Result<Vec<Vec<f32>>> {
        let last = self.tuned.blocks_from(before, self.start)?;
        let pooled = last.mean(D::Minus1)?.mean(D::Minus1)?;
        let logits = pooled.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?;
        Ok(candle_nn::ops::softmax_last_dim(&logits)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
    }
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
}

/// The most probable of `names` (the first on ties); `None` when the lengths differ.
fn best_guess(names: &[String], probabilities: &[f32]) -> Option<CategoryGuess> {
    if probabilities.len() != names.len() {
        return None;
    }
    let (best, p) = probabilities.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))?;
    Some(CategoryGuess { category: names[best].clone(), probability: *p })
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
    staged: Option<StagedClassifier>,
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
        let staged = StagedClassifier::load(&config, &backbone, &tensors)?;
        let mut embedder = Self::new(config, backbone, head, categories.as_ref(), device)?;
        embedder.staged = staged;
        Ok(embedder)
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
        Ok(Self { config, backbone, head, classifier, staged: None, device: device.clone() })
    }

    /// The category head's best guess among the probabilities a reading gives (in
    /// `config().categories` order); `None` when they do not fit the head.
    pub fn guess_category(&self, probabilities: &[f32]) -> Option<CategoryGuess> {
        best_guess(&self.config.categories, probabilities)
    }

    /// Whether the category head reads the crop through its own tuned stage (else the
    /// embedding).
    pub fn has_category_stage(&self) -> bool {
        self.staged.is_some()
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
            category_stage: Vec::new(),
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

    /// Embeds `[n, 3, s, s]` preprocessed inputs into `n` unit vectors (the embedding alone:
    /// no category stage runs).
    pub fn embed_batch(&self, inputs: &Tensor) -> Result<Vec<Vec<f32>>> {
        super::on_pool(|| self.embeddings(&self.backbone.feature_map(&inputs.to_device(&self.device)?)?))
    }

    /// Feature maps `[n, 1280, h, w]` → `n` unit embeddings on the CPU.
    fn embeddings(&self, fmap: &Tensor) -> Result<Vec<Vec<f32>>> {
        Ok(self.head.forward(fmap)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
    }

    /// Reads `[n, 3, s, s]` preprocessed inputs: the embedding of each and, with a category
    /// head, its category probabilities. With a tuned category stage the crop's features
    /// are computed once up to that stage and read by both branches; the embedding is the
    /// same either way.
    pub fn read_batch(&self, inputs: &Tensor) -> Result<Vec<GarmentReading>> {
        super::on_pool(|| {
            let x = inputs.to_device(&self.device)?;
            let Some(s) = &self.staged else { return self.read_feature_map(&self.backbone.feature_map(&x)?) };
            let before = self.backbone.features_before(&x, s.start)?;
            let embeddings = self.embeddings(&self.backbone.head_features(&self.backbone.blocks_from(&before, s.start)?)?)?;
            let probabilities = s.probabilities(&before)?;
            Ok(embeddings.into_iter().zip(probabilities).map(|(embedding, p)| GarmentReading { embedding, categories: Some(p) }).collect())
        })
    }

    /// The embedding of backbone feature maps `[n, 1280, h, w]`, each with the category
    /// head *on the embedding* (a tuned category stage is not read here: training compares
    /// itself against this head).
    pub fn read_feature_map(&self, fmap: &Tensor) -> Result<Vec<GarmentReading>> {
        Ok(self
            .embeddings(fmap)?
            .into_iter()
            .map(|embedding| {
                let categories = self.classifier.as_ref().and_then(|c| c.probabilities(&embedding));
                GarmentReading { embedding, categories }
            })
            .collect())
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
        let guess_of = |e: &[f32]| classifier.probabilities(e).and_then(|p| best_guess(&names, &p));
        let guess = guess_of(&[0.8, 0.6]).unwrap();
        assert_eq!(guess.category, "top");
        let logits = [0.8f32, 1.1, -1.4];
        let expected = logits[1].exp() / logits.iter().map(|l| l.exp()).sum::<f32>();
        assert!((guess.probability - expected).abs() < 1e-6, "{} vs {expected}", guess.probability);
        assert_eq!(guess_of(&[1.0, 0.0]).unwrap().category, "dress");
        // An embedding of another length has no guess rather than a wrong one.
        assert_eq!(guess_of(&[1.0, 0.0, 0.0]), None);
        assert_eq!(best_guess(&names, &[0.5, 0.5]), None);
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
