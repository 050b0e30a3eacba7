//! The backbone seam. Detection, embedding and training see a [`Backbone`], never a family:
//! a second family is its own file here and one variant (with its arms) in this one.

pub mod efficientnet_lite;

use std::path::Path;

use candle_core::{D, Device, Tensor};

use self::efficientnet_lite::EfficientNetLite;
pub use self::efficientnet_lite::{BlockConfig, FoldedBlock};
use crate::models::formats::tensors::NamedTensors;
use crate::vision::{Normalisation, Preprocess};
use crate::{Error, Result};

/// An ImageNet-trained feature extractor, of whichever family its weights file holds.
#[derive(Debug, Clone)]
pub enum Backbone {
    EfficientNetLite(EfficientNetLite),
}

impl Backbone {
    /// Loads a backbone weights file; the family is recognised from the tensors it holds.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        // Read on the CPU: BatchNorm is folded there, then the network moves to `device`.
        let weights = NamedTensors::read(path, &Device::Cpu)?;
        if EfficientNetLite::recognises(&weights) {
            return Ok(Self::EfficientNetLite(EfficientNetLite::from_weights(&weights, device)?));
        }
        Err(Error::InvalidWeights { reason: format!("{}: not a backbone we know (EfficientNet-Lite)", path.display()) })
    }

    pub fn device(&self) -> &Device {
        match self {
            Self::EfficientNetLite(net) => net.device(),
        }
    }

    /// How the family's ImageNet training normalised pixels: every input of this backbone,
    /// detection's included, is normalised so.
    pub fn normalisation(&self) -> Normalisation {
        match self {
            Self::EfficientNetLite(_) => Normalisation::TfLite,
        }
    }

    /// How a garment crop is prepared for embedding: the family's native input.
    pub fn embedding_preprocess(&self) -> Preprocess {
        match self {
            Self::EfficientNetLite(_) => Preprocess::LITE0,
        }
    }

    /// Channels of [`Self::feature_map`], the length of a pooled feature.
    pub fn feature_dim(&self) -> usize {
        match self {
            Self::EfficientNetLite(_) => efficientnet_lite::FEATURE_DIM,
        }
    }

    /// The last, semantic feature map: `[n, 3, h, w]` normalised input →
    /// `[n, feature_dim, h/32, w/32]`. Embedding pools it.
    pub fn feature_map(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::EfficientNetLite(net) => net.feature_map(x),
        }
    }

    /// The stem and blocks `..end` on a normalised input: the input of block `end`.
    pub fn features_before(&self, x: &Tensor, end: usize) -> Result<Tensor> {
        match self {
            Self::EfficientNetLite(net) => net.features_before(x, end),
        }
    }

    /// Blocks `start..` on `x` (the input of block `start`), without the head convolution.
    pub fn blocks_from(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        match self {
            Self::EfficientNetLite(net) => net.blocks_from(x, start),
        }
    }

    /// The global-average-pooled feature, `[n, feature_dim]`.
    pub fn pooled(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.feature_map(x)?.mean(D::Minus1)?.mean(D::Minus1)?)
    }

    /// Multi-scale features for detection, finest first, from stride 8 down.
    pub fn pyramid(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::EfficientNetLite(net) => net.pyramid(x),
        }
    }

    /// Channels of each [`Self::pyramid`] level, finest first.
    pub fn pyramid_channels(&self) -> Vec<usize> {
        match self {
            Self::EfficientNetLite(net) => net.pyramid_channels(),
        }
    }

    /// The semantic features ([`Self::feature_map`]'s channels) computed from the last
    /// pyramid level, at its resolution: what a detector adds to its coarsest level.
    pub fn head_features(&self, last_level: &Tensor) -> Result<Tensor> {
        match self {
            Self::EfficientNetLite(net) => net.head_features(last_level),
        }
    }
}

impl Backbone {
    /// The blocks that turn the stride-16 pyramid level into the stride-32 one: the stage a
    /// detector may fine-tune (see `DetectorConfig::tuned_blocks`).
    pub fn coarsest_stage(&self) -> std::ops::Range<usize> {
        match self {
            Self::EfficientNetLite(net) => net.coarsest_stage(),
        }
    }

    /// Block `i`'s parameters, BatchNorm folded.
    pub fn folded_block(&self, i: usize) -> Result<FoldedBlock> {
        match self {
            Self::EfficientNetLite(net) => net.folded_block(i),
        }
    }

    /// Block `i`'s layout.
    pub fn block_config(&self, i: usize) -> Result<BlockConfig> {
        Ok(self.folded_block(i)?.config)
    }

    /// The backbone with some blocks' parameters replaced (a detector's fine-tuned ones).
    pub fn with_blocks(&self, replaced: &[(usize, FoldedBlock)]) -> Result<Self> {
        match self {
            Self::EfficientNetLite(net) => Ok(Self::EfficientNetLite(net.with_blocks(replaced)?)),
        }
    }
}

/// The backbone's short name in model versions, from the backbone file a config names:
/// `efficientnet-lite2.safetensors` → `lite2`; another file gives its stem.
pub fn backbone_tag(backbone_file: &str) -> &str {
    let stem = backbone_file.strip_suffix(".safetensors").unwrap_or(backbone_file);
    stem.strip_prefix("efficientnet-").unwrap_or(stem)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn a_backbone_file_gives_its_short_name() {
        assert_eq!(backbone_tag("efficientnet-lite0.safetensors"), "lite0");
        assert_eq!(backbone_tag("efficientnet-lite2.safetensors"), "lite2");
        assert_eq!(backbone_tag("resnet50.safetensors"), "resnet50");
    }

    #[test]
    fn a_file_of_no_known_family_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.safetensors");
        let map = HashMap::from([("conv1.weight".to_string(), Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap())]);
        candle_core::safetensors::save(&map, &path).unwrap();
        match Backbone::load(&path, &Device::Cpu).unwrap_err() {
            Error::InvalidWeights { reason } => assert!(reason.contains("not a backbone we know"), "{reason}"),
            other => panic!("expected invalid weights, got {other:?}"),
        }
    }
}
