//! The training loop: batches of instance pairs, each with as many labelled crops, through
//! the three weighted losses; one validation per epoch, the best epoch kept.

use candle_core::Tensor;
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::data::{Pair, Pooled};
use super::heads::{Heads, info_nce, similarity_distillation};
use super::validation::{Measured, Validation};
use super::{EmbedderTraining, EpochMetrics, PRECISION_K, fmt_top_k};
use crate::training::checkpoint::Checkpoint;
use crate::training::{Progress, ProgressFn};
use crate::{Error, Result};

/// What the loop trains on: pooled features, the distillation teacher and the examples,
/// all by global row.
pub(super) struct Examples<'a> {
    pub features: &'a Tensor,
    pub teacher: &'a Tensor,
    pub pairs: &'a [Pair],
    pub labelled: &'a [(u32, u32)],
    /// What each epoch is measured on: the validation rows of `pooled`.
    pub validation: &'a Validation,
    pub pooled: &'a Pooled,
    /// The category vocabulary.
    pub names: &'a [String],
}

/// The loop's outcome: every epoch's numbers and the best epoch's heads.
pub(super) struct Fitted {
    pub epochs: Vec<EpochMetrics>,
    pub best_epoch: usize,
    pub best: Heads,
}

/// Labelled crops drawn without replacement through the epochs, reshuffled at each pass.
struct LabelledDraw {
    order: Vec<usize>,
    at: usize,
}

impl LabelledDraw {
    fn take(&mut self, n: usize, labelled: &[(u32, u32)], rng: &mut ChaCha8Rng) -> Vec<(u32, u32)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n && !labelled.is_empty() {
            if self.at == 0 {
                self.order.shuffle(rng);
            }
            out.push(labelled[self.order[self.at]]);
            self.at = (self.at + 1) % labelled.len();
        }
        out
    }
}

/// Trains `heads` (held in `varmap`) from the checkpoint's epoch on; each epoch is
/// measured on `validation` and saved to the checkpoint.
pub(super) fn fit(cfg: &EmbedderTraining, mut varmap: VarMap, heads: Heads, examples: &Examples<'_>, progress: ProgressFn) -> Result<Fitted> {
    let (validation, pooled, names) = (examples.validation, examples.pooled, examples.names);
    let checkpoint = Checkpoint::beside(&cfg.out);
    let first_epoch = checkpoint.resume(cfg.resume, &mut varmap, progress)?;
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: cfg.lr, weight_decay: 1e-4, ..Default::default() })?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut draw = LabelledDraw { order: (0..examples.labelled.len()).collect(), at: 0 };
    let mut epochs = Vec::new();
    let mut best: Option<(f64, usize, Heads)> = None;
    for epoch in first_epoch..cfg.epochs {
        let mut order: Vec<usize> = (0..examples.pairs.len()).collect();
        order.shuffle(&mut rng);
        progress(Progress::Stage { name: format!("epoch {}/{}", epoch + 1, cfg.epochs), total: order.len() as u64 });
        let (mut loss_sum, mut steps) = (0.0, 0);
        for batch in order.chunks(cfg.batch).filter(|b| b.len() >= 2) {
            let chosen: Vec<Pair> = batch.iter().map(|&i| examples.pairs[i]).collect();
            let shops: Vec<u32> = chosen
                .iter()
                .map(|p| match p.shop_render {
                    Some(r) if rng.random_bool(cfg.render_share.clamp(0.0, 1.0)) => r,
                    _ => p.shop,
                })
                .collect();
            let extra = draw.take(batch.len(), examples.labelled, &mut rng);
            let loss = batch_loss(cfg, &heads, examples, &chosen, &shops, &extra)?;
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            steps += 1;
            progress(Progress::Advance(batch.len() as u64));
        }
        let frozen = heads.frozen_copy()?;
        let m = validation.measure(pooled, &frozen.embedding, &frozen.categories, names, cfg.exact_match_false_rate, &cfg.device)?;
        let metrics = epoch_metrics(epoch + 1, loss_sum / steps.max(1) as f64, &m);
        progress(Progress::Message(epoch_message(&metrics, &m)));
        // Both things a shopper gets count: the same item, and the same kind.
        let score = m.top_k[&1] + m.precision.mean;
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, epoch + 1, frozen));
        }
        epochs.push(metrics);
        checkpoint.save(&varmap, epoch + 1)?;
    }
    let (_, best_epoch, best) = best.ok_or_else(|| Error::InvalidSetting { name: "epochs", reason: "no epoch left to run (resumed past --epochs)".into() })?;
    Ok(Fitted { epochs, best_epoch, best })
}

/// The weighted loss of one batch: InfoNCE over the pairs, the category cross-entropy over
/// both sides and the labelled crops, and the distillation over them all.
fn batch_loss(cfg: &EmbedderTraining, heads: &Heads, examples: &Examples<'_>, chosen: &[Pair], shops: &[u32], extra: &[(u32, u32)]) -> Result<Tensor> {
    let rows: Vec<u32> = chosen.iter().map(|p| p.consumer).chain(shops.iter().copied()).chain(extra.iter().map(|e| e.0)).collect();
    let classes: Vec<u32> = chosen.iter().map(|p| p.category).chain(chosen.iter().map(|p| p.category)).chain(extra.iter().map(|e| e.1)).collect();
    let idx = Tensor::new(rows.as_slice(), &cfg.device)?;
    let n = chosen.len();
    let (instance, classified, kind) = heads.training_views(&examples.features.index_select(&idx, 0)?)?;
    let mut loss = info_nce(&instance.narrow(0, 0, n)?, &instance.narrow(0, n, n)?, cfg.temperature)?;
    if cfg.category_weight > 0.0 {
        let labels = Tensor::new(classes.as_slice(), &cfg.device)?;
        loss = (loss + (candle_nn::loss::cross_entropy(&heads.categories.logits(&classified)?, &labels)? * cfg.category_weight)?)?;
    }
    if cfg.distill_weight > 0.0 {
        loss = (loss + (similarity_distillation(&kind, &examples.teacher.index_select(&idx, 0)?, cfg.temperature)? * cfg.distill_weight)?)?;
    }
    Ok(loss)
}

fn epoch_metrics(epoch: usize, loss: f64, m: &Measured) -> EpochMetrics {
    EpochMetrics {
        epoch,
        loss,
        top_k: m.top_k.clone(),
        ranked_top_k: m.ranked_top_k.clone(),
        precision: m.precision.mean,
        ranked_precision: m.ranked_precision.mean,
        category_accuracy: m.accuracy,
        exact_match_similarity: m.exact_above,
    }
}

fn epoch_message(metrics: &EpochMetrics, m: &Measured) -> String {
    format!(
        "epoch {}: loss {:.4}, validation {} (ranked: top-1 {:.3}, top-20 {:.3}; category strictly first: top-1 {:.3}), category precision@{PRECISION_K} {:.3} (ranked {:.3}), category accuracy {:.3}, exact match ≥ {:.3}",
        metrics.epoch,
        metrics.loss,
        fmt_top_k(&m.top_k),
        m.ranked_top_k[&1],
        m.ranked_top_k[&20],
        m.strict_top_k[&1],
        m.precision.mean,
        m.ranked_precision.mean,
        m.accuracy,
        m.exact_above
    )
}
