//! Dense k×k convolutions of stride 1 on the CPU as k² shifted matrix products, with no
//! unfolded (`im2col`) copy.
//!
//! Each input channel is copied once into a zero-padded plane `wph = w + k − 1` wide (the
//! phase plane of [`PlaneGeometry`] for stride 1). In that layout, the output computed
//! `wph` wide reads tap `(ky, kx)` at one fixed offset from its own position, so for every
//! tap the input is a plain strided matrix `[in, positions]` and the convolution is
//! `Σ_taps W_tap · X_tap`: k² single-threaded `gemm` calls accumulating into a block of the
//! wide output, which is then compacted into the real columns with the bias (and ReLU6).
//!
//! The detector head's 3×3 convolutions went through a padded copy, nine narrowed copies
//! stacked into an unfolded matrix nine times the input, candle's threaded `matmul` and a
//! separate bias pass: about a quarter of a detection for a fifth of its arithmetic.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

use super::SendPtr;

use super::planes::PlaneGeometry;

/// Output channels per block.
const BLOCK_ROWS: usize = 64;
/// Wide output positions per block at most (a block's sums stay in L2: 64 × 256 floats)
/// and at least (a few of gemm's vector widths).
const BLOCK_COLS: usize = 256;
const MIN_BLOCK_COLS: usize = 64;
/// Blocks a convolution is cut into at least where its size allows, so that the cores
/// share it evenly (the 10×10 level was one block).
const MIN_BLOCKS: usize = 8;

/// `[n, in, h, w]` → `[n, out, h, w]`: a k×k, stride-1 convolution with TensorFlow "SAME"
/// padding, plus bias, optionally ReLU6.
#[derive(Debug, Clone)]
pub(crate) struct ShiftedConv {
    /// `[k², out, in]`: tap-major, so that each tap's matrix is row-major `[out, in]`.
    weight: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    out_channels: usize,
    in_channels: usize,
    kernel: usize,
    relu6: bool,
}

impl ShiftedConv {
    /// `weight` row-major `[out, in, k, k]`, `bias` `[out]`.
    pub fn new(weight: &[f32], bias: &[f32], out_channels: usize, in_channels: usize, kernel: usize) -> Self {
        let taps = kernel * kernel;
        let mut by_tap = vec![0f32; weight.len()];
        for o in 0..out_channels {
            for i in 0..in_channels {
                for t in 0..taps {
                    by_tap[(t * out_channels + o) * in_channels + i] = weight[(o * in_channels + i) * taps + t];
                }
            }
        }
        Self { weight: Arc::new(by_tap), bias: Arc::new(bias.to_vec()), out_channels, in_channels, kernel, relu6: false }
    }

    /// The same convolution, with or without ReLU6.
    pub fn with_relu6(&self, relu6: bool) -> Self {
        Self { relu6, ..self.clone() }
    }

    fn run(&self, x: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
        let (out, inp, k) = (self.out_channels, self.in_channels, self.kernel);
        let g = PlaneGeometry::new(h, w, k, 1);
        let (plane, padded_len) = (h * w, g.phases_len());
        let starts = g.tap_starts();
        // The wide output: positions p = y·wph + x, the last row cut at its real end.
        let run = (h - 1) * g.wph + w;
        let mut y = vec![0f32; n * out * plane];
        let mut padded = vec![0f32; n * inp * padded_len];
        super::team::for_each_chunk_mut(&mut padded, padded_len, |i, dst| g.fill_phases(&x[i * plane..(i + 1) * plane], dst));
        let row_blocks = out.div_ceil(BLOCK_ROWS);
        // From the shape alone, never the thread count: the bits do not depend on it.
        let block_cols = run.div_ceil(MIN_BLOCKS.div_ceil(row_blocks)).next_multiple_of(16).clamp(MIN_BLOCK_COLS, BLOCK_COLS);
        let col_blocks = run.div_ceil(block_cols);
        let base = SendPtr(y.as_mut_ptr());
        super::team::for_each_task_init(
            n * row_blocks * col_blocks,
            || vec![0f32; BLOCK_ROWS * block_cols],
            |wide, block| {
                let image = block / (row_blocks * col_blocks);
                let (rb, cb) = ((block / col_blocks) % row_blocks, block % col_blocks);
                let (r0, r1) = (rb * BLOCK_ROWS, ((rb + 1) * BLOCK_ROWS).min(out));
                let (c0, c1) = (cb * block_cols, ((cb + 1) * block_cols).min(run));
                let (rows, cols) = (r1 - r0, c1 - c0);
                let input = &padded[image * inp * padded_len..(image + 1) * inp * padded_len];
                for (t, &start) in starts.iter().enumerate() {
                    let weight = &self.weight[(t * out + r0) * inp..(t * out + r1) * inp];
                    // SAFETY: `wide` holds rows × cols values at row stride cols; the tap's
                    // input rows are `inp` runs of `cols` values at stride padded_len, the
                    // last ending within the image's padded planes (the wide run of the
                    // last tap ends at its phase plane's end); weight is rows × inp.
                    unsafe {
                        super::product_on_this_thread(rows, cols, inp, wide.as_mut_ptr(), cols, t > 0, weight.as_ptr(), inp, input.as_ptr().add(start + c0), padded_len);
                    }
                }
                // The block's wide positions, row by row of the image: the first w of each
                // row are outputs, the rest (k − 1 columns) are dropped.
                for row in c0 / g.wph..=(c1 - 1) / g.wph {
                    let (from, to) = (c0.max(row * g.wph), c1.min(row * g.wph + w));
                    if from >= to {
                        continue;
                    }
                    for (r, sums) in wide.chunks_exact(cols).take(rows).enumerate() {
                        let (bias, channel) = (self.bias[r0 + r], image * out + r0 + r);
                        // SAFETY: the run is inside output row `row` of `channel`; each wide
                        // position belongs to exactly one block, so no two tasks write the
                        // same values.
                        let dst = unsafe { std::slice::from_raw_parts_mut(base.get().add(channel * plane + from - row * g.wph + row * w), to - from) };
                        for (d, &sum) in dst.iter_mut().zip(&sums[from - c0..to - c0]) {
                            let v = sum + bias;
                            *d = if self.relu6 { v.clamp(0.0, 6.0) } else { v };
                        }
                    }
                }
            },
        );
        y
    }
}

impl CustomOp1 for ShiftedConv {
    fn name(&self) -> &'static str {
        "shifted-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::cpu_values(storage, layout, "shifted convolution")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.in_channels {
            candle_core::bail!("{}×{} convolution with {} inputs applied to {c} channels", self.kernel, self.kernel, self.in_channels);
        }
        let y = if n * h * w == 0 { Vec::new() } else { self.run(x, n, h, w) };
        Ok((CpuStorage::F32(y), Shape::from((n, self.out_channels, h, w))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Tensor};

    use super::*;
    use crate::models::kernels::layers::same_padding;

    /// candle's own convolution of `x` with TF-SAME padding, plus bias, optionally ReLU6.
    fn reference(x: &Tensor, weight: &Tensor, bias: &Tensor, relu6: bool) -> Tensor {
        let (_, _, h, w) = x.dims4().unwrap();
        let k = weight.dim(2).unwrap();
        let (pt, pb) = same_padding(h, k, 1);
        let (pl, pr) = same_padding(w, k, 1);
        let x = x.pad_with_zeros(D::Minus2, pt, pb).unwrap().pad_with_zeros(D::Minus1, pl, pr).unwrap();
        let y = x.conv2d(weight, 0, 1, 1, 1).unwrap().broadcast_add(&bias.reshape((1, (), 1, 1)).unwrap()).unwrap();
        if relu6 { y.clamp(0f32, 6f32).unwrap() } else { y }
    }

    #[test]
    fn equals_candles_convolution_across_blocks_sizes_and_batches() {
        let dev = Device::Cpu;
        // 70 outputs: two row blocks; 23×19 positions: wide runs crossing column blocks in
        // the middle of image rows; 1×1 and 2×3 images: padding all round.
        for (k, n, c, o, h, w) in [(3usize, 2usize, 5usize, 70usize, 23usize, 19usize), (5, 1, 3, 4, 9, 8), (3, 3, 4, 6, 1, 1), (3, 1, 2, 3, 2, 3), (2, 1, 3, 2, 5, 4)] {
            let weight = Tensor::randn(0f32, 1., (o, c, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., o, &dev).unwrap();
            let x = Tensor::randn(0f32, 1., (n, c, h, w), &dev).unwrap();
            for relu6 in [false, true] {
                let op = ShiftedConv::new(&weight.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &bias.to_vec1::<f32>().unwrap(), o, c, k).with_relu6(relu6);
                let got = x.apply_op1_no_bwd(&op).unwrap();
                let want = reference(&x, &weight, &bias, relu6);
                assert_eq!(got.dims(), want.dims());
                let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "k={k} n={n} c={c} o={o} {h}×{w} relu6={relu6}: {diff}");
            }
        }
    }
}
