//! Input planes rearranged for convolutions with stride: the depthwise kernel and the
//! unfolding of dense convolutions read every filter tap as a contiguous run.

use super::layers::same_padding;
use super::rows::{PlaneLoops, Portable, RowMap, as_destination};

/// Outputs a kernel computes at once (one AVX-512 register, two AVX2 ones): the wide
/// accumulator is whole runs of them, and the phase planes are followed by as many zeros so
/// that the last run may read past the plane's end.
pub(crate) const LANES: usize = 16;

/// One input plane's layout for a k×k, stride-s, TF-"SAME" convolution.
///
/// The plane is copied once into `s²` zero-padded *phase planes*: phase `(py, px)` holds
/// the padded rows `py, py + s, ...` and columns `px, px + s, ...`, all `wph` wide. Output
/// `(oy, ox)` reads tap `(ky, kx)` at `(oy + ky / s, ox + kx / s)` of phase
/// `(ky % s, kx % s)`: for each output row, a contiguous run with no bounds to check. The
/// depthwise kernel keeps its output `wph` wide too, so that each tap is one run over the
/// whole plane (the extra columns are computed and dropped): long runs the compiler
/// vectorises, for 7×7 planes and stride 2 as well.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlaneGeometry {
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub s: usize,
    pub ho: usize,
    pub wo: usize,
    /// Padding above and left.
    pub pt: usize,
    pub pl: usize,
    /// PlaneLoops and columns of each phase plane.
    pub hph: usize,
    pub wph: usize,
}

impl PlaneGeometry {
    pub fn new(h: usize, w: usize, k: usize, s: usize) -> Self {
        let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
        let (pt, _) = same_padding(h, k, s);
        let (pl, _) = same_padding(w, k, s);
        Self { h, w, k, s, ho, wo, pt, pl, hph: ho + (k - 1) / s, wph: wo + (k - 1) / s }
    }

    /// Where tap `(ky, kx)` of output position 0 sits in the phase planes; output `p` of the
    /// wide plane reads it at `p` further on.
    pub fn tap_start(&self, ky: usize, kx: usize) -> usize {
        ((ky % self.s) * self.s + kx % self.s) * self.phase_len() + (ky / self.s) * self.wph + kx / self.s
    }

    /// [`Self::tap_start`] of every tap, in the filter's `(ky, kx)` order: computed once per
    /// layer, since its divisions cost more than a small plane's arithmetic.
    pub fn tap_starts(&self) -> Vec<usize> {
        (0..self.k * self.k).map(|t| self.tap_start(t / self.k, t % self.k)).collect()
    }

    pub fn phase_len(&self) -> usize {
        self.hph * self.wph
    }

    /// Values of the phase planes, and the [`LANES`] zeros after them that a vector loop
    /// may read past the last phase's end.
    pub fn phases_len(&self) -> usize {
        self.s * self.s * self.phase_len() + LANES
    }

    /// Phase planes (with their trailing zeros), then the wide accumulator, rounded up to
    /// whole vectors of [`LANES`].
    pub fn scratch_len(&self) -> usize {
        self.phases_len() + (self.ho * self.wph).div_ceil(LANES) * LANES
    }

    /// A zeroed scratch buffer for this geometry: the phase planes' padding is written here
    /// once and never again, since [`Self::fill_phases`] writes only where input values go.
    pub fn scratch(&self) -> Vec<f32> {
        vec![0f32; self.scratch_len()]
    }

    /// Writes the phase planes of `src` into the front of `scratch`, which must come from
    /// [`Self::scratch`] of this geometry (its padding stays zero).
    pub fn fill_phases(&self, src: &[f32], scratch: &mut [f32]) {
        self.fill_phases_mapped(src, scratch, RowMap::Copy, Portable);
    }

    /// [`Self::fill_phases`] with `map` applied to every value of `src` on the way (an
    /// activation fused into the copy, one pass instead of two), rows copied by `rows`.
    #[inline(always)]
    pub fn fill_phases_mapped(&self, src: &[f32], scratch: &mut [f32], map: RowMap, rows: impl PlaneLoops) {
        // Literal strides, so that the inlined copies divide by constants.
        match self.s {
            1 => self.fill_strided(1, src, scratch, map, rows),
            2 => self.fill_strided(2, src, scratch, map, rows),
            s => self.fill_strided(s, src, scratch, map, rows),
        }
    }

    /// Only the values under input pixels are written: for the small planes of the deep
    /// layers, clearing the padding row by row cost more than the copy.
    #[inline(always)]
    fn fill_strided(&self, s: usize, src: &[f32], scratch: &mut [f32], map: RowMap, rows: impl PlaneLoops) {
        for py in 0..s {
            for px in 0..s {
                // Phase column j is input column j·s + px − pl: inside the row for j in
                // lo..hi. Phase row i is input row i·s + py − pt: inside for i in top..bottom.
                let lo = self.pl.saturating_sub(px).div_ceil(s).min(self.wph);
                let hi = (self.w + self.pl).saturating_sub(px).div_ceil(s).min(self.wph).max(lo);
                let top = self.pt.saturating_sub(py).div_ceil(s).min(self.hph);
                let bottom = (self.h + self.pt).saturating_sub(py).div_ceil(s).min(self.hph).max(top);
                if lo == hi || top == bottom {
                    continue;
                }
                let first = lo * s + px - self.pl;
                let phase = &mut scratch[(py * s + px) * self.phase_len()..][..self.phase_len()];
                for i in top..bottom {
                    let y = i * s + py - self.pt;
                    rows.copy(&src[y * self.w + first..(y + 1) * self.w], s, as_destination(&mut phase[i * self.wph + lo..i * self.wph + hi]), map);
                }
            }
        }
    }
}

impl PlaneGeometry {
    /// The k² rows of one input channel's unfolded matrix (`im2col`): row `ky·k + kx`
    /// holds, for every output position, the input value under tap `(ky, kx)`. `phases`
    /// comes from [`Self::fill_phases`]; `rows` is `k² × ho·wo`.
    pub fn unfold(&self, phases: &[f32], rows: &mut [f32]) {
        let plane = self.ho * self.wo;
        for ky in 0..self.k {
            for kx in 0..self.k {
                let row = &mut rows[(ky * self.k + kx) * plane..][..plane];
                let tap = self.tap_start(ky, kx);
                for (oy, out) in row.chunks_exact_mut(self.wo).enumerate() {
                    let start = tap + oy * self.wph;
                    out.copy_from_slice(&phases[start..start + self.wo]);
                }
            }
        }
    }
}
