//! The detector's training loop: each epoch draws one cached view per image it uses, in a
//! seeded order, under a warm-up then cosine learning rate; validation every
//! `eval_every` epochs and at the end.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::data::{CATALOG_VIEWS, CachedViews};
use super::targets::{LocationTarget, losses, target_tensors};
use super::{DetectorTraining, Tuned, fmt_ap50, headline_classes, tuned_levels, validate};
use crate::Result;
use crate::evaluation::detection::ApSummary;
use crate::models::Backbone;
use crate::models::detector::{DetectorConfig, TUNED_BLOCKS, head_inputs};
use crate::training::checkpoint::Checkpoint;
use crate::training::{Progress, ProgressFn};

/// Street validation, and shop validation with garments per image when the run has shop
/// images.
pub(super) type Validation = (ApSummary, Option<(ApSummary, f64)>);

/// What the loop trains on.
pub(super) struct Run<'a> {
    pub cfg: &'a DetectorTraining,
    pub backbone: &'a Backbone,
    pub config: &'a DetectorConfig,
    pub views: &'a CachedViews,
    pub grid: &'a [(f32, f32, f32)],
    /// FCOS targets of every training view.
    pub assigned: &'a [Vec<LocationTarget>],
    pub street_train: usize,
    pub shop_train: usize,
    /// Pseudo-boxed catalog photos (see `data::catalog_samples`).
    pub catalog_train: usize,
}

/// Warm-up over the first epoch (at most 100 steps), then a cosine decay to 2 %.
struct Schedule {
    steps_per_epoch: usize,
    total_steps: f64,
    warmup: f64,
}

impl Schedule {
    fn lr(&self, base: f64, epoch: usize, batch: usize) -> f64 {
        let step = (epoch * self.steps_per_epoch + batch) as f64;
        if step < self.warmup { base * (0.1 + 0.9 * step / self.warmup) } else { base * (0.02 + 0.98 * 0.5 * (1.0 + (std::f64::consts::PI * step / self.total_steps).cos())) }
    }
}

impl Run<'_> {
    fn shop_per_epoch(&self) -> usize {
        if self.shop_train == 0 { 0 } else { self.cfg.shop_per_epoch.min(self.shop_train) }
    }

    /// Catalog photos drawn per epoch: as many as street photos at most, so the annotated
    /// photos keep at least half of the street-style views.
    fn catalog_per_epoch(&self) -> usize {
        self.catalog_train.min(self.street_train)
    }

    /// Trains `head` (held in `varmap`) from the checkpoint's epoch on; returns the last
    /// validation. The reported numbers are the last epoch's: no epoch is picked by them.
    pub(super) fn fit(&self, tuned: Tuned<'_>, mut varmap: VarMap, progress: ProgressFn) -> Result<Validation> {
        let cfg = self.cfg;
        let checkpoint = Checkpoint::beside(&cfg.out);
        let first_epoch = checkpoint.resume(cfg.resume, &mut varmap, progress)?;
        // The head learns from scratch; the tuned blocks start from ImageNet and move at
        // their own, smaller rate.
        let (stage_vars, head_vars): (Vec<_>, Vec<_>) =
            varmap.data().lock().expect("varmap lock").iter().map(|(n, v)| (n.clone(), v.clone())).partition(|(n, _)| n.starts_with(TUNED_BLOCKS));
        let unnamed = |vars: Vec<(String, Var)>| vars.into_iter().map(|(_, v)| v).collect::<Vec<_>>();
        let mut opt = AdamW::new(unnamed(head_vars), ParamsAdamW { lr: cfg.lr, weight_decay: 1e-4, ..Default::default() })?;
        let stage_lr = cfg.stage_lr.unwrap_or(0.0);
        let mut stage_opt = AdamW::new(unnamed(stage_vars), ParamsAdamW { lr: stage_lr, weight_decay: 1e-4, ..Default::default() })?;
        let steps_per_epoch = (self.street_train + self.shop_per_epoch() + self.catalog_per_epoch()).div_ceil(cfg.batch);
        let schedule = Schedule { steps_per_epoch, total_steps: (steps_per_epoch * cfg.epochs) as f64, warmup: (steps_per_epoch as f64).min(100.0) };
        let mut last = None;
        for epoch in first_epoch..cfg.epochs {
            let picks = self.epoch_picks(epoch);
            progress(Progress::Stage { name: format!("epoch {}/{}", epoch + 1, cfg.epochs), total: picks.len() as u64 });
            let mut sums = [0f64; 3];
            let mut steps = 0;
            for (b, batch) in picks.chunks(cfg.batch).enumerate() {
                opt.set_learning_rate(schedule.lr(cfg.lr, epoch, b));
                stage_opt.set_learning_rate(schedule.lr(stage_lr, epoch, b));
                let parts = self.batch_losses(tuned, batch)?;
                let loss = ((&parts[0] + &parts[1])? + &parts[2])?;
                let grads = loss.backward()?;
                opt.step(&grads)?;
                stage_opt.step(&grads)?;
                for (s, l) in sums.iter_mut().zip(&parts) {
                    *s += l.to_scalar::<f32>()? as f64;
                }
                steps += 1;
                progress(Progress::Advance(batch.len() as u64));
            }
            let n = steps.max(1) as f64;
            let mut line = format!("epoch {}: loss classes {:.4}, boxes {:.4}, centre-ness {:.4}", epoch + 1, sums[0] / n, sums[1] / n, sums[2] / n);
            checkpoint.save(&varmap, epoch + 1)?;
            if (epoch + 1) % cfg.eval_every == 0 || epoch + 1 == cfg.epochs {
                let validation = self.evaluate(tuned)?;
                line += &self.validation_message(&validation);
                last = Some(validation);
            }
            progress(Progress::Message(line));
        }
        match last {
            Some(validation) => Ok(validation),
            None => self.evaluate(tuned),
        }
    }

    /// The training views of `epoch`, by row. They follow from the seed and the epoch
    /// alone, so a resumed run sees what an uninterrupted one would: every street photo
    /// once and `shop_per_epoch` shop images, each through one of its cached views.
    fn epoch_picks(&self, epoch: usize) -> Vec<u32> {
        let cfg = self.cfg;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ (0x5eed_0000 + epoch as u64));
        let mut picks: Vec<u32> = (0..self.street_train).map(|i| (i * cfg.views + rng.random_range(0..cfg.views)) as u32).collect();
        let mut shop_order: Vec<usize> = (0..self.shop_train).collect();
        shop_order.shuffle(&mut rng);
        let shop_offset = self.views.shop_offset;
        picks.extend(shop_order[..self.shop_per_epoch()].iter().map(|&j| (shop_offset + j * cfg.shop_views + rng.random_range(0..cfg.shop_views)) as u32));
        if self.catalog_train > 0 {
            let mut catalog_order: Vec<usize> = (0..self.catalog_train).collect();
            catalog_order.shuffle(&mut rng);
            let offset = self.views.catalog_offset;
            picks.extend(catalog_order[..self.catalog_per_epoch()].iter().map(|&j| (offset + j * CATALOG_VIEWS + rng.random_range(0..CATALOG_VIEWS)) as u32));
        }
        picks.shuffle(&mut rng);
        picks
    }

    /// The three FCOS losses of the views `batch`: classes, boxes, centre-ness.
    fn batch_losses(&self, (head, stage): Tuned<'_>, batch: &[u32]) -> Result<[Tensor; 3]> {
        let device = &self.cfg.device;
        let idx = Tensor::new(batch, &Device::Cpu)?;
        let feats = self.views.train_levels.iter().map(|l| l.index_select(&idx, 0)?.to_device(device)?.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
        let feats = head_inputs(self.backbone, self.config, tuned_levels(stage, feats)?)?;
        let batch_assigned: Vec<_> = batch.iter().map(|&i| self.assigned[i as usize].clone()).collect();
        let k = self.config.num_classes();
        let (cls_t, reg_t, ctr_t, pos) = target_tensors(&batch_assigned, k, device)?;
        let out = head.forward(&feats)?;
        let (l_cls, l_box, l_ctr) = losses(&out, k, &cls_t, &reg_t, &ctr_t, &pos)?;
        Ok([l_cls, l_box, l_ctr])
    }

    fn evaluate(&self, tuned: Tuned<'_>) -> Result<Validation> {
        let (views, device) = (self.views, &self.cfg.device);
        let (street_ap, _) = validate(self.backbone, self.config, tuned, &views.val_levels, &views.val_targets, self.grid, device)?;
        let shop_ap = views.shop_val.as_ref().map(|(levels, targets)| validate(self.backbone, self.config, tuned, levels, targets, self.grid, device)).transpose()?;
        Ok((street_ap, shop_ap))
    }

    fn validation_message(&self, (summary, shop): &Validation) -> String {
        let categories = &self.config.categories;
        let headline = headline_classes(categories);
        let mut line = format!(
            "; validation AP {:.3}, AP50 {:.3}, headline AP50 {} ({})",
            summary.ap,
            summary.ap50,
            summary.mean_ap50_over(&headline).map_or("-".into(), |h| format!("{h:.3}")),
            fmt_ap50(summary, categories)
        );
        if let Some((s, per_image)) = shop {
            let h = s.mean_ap50_over(&headline);
            line +=
                &format!("; shop AP50 {:.3}, headline {}, {per_image:.2} garments per image ({})", s.ap50, h.map_or("-".into(), |h| format!("{h:.3}")), fmt_ap50(s, categories));
        }
        line
    }
}
