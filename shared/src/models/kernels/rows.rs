//! The depthwise kernel's inner loops, once in plain Rust and once in AVX-512 intrinsics:
//! row copies with an activation on the way, and the taps' multiply-adds.
//!
//! The kernel copies every input row into its phase planes and every output row out of its
//! wide accumulator. The deep layers' rows are 7 or 14 values: the compiler's vector loop
//! never starts on them, and the scalar copies cost a quarter of the kernel. With AVX-512 a
//! row is whole vectors and one masked vector, for strides 1 and 2 alike. The taps' loop,
//! compiled from plain Rust, reloaded its pointers and checked bounds at every tap and kept
//! only four sums in flight; written out, it keeps eight.

use std::mem::MaybeUninit;

/// `values` as a destination of [`PlaneLoops::copy`], which writes only initialised values.
pub(crate) fn as_destination(values: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; the copies write only initialised f32 values through it, so the
    // slice stays initialised for its owner.
    unsafe { &mut *(values as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// What a copy does to each value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RowMap {
    Copy,
    Relu6,
    /// `clamp(v + bias, 0, 6)`: an expand convolution's epilogue.
    BiasRelu6(f32),
}

impl RowMap {
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Self::Copy => v,
            Self::Relu6 => v.clamp(0.0, 6.0),
            Self::BiasRelu6(b) => (v + b).clamp(0.0, 6.0),
        }
    }
}

/// The depthwise kernel's inner loops; the kernel is compiled once per implementation, and
/// every implementation gives the same bits.
pub(crate) trait PlaneLoops: Copy {
    /// `dst[j] = map(src[j · stride])` for every `j` of `dst`; `src` holds at least
    /// `(dst.len() − 1) · stride + 1` values. `dst` may be uninitialised: every value of it
    /// is written.
    fn copy(self, src: &[f32], stride: usize, dst: &mut [MaybeUninit<f32>], map: RowMap);

    /// `acc[p] = bias + Σ_t filter[t] · phases[starts[t] + p]` for every `p` of `acc` (a
    /// whole number of [`LANES`]), each product rounded, then added in tap order.
    fn taps(self, phases: &[f32], starts: &[usize], filter: &[f32], bias: f32, acc: &mut [f32]);
}

/// Runs of [`LANES`] positions the plain loop sums at once: independent chains of additions.
const PORTABLE_RUNS: usize = 4;

/// Plain loops, for any instruction set.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable;

impl PlaneLoops for Portable {
    #[inline(always)]
    fn taps(self, phases: &[f32], starts: &[usize], filter: &[f32], bias: f32, acc: &mut [f32]) {
        let len = acc.len();
        let mut groups = acc.chunks_exact_mut(PORTABLE_RUNS * LANES);
        for (i, group) in (&mut groups).enumerate() {
            group.copy_from_slice(&tap_sums::<{ PORTABLE_RUNS * LANES }>(phases, starts, filter, i * PORTABLE_RUNS * LANES, bias));
        }
        let done = len - groups.into_remainder().len();
        for (i, chunk) in acc[done..].chunks_exact_mut(LANES).enumerate() {
            chunk.copy_from_slice(&tap_sums::<LANES>(phases, starts, filter, done + i * LANES, bias));
        }
    }

    #[inline(always)]
    fn copy(self, src: &[f32], stride: usize, dst: &mut [MaybeUninit<f32>], map: RowMap) {
        assert!(dst.is_empty() || src.len() > (dst.len() - 1) * stride, "a row of {} at stride {stride} from {} values", dst.len(), src.len());
        if stride == 1 {
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(map.apply(s));
            }
        } else {
            for (j, d) in dst.iter_mut().enumerate() {
                d.write(map.apply(src[j * stride]));
            }
        }
    }
}

/// The sums of `N` wide positions from `base` on: the bias plus every tap's product, in
/// filter order.
#[inline(always)]
fn tap_sums<const N: usize>(phases: &[f32], starts: &[usize], filter: &[f32], base: usize, bias: f32) -> [f32; N] {
    let mut sums = [bias; N];
    for (&start, &wt) in starts.iter().zip(filter) {
        let src: &[f32; N] = phases[start + base..start + base + N].try_into().expect("N values");
        for (s, x) in sums.iter_mut().zip(src) {
            *s += wt * x;
        }
    }
    sums
}

/// AVX-512 vectors with masked tails. Only [`Avx512::new`] makes one, in code compiled for
/// AVX-512F and running on a CPU that has it.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512(());

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    /// # Safety
    /// The CPU must have AVX-512F.
    pub unsafe fn new() -> Self {
        Self(())
    }
}

#[cfg(target_arch = "x86_64")]
impl PlaneLoops for Avx512 {
    #[inline(always)]
    fn taps(self, phases: &[f32], starts: &[usize], filter: &[f32], bias: f32, acc: &mut [f32]) {
        assert!(acc.len().is_multiple_of(LANES) && starts.len() == filter.len());
        assert!(starts.iter().all(|&s| s + acc.len() <= phases.len()), "a tap reads past the phase planes");
        let mut base = 0;
        // SAFETY (each call): an `Avx512` exists only where the CPU has AVX-512F; the asserts
        // keep every load inside `phases` and every store inside `acc`.
        while base + 8 * LANES <= acc.len() {
            unsafe { tap_sums_avx512::<8>(phases, starts, filter, bias, base, acc) };
            base += 8 * LANES;
        }
        while base + 4 * LANES <= acc.len() {
            unsafe { tap_sums_avx512::<4>(phases, starts, filter, bias, base, acc) };
            base += 4 * LANES;
        }
        while base < acc.len() {
            unsafe { tap_sums_avx512::<1>(phases, starts, filter, bias, base, acc) };
            base += LANES;
        }
    }

    #[inline(always)]
    fn copy(self, src: &[f32], stride: usize, dst: &mut [MaybeUninit<f32>], map: RowMap) {
        match stride {
            // SAFETY: an `Avx512` exists only where the CPU has AVX-512F (see `new`).
            1 | 2 => unsafe { copy_avx512(src, stride, dst, map) },
            _ => Portable.copy(src, stride, dst, map),
        }
    }
}

/// The same operations as [`RowMap::apply`] in the same order, so the same bits: `max(0, v)`
/// then `min(6, ·)` with the value as the second operand (what `f32::clamp` compiles to).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn apply_avx512(v: std::arch::x86_64::__m512, map: RowMap) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: called only from code running where the CPU has AVX-512F.
    unsafe {
        let clamp = |v| _mm512_min_ps(_mm512_set1_ps(6.0), _mm512_max_ps(_mm512_setzero_ps(), v));
        match map {
            RowMap::Copy => v,
            RowMap::Relu6 => clamp(v),
            RowMap::BiasRelu6(b) => clamp(_mm512_add_ps(v, _mm512_set1_ps(b))),
        }
    }
}

/// `R` vectors of sums from wide position `base` on, kept in registers across the taps.
/// Multiply, then add (no fused multiply-add): the portable loop's rounding.
///
/// # Safety
/// AVX-512F; `phases[starts[t] + base..][..R · 16]` and `acc[base..][..R · 16]` in bounds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tap_sums_avx512<const R: usize>(phases: &[f32], starts: &[usize], filter: &[f32], bias: f32, base: usize, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    unsafe {
        let mut sums = [_mm512_set1_ps(bias); R];
        let p = phases.as_ptr().add(base);
        for (&start, &wt) in starts.iter().zip(filter) {
            let (w, q) = (_mm512_set1_ps(wt), p.add(start));
            for (r, sum) in sums.iter_mut().enumerate() {
                *sum = _mm512_add_ps(*sum, _mm512_mul_ps(w, _mm512_loadu_ps(q.add(r * LANES))));
            }
        }
        let a = acc.as_mut_ptr().add(base);
        for (r, sum) in sums.iter().enumerate() {
            _mm512_storeu_ps(a.add(r * LANES), *sum);
        }
    }
}

/// Lanes whose index is below `n` (at most 16).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn first_lanes(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn copy_avx512(src: &[f32], stride: usize, dst: &mut [MaybeUninit<f32>], map: RowMap) {
    use std::arch::x86_64::*;
    let n = dst.len();
    if n == 0 {
        return;
    }
    assert!(src.len() > (n - 1) * stride, "a row of {n} at stride {stride} from {} values", src.len());
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr().cast::<f32>());
    let mut j = 0;
    // SAFETY (every load and store below): full vectors only where all 16 (or 32) values
    // are inside the slices; the masked ones touch only the lanes inside them.
    unsafe {
        if stride == 1 {
            while j + 16 <= n {
                _mm512_storeu_ps(d.add(j), apply_avx512(_mm512_loadu_ps(s.add(j)), map));
                j += 16;
            }
            if j < n {
                let m = first_lanes(n - j);
                _mm512_mask_storeu_ps(d.add(j), m, apply_avx512(_mm512_maskz_loadu_ps(m, s.add(j)), map));
            }
        } else {
            // Even values of two vectors (32 source values) make one vector of outputs.
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            while j + 16 <= n && 2 * j + 32 <= src.len() {
                let (a, b) = (_mm512_loadu_ps(s.add(2 * j)), _mm512_loadu_ps(s.add(2 * j + 16)));
                _mm512_storeu_ps(d.add(j), apply_avx512(_mm512_permutex2var_ps(a, even, b), map));
                j += 16;
            }
            while j < n {
                let left = src.len() - 2 * j;
                let a = _mm512_maskz_loadu_ps(first_lanes(left), s.add(2 * j));
                let b = if left > 16 { _mm512_maskz_loadu_ps(first_lanes(left - 16), s.add(2 * j + 16)) } else { _mm512_setzero_ps() };
                let m = first_lanes(n - j);
                _mm512_mask_storeu_ps(d.add(j), m, apply_avx512(_mm512_permutex2var_ps(a, even, b), map));
                j += 16;
            }
        }
    }
}

use super::planes::LANES;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_copier_gives_the_portable_bits() {
        let src: Vec<f32> = (0..131).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).chain([f32::NAN, -0.0, 6.0, 0.0]).collect();
        for map in [RowMap::Copy, RowMap::Relu6, RowMap::BiasRelu6(0.75), RowMap::BiasRelu6(-0.0)] {
            for stride in [1usize, 2, 3] {
                for (start, len) in [(0usize, 0usize), (0, 1), (3, 7), (1, 14), (0, 16), (5, 17), (2, 33), (0, 56), (131 - 3, 4 / stride)] {
                    if len > 0 && start + (len - 1) * stride >= src.len() {
                        continue;
                    }
                    let portable = {
                        let mut dst = vec![9f32; len];
                        Portable.copy(&src[start..], stride, as_destination(&mut dst), map);
                        dst
                    };
                    #[cfg(target_arch = "x86_64")]
                    if std::is_x86_feature_detected!("avx512f") {
                        // A source cut right after the last value read: the masked loads
                        // must not need more.
                        let end = if len == 0 { start } else { start + (len - 1) * stride + 1 };
                        let mut dst = vec![9f32; len];
                        // SAFETY: the CPU has AVX-512F.
                        unsafe { Avx512::new() }.copy(&src[start..end], stride, as_destination(&mut dst), map);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&dst), bits(&portable), "{map:?} stride {stride} from {start}, {len} values");
                    }
                    assert!(portable.iter().zip(0..).all(|(v, j)| v.to_bits() == map.apply(src[start + j * stride]).to_bits()));
                }
            }
        }
    }
}
