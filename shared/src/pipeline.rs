//! The one path from pixels to garment embeddings: decode with limits → garments (the
//! detector's, or boxes the caller knows) → crop/letterbox/normalise → embed. Indexing,
//! serving and evaluation all go through [`GarmentPipeline`], so a shop photo indexed and
//! the same photo searched for produce the same vectors, and the evaluator measures what a
//! shopper gets.
//!
//! The batching rule: all garments of one photo go through the embedder in one forward
//! pass, and photos never share one. Matrix kernels block differently by batch size, which
//! moves the last bits of a result; with one batch per photo a garment's embedding depends
//! only on its photo, so a build resumed after a crash equals an uninterrupted one and an
//! evaluation equals the served search.

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::Result;
use crate::geometry::BBox;
use crate::models::detector::{Detection, GarmentDetector, Postprocess};
use crate::models::embedder::GarmentEmbedder;
use crate::vision::{DecodeLimits, decode_image};

/// The networks and decode limits of one deployment (an indexer run, a searcher).
#[derive(Clone, Copy)]
pub struct GarmentPipeline<'a> {
    /// `None`: no garment is found, callers fall back to the whole photo.
    pub detector: Option<&'a GarmentDetector>,
    pub embedder: &'a GarmentEmbedder,
    pub limits: DecodeLimits,
}

impl<'a> GarmentPipeline<'a> {
    /// Decodes image file bytes within the pipeline's limits.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage> {
        decode_image(bytes, self.limits)
    }

    /// The detector's garments with its shipped post-processing; empty without a detector.
    pub fn detect(&self, image: &RgbImage) -> Result<Vec<Detection>> {
        match self.detector {
            Some(d) => d.detect(image),
            None => Ok(Vec::new()),
        }
    }

    /// The detector's garments under another post-processing (an evaluation protocol's
    /// low score floor); empty without a detector.
    pub fn detect_with(&self, image: &RgbImage, post: &Postprocess) -> Result<Vec<Detection>> {
        match self.detector {
            Some(d) => d.detect_with(image, post),
            None => Ok(Vec::new()),
        }
    }

    /// Embeds garments of one photo, each box (the whole photo for `None`) by the one
    /// preprocessing path, all in one forward pass (see the module notes).
    pub fn embed(&self, image: &RgbImage, crops: &[Option<BBox>]) -> Result<Vec<Vec<f32>>> {
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        let pre = &self.embedder.config().preprocess;
        let inputs = crops.iter().map(|b| pre.crop_to_tensor(image, *b, &Device::Cpu)).collect::<Result<Vec<_>>>()?;
        self.embedder.embed_batch(&Tensor::stack(&inputs, 0)?)
    }
}
