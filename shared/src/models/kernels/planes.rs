//! Input planes rearranged for convolutions with stride: the depthwise kernel and the
//! unfolding of dense convolutions read every filter tap as a contiguous run.

use super::layers::same_padding;

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
    /// Rows and columns of each phase plane.
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

    /// Writes the phase planes of `src` into the front of `scratch` (zeros where the
    /// padding is).
    pub fn fill_phases(&self, src: &[f32], scratch: &mut [f32]) {
        let s = self.s;
        for py in 0..s {
            for px in 0..s {
                let phase = &mut scratch[(py * s + px) * self.phase_len()..][..self.phase_len()];
                for (i, row) in phase.chunks_exact_mut(self.wph).enumerate() {
                    // Phase row i is padded row i·s + py, input row i·s + py − pt.
                    let y = (i * s + py) as isize - self.pt as isize;
                    if y < 0 || y >= self.h as isize {
                        row.fill(0.0);
                        continue;
                    }
                    let src_row = &src[y as usize * self.w..(y as usize + 1) * self.w];
                    // Phase column j is input column j·s + px − pl: inside the row for
                    // j in lo..hi, padding on either side.
                    let lo = self.pl.saturating_sub(px).div_ceil(s).min(self.wph);
                    let hi = (self.w + self.pl).saturating_sub(px).div_ceil(s).min(self.wph).max(lo);
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    if lo < hi {
                        let first = lo * s + px - self.pl;
                        let inside = &mut row[lo..hi];
                        if s == 1 {
                            inside.copy_from_slice(&src_row[first..first + inside.len()]);
                        } else {
                            // The first value of each s-wide chunk (`step_by` did not vectorise).
                            for (v, chunk) in inside.iter_mut().zip(src_row[first..].chunks(s)) {
                                *v = chunk[0];
                            }
                        }
                    }
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
