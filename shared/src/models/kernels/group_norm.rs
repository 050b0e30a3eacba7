//! GroupNorm (Wu & He, arXiv 1803.08494) followed by ReLU, in place, in one pass per group
//! for the statistics and one for the result: the inference form of the detector head's
//! tower, whose training form (`detector::head`) is a dozen candle operations, each a pass
//! over the activation and a hand-off between threads.

use std::sync::Arc;

use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};

use crate::Result;

/// `relu(GroupNorm(x) · gamma + beta)` on `[n, c, …]`.
#[derive(Debug, Clone)]
pub(crate) struct GroupNormRelu {
    gamma: Arc<Vec<f32>>,
    beta: Arc<Vec<f32>>,
    groups: usize,
    eps: f64,
}

impl GroupNormRelu {
    pub fn new(gamma: &Tensor, beta: &Tensor, groups: usize, eps: f64) -> Result<Self> {
        let cpu = candle_core::Device::Cpu;
        let (gamma, beta) = (gamma.to_device(&cpu)?.to_vec1::<f32>()?, beta.to_device(&cpu)?.to_vec1::<f32>()?);
        if groups == 0 || gamma.len() != beta.len() || !gamma.len().is_multiple_of(groups) {
            return Err(crate::Error::InvalidWeights { reason: format!("GroupNorm of {} / {} channels in {groups} groups", gamma.len(), beta.len()) });
        }
        Ok(Self { gamma: Arc::new(gamma), beta: Arc::new(beta), groups, eps })
    }

    /// Applies it to `x` (a fresh, contiguous CPU tensor that nothing else holds) and
    /// returns it.
    pub fn apply(&self, x: Tensor) -> Result<Tensor> {
        x.inplace_op1(self)?;
        Ok(x)
    }
}

impl InplaceOp1 for GroupNormRelu {
    fn name(&self) -> &'static str {
        "group-norm-relu"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("GroupNorm expects f32");
        };
        let dims = layout.shape().dims();
        let c = self.gamma.len();
        if dims.len() < 2 || dims[1] != c {
            candle_core::bail!("GroupNorm of {c} channels applied to shape {dims:?}");
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("GroupNorm expects a contiguous tensor");
        };
        let plane: usize = dims[2..].iter().product();
        let per_group = c / self.groups;
        if plane == 0 {
            return Ok(());
        }
        super::team::for_each_chunk_mut(&mut data[start..end], per_group * plane, |index, values| {
            let count = values.len() as f64;
            let mean = values.iter().map(|&v| v as f64).sum::<f64>() / count;
            let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / count;
            let inv = 1.0 / (var + self.eps).sqrt();
            let first = (index % self.groups) * per_group;
            for (j, channel) in values.chunks_exact_mut(plane).enumerate() {
                let scale = (self.gamma[first + j] as f64 * inv) as f32;
                let shift = (self.beta[first + j] as f64 - mean * self.gamma[first + j] as f64 * inv) as f32;
                channel.iter_mut().for_each(|v| *v = (*v * scale + shift).max(0.0));
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::models::detector::group_norm;

    #[test]
    fn equals_the_training_form_of_group_norm_then_relu() {
        let dev = Device::Cpu;
        for (n, c, groups, h, w) in [(2usize, 8usize, 4usize, 5usize, 3usize), (1, 6, 1, 1, 1), (3, 4, 4, 7, 7)] {
            let x = (Tensor::randn(0f32, 3., (n, c, h, w), &dev).unwrap() + 1.5).unwrap();
            let gamma = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
            let beta = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
            let want = group_norm(&x, groups, &gamma, &beta).unwrap().relu().unwrap();
            let got = GroupNormRelu::new(&gamma, &beta, groups, 1e-5).unwrap().apply(x.copy().unwrap()).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{n}×{c}×{h}×{w} in {groups} groups: {diff}");
        }
    }

    #[test]
    fn refuses_channels_that_do_not_split_into_its_groups() {
        let t = Tensor::ones(6, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(GroupNormRelu::new(&t, &t, 4, 1e-5).is_err());
    }
}
