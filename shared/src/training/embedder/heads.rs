//! The trainable heads (the embedding projection and the category head) and the losses
//! that train them.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::GEM_P;
use crate::Result;
use crate::models::detector::ParamInit;
use crate::models::embedder::{CategoryHead, EmbeddingHead, EmbeddingPart, l2_normalise};

/// The trainable variables.
pub(super) struct Heads {
    pub embedding: EmbeddingHead,
    pub categories: CategoryHead,
}

impl Heads {
    /// Variables drawn from `seed` (candle's CPU generator cannot be seeded) and held in
    /// `varmap` for the optimiser, saving and resuming; `features` is the length of the
    /// backbone's pooled feature.
    pub(super) fn new(varmap: &VarMap, seed: u64, features: usize, dim: usize, classes: usize, parts: Vec<EmbeddingPart>, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut var = |name: &str, shape: &[usize], init: ParamInit| -> Result<Tensor> {
            let v = candle_core::Var::from_tensor(&crate::training::detector::init_tensor(shape, &init, &mut rng, device)?)?;
            let t = v.as_tensor().clone();
            varmap.data().lock().expect("varmap lock").insert(name.to_string(), v);
            Ok(t)
        };
        Ok(Self {
            embedding: EmbeddingHead {
                // Fixed: see GEM_P; stored so the weights file keeps its format.
                p: Tensor::new(&[GEM_P as f32], device)?,
                weight: var("proj.weight", &[dim, features], ParamInit::Normal((1.0 / features as f64).sqrt()))?,
                bias: var("proj.bias", &[dim], ParamInit::Const(0.0))?,
                parts,
            },
            categories: CategoryHead { weight: var("cls.weight", &[classes, dim], ParamInit::Normal(1.0))?, bias: var("cls.bias", &[classes], ParamInit::Const(0.0))? },
        })
    }

    /// What each loss sees of a batch of pooled features: the instance part (InfoNCE), the
    /// embedding as served (the category head, with the instance part detached so that
    /// categories shape only the kind part) and the kind part (distillation). With one part
    /// all three are the embedding.
    pub(super) fn training_views(&self, pooled: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let head = &self.embedding;
        let projected = pooled.matmul(&head.weight.t()?)?.broadcast_add(&head.bias)?;
        let [instance, kind] = head.parts.as_slice() else {
            let e = l2_normalise(&projected)?;
            return Ok((e.clone(), e.clone(), e));
        };
        let inst = l2_normalise(&projected.narrow(1, 0, instance.len)?)?;
        let kinds = l2_normalise(&projected.narrow(1, instance.len, kind.len)?)?;
        let served = Tensor::cat(&[(inst.detach() * instance.weight as f64)?, (&kinds * kind.weight as f64)?], 1)?;
        Ok((inst, served, kinds))
    }

    pub(super) fn frozen_copy(&self) -> Result<Self> {
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.detach().copy()?) };
        Ok(Self {
            embedding: EmbeddingHead { p: c(&self.embedding.p)?, weight: c(&self.embedding.weight)?, bias: c(&self.embedding.bias)?, parts: self.embedding.parts.clone() },
            categories: CategoryHead { weight: c(&self.categories.weight)?, bias: c(&self.categories.bias)? },
        })
    }
}

/// Symmetric InfoNCE of row-aligned unit embeddings: row i of `a` matches row i of `b`.
pub(super) fn info_nce(a: &Tensor, b: &Tensor, temperature: f64) -> Result<Tensor> {
    let logits = (a.matmul(&b.t()?)? / temperature)?;
    let labels = Tensor::arange(0u32, a.dim(0)? as u32, a.device())?;
    Ok(((candle_nn::loss::cross_entropy(&logits, &labels)? + candle_nn::loss::cross_entropy(&logits.t()?, &labels)?)? / 2.0)?)
}

/// KL(teacher ‖ student) of the row softmaxes of in-batch similarities (self-similarity
/// masked): the student keeps which garments the ImageNet features find alike.
pub(super) fn similarity_distillation(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let n = student.dim(0)?;
    let mask = (Tensor::eye(n, DType::F32, student.device())? * 1e4)?;
    let s = ((student.matmul(&student.t()?)? / temperature)? - &mask)?;
    let t = ((teacher.matmul(&teacher.t()?)? / temperature)? - &mask)?;
    let log_s = candle_nn::ops::log_softmax(&s, D::Minus1)?;
    let log_t = candle_nn::ops::log_softmax(&t, D::Minus1)?;
    Ok((log_t.exp()? * (log_t - log_s)?)?.sum(D::Minus1)?.mean_all()?)
}

/// `embedder-<backbone>-gem-<hash of the weights>`.
pub(super) fn model_version(backbone_file: &str, head: &EmbeddingHead, categories: &CategoryHead) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    for t in [&head.p, &head.weight, &head.bias, &categories.weight, &categories.bias] {
        for v in t.flatten_all()?.to_vec1::<f32>()? {
            hasher.update(&v.to_le_bytes());
        }
    }
    Ok(format!("embedder-{}-gem-{}", crate::models::backbone_tag(backbone_file), &hasher.finalize().to_hex()[..12]))
}
