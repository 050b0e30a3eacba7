//! 1×1 convolutions on the CPU: the destination is written with the bias (and the
//! residual) first, then cut into blocks of output channels × positions, each one
//! single-threaded `gemm` call that accumulates the product onto it (`dst += W·x`), ReLU6
//! applied to the block while it is in cache.
//!
//! Through candle's `matmul` the same layer was a zero-filled destination, gemm's own
//! threading inside each call, then the epilogue as a separate parallel pass: three hand-offs
//! between threads per layer and two passes over the activation. Blocks are sized from the
//! matrix shapes alone, so results do not depend on the thread count.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape};

use super::SendPtr;

/// Output channels per block.
const BLOCK_ROWS: usize = 64;
/// Positions per block.
const BLOCK_COLS: usize = 1024;

/// Blocks a layer's product is cut into at least, so that the cores share it evenly.
const MIN_BLOCKS: usize = 8;
/// Narrowest block of positions (a few of gemm's vector widths).
const MIN_BLOCK_COLS: usize = 64;

/// Rows × positions of a block of an `out × hw` product, from the shape alone (never the
/// thread count): at most `BLOCK_ROWS × BLOCK_COLS`, and narrower until the product has
/// [`MIN_BLOCKS`] blocks (a 28×28 layer of 40 channels was one block: one core idle).
fn block_shape(out: usize, hw: usize) -> (usize, usize) {
    let row_blocks = out.div_ceil(BLOCK_ROWS);
    let col_blocks = hw.div_ceil(BLOCK_COLS).max(MIN_BLOCKS.div_ceil(row_blocks));
    let cols = hw.div_ceil(col_blocks).next_multiple_of(16).max(MIN_BLOCK_COLS);
    (BLOCK_ROWS, cols.min(BLOCK_COLS))
}

/// `W [out, in]` times `[n, in, hw]` plus bias (plus residual), optionally ReLU6.
#[derive(Debug, Clone)]
pub(crate) struct Pointwise {
    /// Row-major `[out, in]`.
    pub weight: Arc<Vec<f32>>,
    pub bias: Arc<Vec<f32>>,
    pub out_channels: usize,
    pub in_channels: usize,
    pub relu6: bool,
}

impl Pointwise {
    fn run(&self, x: &[f32], shape: &Shape, residual: Option<&[f32]>) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = shape.dims();
        if dims.len() < 2 || dims[1] != self.in_channels {
            candle_core::bail!("1×1 convolution with {} inputs applied to shape {dims:?}", self.in_channels);
        }
        let (n, hw) = (dims[0], dims[2..].iter().product::<usize>());
        let (out, inp) = (self.out_channels, self.in_channels);
        let len = n * out * hw;
        let mut out_dims = dims.to_vec();
        out_dims[1] = out;
        if let Some(r) = residual
            && r.len() != len
        {
            candle_core::bail!("residual of {} values for an output of {len}", r.len());
        }
        if len == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from(out_dims)));
        }
        // Each block starts its rectangle of the destination as residual + bias (or
        // 0 + bias) itself, then accumulates its product onto it: a serial copy (or memset)
        // of the whole destination before the blocks kept the other core waiting.
        let mut dst: Vec<f32> = Vec::with_capacity(len);
        let (block_rows, block_cols) = block_shape(out, hw);
        let (row_blocks, col_blocks) = (out.div_ceil(block_rows), hw.div_ceil(block_cols));
        let base = SendPtr(dst.as_mut_ptr());
        super::team::for_each_task(n * row_blocks * col_blocks, |block| {
            let image = block / (row_blocks * col_blocks);
            let (rb, cb) = ((block / col_blocks) % row_blocks, block % col_blocks);
            let (r0, r1) = (rb * block_rows, ((rb + 1) * block_rows).min(out));
            let (c0, c1) = (cb * block_cols, ((cb + 1) * block_cols).min(hw));
            // SAFETY: blocks are disjoint rectangles of image `image`'s out×hw matrix, so
            // no two tasks touch the same value; every index below is within `len`. Each
            // row of the rectangle is written whole (through a raw pointer, as the capacity
            // is uninitialised) before gemm reads it.
            unsafe {
                let start = image * out * hw + r0 * hw + c0;
                let d = base.get().add(start);
                for r in r0..r1 {
                    let (b, row) = (self.bias[r], d.add((r - r0) * hw));
                    match residual {
                        Some(res) => {
                            for (j, &v) in res[start + (r - r0) * hw..][..c1 - c0].iter().enumerate() {
                                row.add(j).write(v + b);
                            }
                        }
                        None => (0..c1 - c0).for_each(|j| row.add(j).write(0.0 + b)),
                    }
                }
                super::product_on_this_thread(r1 - r0, c1 - c0, inp, d, hw, true, self.weight.as_ptr().add(r0 * inp), inp, x.as_ptr().add(image * inp * hw + c0), hw);
                if self.relu6 {
                    for r in 0..r1 - r0 {
                        let row = std::slice::from_raw_parts_mut(d.add(r * hw), c1 - c0);
                        row.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
                    }
                }
            }
        });
        // SAFETY: the blocks cover the n × out × hw destination, and each wrote all of its
        // rectangle above.
        unsafe { dst.set_len(len) };
        Ok((CpuStorage::F32(dst), Shape::from(out_dims)))
    }
}

impl CustomOp1 for Pointwise {
    fn name(&self) -> &'static str {
        "pointwise-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(super::cpu_values(storage, layout, "1×1 convolution")?, layout.shape(), None)
    }
}

impl CustomOp2 for Pointwise {
    fn name(&self) -> &'static str {
        "pointwise-conv-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape().dims().first() != l2.shape().dims().first() {
            candle_core::bail!("input and residual differ in batch size");
        }
        self.run(super::cpu_values(s1, l1, "1×1 convolution")?, l1.shape(), Some(super::cpu_values(s2, l2, "1×1 convolution (residual)")?))
    }
}
