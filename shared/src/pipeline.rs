//! The one path from pixels to garment embeddings: decode with limits → garments (the
//! detector's, or boxes the caller knows) → crop/letterbox/normalise → embed. Indexing,
//! serving and evaluation all go through [`GarmentPipeline`], so a shop photo indexed and
//! the same photo searched for produce the same vectors, and the evaluator measures what a
//! shopper gets.
//!
//! The batching rule: every garment goes through the embedder alone (batch 1), a photo's
//! garments side by side on the cores. Matrix kernels block differently by batch size,
//! which moves the last bits of a result; at batch 1 a garment's embedding depends only on
//! its crop (never on the photo's other garments or the thread count), so a build resumed
//! after a crash equals an uninterrupted one and an evaluation equals the served search.
//! Side by side rather than in one batch because a batch of a photo's few crops, split
//! over two cores operation by operation, spends its time waiting: served photos with 4.1
//! garments embed in 52 ms against 62 (`benches/NOTES.md`, 2026-12-05).

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use crate::Result;
use crate::geometry::BBox;
use crate::models::detector::{Detection, GarmentDetector, Postprocess};
use crate::models::embedder::{GarmentEmbedder, GarmentReading};
use crate::models::fusion::CategoryFusion;
use crate::vision::{DecodeLimits, decode_image, product_extent};

/// A garment the detector found, named again from its crop, with its embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundGarment {
    pub detection: Detection,
    pub embedding: Vec<f32>,
}

/// A detection of an evaluation with the reading of its box, where it was made.
pub type EvaluatedDetection = (Detection, Option<GarmentReading>);

/// Distinct boxes per photo an AP evaluation reads again (a served photo has at most the
/// detector's `max_detections`).
pub const SECOND_LOOK_BOXES: usize = 32;

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
    /// preprocessing path, each in its own forward pass, side by side (see the module
    /// notes); in the order of `crops`.
    pub fn embed(&self, image: &RgbImage, crops: &[Option<BBox>]) -> Result<Vec<Vec<f32>>> {
        Ok(self.read(image, crops)?.into_iter().map(|r| r.embedding).collect())
    }

    /// [`Self::embed`] with the category head's probabilities of each crop.
    pub fn read(&self, image: &RgbImage, crops: &[Option<BBox>]) -> Result<Vec<GarmentReading>> {
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        let pre = &self.embedder.config().preprocess;
        crops
            .par_iter()
            .map(|b| {
                let input = pre.crop_to_tensor(image, *b, &Device::Cpu)?.unsqueeze(0)?;
                crate::models::kernels::side_by_side(|| Ok(self.embedder.read_batch(&input)?.remove(0)))
            })
            .collect()
    }

    /// The share of the category head in the shipped second look (0: none, or no detector).
    pub fn second_look_share(&self) -> f32 {
        self.detector.map_or(0.0, |d| d.config().postprocess.category_fusion)
    }

    /// The second look with the category head's share `share` (see
    /// [`crate::models::fusion`]); `None`: the detector's classes stand.
    pub fn fusion(&self, share: f32) -> Option<CategoryFusion> {
        CategoryFusion::new(&self.detector?.config().categories, &self.embedder.config().categories, share)
    }

    /// The garments of a photo as shoppers and the indexer get them: the detector's boxes
    /// under its shipped post-processing, each embedded (see [`Self::embed`]), each named again by
    /// the category head at the configured share, best first.
    pub fn find_garments(&self, image: &RgbImage) -> Result<Vec<FoundGarment>> {
        let Some(detector) = self.detector else { return Ok(Vec::new()) };
        let post = detector.config().postprocess;
        self.second_look(image, detector.detect(image)?, &post)
    }

    /// Embeds `detections` of `image` and relabels them by [`CategoryFusion::relabel`]
    /// under `post` (its `category_fusion` share).
    pub fn second_look(&self, image: &RgbImage, detections: Vec<Detection>, post: &Postprocess) -> Result<Vec<FoundGarment>> {
        let crops: Vec<Option<BBox>> = detections.iter().map(|d| Some(d.bbox)).collect();
        let readings = self.read(image, &crops)?;
        let found = self.relabel(detections, readings, post);
        self.frame_packshot(image, found, post)
    }

    /// The product of a packshot (see [`crate::vision::product_extent`]) with the reading
    /// of its crop; `None` for any other photo, or when the embedder has no category head
    /// to name it.
    pub fn read_product(&self, image: &RgbImage) -> Result<Option<(BBox, GarmentReading)>> {
        let Some(product) = product_extent(image) else { return Ok(None) };
        let reading = self.read(image, &[Some(product)])?.remove(0);
        Ok(reading.categories.is_some().then_some((product, reading)))
    }

    /// One photo's served garments after the packshot rule ([`CategoryFusion::lone_garment`]
    /// under `post`'s second look): the lone garment framed at its product's extent, with
    /// the embedding of that crop, when the rule holds; the garments as they were otherwise.
    fn frame_packshot(&self, image: &RgbImage, found: Vec<FoundGarment>, post: &Postprocess) -> Result<Vec<FoundGarment>> {
        let Some(fusion) = self.fusion(post.category_fusion) else { return Ok(found) };
        let Some((product, reading)) = self.read_product(image)? else { return Ok(found) };
        let served: Vec<Detection> = found.iter().map(|g| g.detection.clone()).collect();
        let head = reading.categories.as_deref().unwrap_or_default();
        Ok(match fusion.lone_garment(product, head, &served, post) {
            Some(lone) => vec![FoundGarment { detection: lone.detection, embedding: reading.embedding }],
            None => found,
        })
    }

    /// The detector's garments of each of `images` with its shipped post-processing, the
    /// images in fixed batches of `batch` (one forward pass each); empty without a detector.
    pub fn detect_batched(&self, images: &[&RgbImage], batch: usize) -> Result<Vec<Vec<Detection>>> {
        let Some(detector) = self.detector else { return Ok(vec![Vec::new(); images.len()]) };
        let mut out = Vec::with_capacity(images.len());
        for group in images.chunks(batch.max(1)) {
            out.extend(detector.detect_batch(group)?);
        }
        Ok(out)
    }

    /// Garments of many photos (`(photo, box)`, `None`: the whole photo) embedded in fixed
    /// batches of `batch` crops, each one forward pass: the GPU's way (see
    /// [`crate::indexing`]); crops are preprocessed side by side on the CPU cores. A crop's
    /// embedding depends on its batch's other crops in the last bits (kernels block by batch
    /// size), so the same crops in the same batches give the same bits; in input order.
    pub fn embed_batched(&self, crops: &[(&RgbImage, Option<BBox>)], batch: usize) -> Result<Vec<GarmentReading>> {
        let pre = &self.embedder.config().preprocess;
        let mut out = Vec::with_capacity(crops.len());
        for group in crops.chunks(batch.max(1)) {
            let inputs = group.par_iter().map(|(image, b)| pre.crop_to_tensor(image, *b, &Device::Cpu)).collect::<Result<Vec<_>>>()?;
            out.extend(self.embedder.read_batch(&Tensor::stack(&inputs, 0)?)?);
        }
        Ok(out)
    }

    /// [`Self::find_garments`] of many photos through the batched passes
    /// ([`Self::detect_batched`], [`Self::embed_batched`] over all their detections), each
    /// photo's garments then named again (and a packshot's framed) as one photo's are; a
    /// packshot's product is read alone, at batch 1, as in [`Self::find_garments`].
    pub fn find_garments_batched(&self, images: &[&RgbImage], batch: usize) -> Result<Vec<Vec<FoundGarment>>> {
        let Some(detector) = self.detector else { return Ok(vec![Vec::new(); images.len()]) };
        let post = detector.config().postprocess;
        let detections = self.detect_batched(images, batch)?;
        let crops: Vec<(&RgbImage, Option<BBox>)> = images.iter().zip(&detections).flat_map(|(image, ds)| ds.iter().map(move |d| (*image, Some(d.bbox)))).collect();
        let mut readings = self.embed_batched(&crops, batch)?.into_iter();
        images
            .iter()
            .zip(detections)
            .map(|(image, ds)| {
                let mine: Vec<GarmentReading> = readings.by_ref().take(ds.len()).collect();
                let found = self.relabel(ds, mine, &post);
                self.frame_packshot(image, found, &post)
            })
            .collect()
    }

    /// Detections of one photo with the embedding of each, named again by
    /// [`CategoryFusion::relabel`] under `post`.
    fn relabel(&self, detections: Vec<Detection>, readings: Vec<GarmentReading>, post: &Postprocess) -> Vec<FoundGarment> {
        let (embeddings, head): (Vec<Vec<f32>>, Vec<Option<Vec<f32>>>) = readings.into_iter().map(|r| (r.embedding, r.categories)).unzip();
        let mut embeddings: Vec<Option<Vec<f32>>> = embeddings.into_iter().map(Some).collect();
        let kept = match self.fusion(post.category_fusion) {
            Some(fusion) => fusion.relabel(detections, &head, post),
            None => detections.into_iter().enumerate().map(|(i, d)| (d, i)).collect(),
        };
        kept.into_iter().map(|(detection, i)| FoundGarment { detection, embedding: embeddings[i].take().expect("each detection kept once") }).collect()
    }

    /// What an AP evaluation ranks at each of `shares`: the detector's detections at its
    /// evaluation floor, the [`SECOND_LOOK_BOXES`] best distinct boxes embedded once each,
    /// their detections rescored for their class by [`CategoryFusion::rescore`] (the rest,
    /// and everything at share 0, as the detector scored them); returns, per share, the
    /// detections with the reading of each one's box where it was made.
    pub fn detections_for_evaluation(&self, image: &RgbImage, shares: &[f32]) -> Result<Vec<Vec<EvaluatedDetection>>> {
        let Some(detector) = self.detector else { return Ok(vec![Vec::new(); shares.len()]) };
        // One forward pass for the evaluation's floor and the served boxes (a packshot's rule
        // is decided on what is served).
        let posts = [&Postprocess::EVALUATION, &detector.config().postprocess];
        let [detections, served] = <[_; 2]>::try_from(detector.detect_each(image, &posts)?).expect("one list per post-processing");
        // A location found for several classes gives one box: embed it once.
        let mut boxes: Vec<BBox> = Vec::new();
        let box_of: Vec<usize> = detections
            .iter()
            .map(|d| {
                boxes.iter().position(|b| *b == d.bbox).unwrap_or_else(|| {
                    boxes.push(d.bbox);
                    boxes.len() - 1
                })
            })
            .collect();
        // The best boxes only: past them the detections score too low to move AP, and each
        // box read costs an embedding.
        boxes.truncate(SECOND_LOOK_BOXES);
        let readings = self.read(image, &boxes.iter().map(|b| Some(*b)).collect::<Vec<_>>())?;
        let head: Vec<Option<Vec<f32>>> = box_of.iter().map(|&b| readings.get(b).and_then(|r| r.categories.clone())).collect();
        let reading_of = |d: &Detection| boxes.iter().position(|b| *b == d.bbox).map(|i| readings[i].clone());
        let packshot = self.packshot_for_evaluation(image, served, &boxes, &readings)?;
        Ok(shares
            .iter()
            .map(|&share| {
                let Some(fusion) = self.fusion(share) else {
                    return detections.iter().map(|d| (d.clone(), reading_of(d))).collect();
                };
                if let Some(lone) = packshot.as_ref().and_then(|p| p.lone_garment(self, &fusion, share)) {
                    return lone;
                }
                fusion.rescore(&detections, &head, &Postprocess::EVALUATION).into_iter().map(|d| (d.clone(), reading_of(&d))).collect()
            })
            .collect())
    }

    /// What the packshot rule of an AP evaluation needs of `image`: its product read, and
    /// the detector's `served` boxes with their readings — those of `read` (the evaluation's
    /// boxes, read as `readings`) reused, the rest read; `None` for any other photo.
    fn packshot_for_evaluation(&self, image: &RgbImage, served: Vec<Detection>, read: &[BBox], readings: &[GarmentReading]) -> Result<Option<EvaluatedPackshot>> {
        let Some(product) = self.read_product(image)? else { return Ok(None) };
        let missing: Vec<Option<BBox>> = served.iter().filter(|d| !read.contains(&d.bbox)).map(|d| Some(d.bbox)).collect();
        let mut fresh = self.read(image, &missing)?.into_iter();
        let readings = served
            .iter()
            .map(|d| match read.iter().position(|b| *b == d.bbox) {
                Some(i) => readings[i].clone(),
                None => fresh.next().expect("one reading per box not read yet"),
            })
            .collect();
        Ok(Some(EvaluatedPackshot { product, served, readings }))
    }
}

/// A packshot under evaluation (see [`GarmentPipeline::detections_for_evaluation`]).
struct EvaluatedPackshot {
    product: (BBox, GarmentReading),
    /// The detector's boxes under its shipped post-processing, and their readings.
    served: Vec<Detection>,
    readings: Vec<GarmentReading>,
}

impl EvaluatedPackshot {
    /// When the packshot rule holds at `share`: its garment once per class, each scored
    /// for its class as the rule scores it, best first, with the product's reading.
    fn lone_garment(&self, pipeline: &GarmentPipeline<'_>, fusion: &CategoryFusion, share: f32) -> Option<Vec<EvaluatedDetection>> {
        let config = pipeline.detector?.config();
        let post = Postprocess { category_fusion: share, ..config.postprocess };
        let found = pipeline.relabel(self.served.clone(), self.readings.clone(), &post);
        let served: Vec<Detection> = found.into_iter().map(|g| g.detection).collect();
        let (product, reading) = &self.product;
        let lone = fusion.lone_garment(*product, reading.categories.as_deref()?, &served, &post)?;
        let mut per_class: Vec<EvaluatedDetection> = lone
            .class_scores
            .iter()
            .enumerate()
            .filter(|(_, score)| **score >= Postprocess::EVALUATION.min_score)
            .map(|(class, &score)| (Detection { class, category: config.categories[class].name.clone(), score, ..lone.detection.clone() }, Some(reading.clone())))
            .collect();
        per_class.sort_by(|a, b| b.0.score.total_cmp(&a.0.score));
        Some(per_class)
    }
}
