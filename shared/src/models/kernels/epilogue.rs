//! The work after a convolution's matrix product, done in one pass over its fresh output and
//! in place: per-channel bias (the folded BatchNorm's shift), an optional residual input,
//! an optional ReLU6.
//!
//! Done with candle's own ops this is `broadcast_add`, `+`, `clamp`: three passes, each
//! allocating and filling a new tensor the size of the activation (4.8 MB for the first
//! expanded block of Lite0 at 224²). On the CPU the profile showed that memory traffic and
//! those allocations (page faults, memset) beside the arithmetic; see `benches/NOTES.md`.

use std::sync::Arc;

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Tensor};

use crate::Result;

/// Bias (+ residual) (+ ReLU6), in place, on `[n, c, h, w]` or `[n, c, h·w]` activations.
#[derive(Debug, Clone)]
pub struct Epilogue {
    bias: Arc<Vec<f32>>,
    /// The bias as a tensor, for devices without the CPU kernel.
    bias_tensor: Tensor,
    pub relu6: bool,
}

/// Planes of fewer values than this are grouped into one task (thread hand-offs cost
/// more than a 7×7 plane's arithmetic).
const MIN_TASK_VALUES: usize = 16 * 1024;

impl Epilogue {
    pub fn new(bias: &Tensor, relu6: bool) -> Result<Self> {
        Ok(Self { bias: Arc::new(bias.to_device(&candle_core::Device::Cpu)?.to_vec1::<f32>()?), bias_tensor: bias.clone(), relu6 })
    }

    /// The same bias, with or without ReLU6.
    pub fn with_relu6(&self, relu6: bool) -> Self {
        Self { relu6, ..self.clone() }
    }

    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self { bias_tensor: self.bias_tensor.to_device(device)?, ..self.clone() })
    }

    /// Applies the epilogue to `y` and returns it; with `residual`, `y + bias + residual`.
    /// `y` must be the fresh output of a convolution that nothing else holds: on the CPU its
    /// storage is overwritten. Outside the CPU, candle's ops do the same out of place.
    pub(crate) fn apply(&self, y: Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let c = self.bias.len();
        // In place on the CPU and, with our GPU kernel, on a CUDA GPU.
        if (y.device().is_cpu() || y.device().is_cuda()) && y.is_contiguous() && residual.is_none_or(|r| r.is_contiguous() && r.dims() == y.dims()) {
            match residual {
                None => y.inplace_op1(self)?,
                Some(r) => y.inplace_op2(r, self)?,
            }
            return Ok(y);
        }
        let shape = y.dims().to_vec();
        let mut bias_shape = vec![1usize; shape.len()];
        bias_shape[1] = c;
        let mut out = y.broadcast_add(&self.bias_tensor.reshape(bias_shape)?)?;
        if let Some(r) = residual {
            out = (out + r)?;
        }
        Ok(if self.relu6 { out.clamp(0f32, 6f32)? } else { out })
    }

    fn run(&self, data: &mut [f32], layout: &Layout, residual: Option<&[f32]>) -> candle_core::Result<()> {
        let dims = layout.shape().dims();
        if dims.len() < 2 || dims[1] != self.bias.len() {
            candle_core::bail!("epilogue for {} channels applied to shape {dims:?}", self.bias.len());
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("epilogue expects a contiguous tensor");
        };
        let data = &mut data[start..end];
        let plane: usize = dims[2..].iter().product();
        let c = dims[1];
        if plane == 0 {
            return Ok(());
        }
        let planes_per_task = MIN_TASK_VALUES.div_ceil(plane).max(1);
        let relu6 = self.relu6;
        super::team::for_each_chunk_mut(data, plane * planes_per_task, |task, chunk| {
            for (j, values) in chunk.chunks_mut(plane).enumerate() {
                let index = task * planes_per_task + j;
                let b = self.bias[index % c];
                match residual {
                    Some(r) => {
                        let r = &r[index * plane..(index + 1) * plane];
                        for (v, r) in values.iter_mut().zip(r) {
                            *v += b + r;
                        }
                    }
                    None => values.iter_mut().for_each(|v| *v += b),
                }
                if relu6 {
                    values.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
                }
            }
        });
        Ok(())
    }
}

impl InplaceOp1 for Epilogue {
    fn name(&self) -> &'static str {
        "conv-epilogue"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("the epilogue expects f32");
        };
        self.run(data, layout, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        super::gpu::epilogue(storage, layout, &self.bias_tensor, None, self.relu6)
    }
}

impl InplaceOp2 for Epilogue {
    fn name(&self) -> &'static str {
        "conv-epilogue-residual"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout, residual: &CpuStorage, residual_layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), CpuStorage::F32(r)) = (storage, residual) else {
            candle_core::bail!("the epilogue expects f32");
        };
        let Some((rs, re)) = residual_layout.contiguous_offsets() else {
            candle_core::bail!("the residual must be contiguous");
        };
        if residual_layout.shape() != layout.shape() {
            candle_core::bail!("residual shape {:?} differs from {:?}", residual_layout.shape(), layout.shape());
        }
        self.run(data, layout, Some(&r[rs..re]))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, layout: &Layout, residual: &candle_core::CudaStorage, residual_layout: &Layout) -> candle_core::Result<()> {
        if residual_layout.shape() != layout.shape() {
            candle_core::bail!("residual shape {:?} differs from {:?}", residual_layout.shape(), layout.shape());
        }
        super::gpu::epilogue(storage, layout, &self.bias_tensor, Some((residual, residual_layout)), self.relu6)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn equals_candles_ops_with_and_without_residual_and_relu6() {
        let dev = Device::Cpu;
        for (n, c, h, w) in [(1usize, 3usize, 5usize, 7usize), (2, 17, 1, 1), (3, 4, 64, 65)] {
            let bias = Tensor::randn(0f32, 2., c, &dev).unwrap();
            let x = (Tensor::randn(0f32, 4., (n, c, h, w), &dev).unwrap() + 2.0).unwrap();
            let r = Tensor::randn(0f32, 4., (n, c, h, w), &dev).unwrap();
            for relu6 in [false, true] {
                for residual in [None, Some(&r)] {
                    let e = Epilogue::new(&bias, relu6).unwrap();
                    let mut want = x.broadcast_add(&bias.reshape((1, c, 1, 1)).unwrap()).unwrap();
                    if let Some(r) = residual {
                        want = (want + r).unwrap();
                    }
                    if relu6 {
                        want = want.clamp(0f32, 6f32).unwrap();
                    }
                    let got = e.apply(x.copy().unwrap(), residual).unwrap();
                    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(diff < 1e-5, "{n}×{c}×{h}×{w} relu6={relu6} residual={}: {diff}", residual.is_some());
                }
            }
        }
    }

    #[test]
    fn refuses_a_channel_count_it_was_not_made_for() {
        let e = Epilogue::new(&Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(), false).unwrap();
        assert!(e.apply(Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(), None).is_err());
    }
}
