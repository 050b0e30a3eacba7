//! Helpers shared by the integration tests.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoplens::ann::GarmentVectors;

/// `n` unit vectors around `centres` random unit centres: centre + N(0, (spread/√d)²) per
/// dimension, normalised. Row i has garment id `1000 + i` and category `cat{i % categories}`.
pub fn clustered(n: usize, dim: usize, centres: usize, categories: usize, seed: u64) -> GarmentVectors {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centre_vecs: Vec<Vec<f32>> = (0..centres).map(|_| unit(&mut rng, dim)).collect();
    let mut vectors = GarmentVectors::new(dim);
    for i in 0..n {
        let c = rng.random_range(0..centres);
        let v = near(&mut rng, &centre_vecs[c], 0.7);
        vectors.push(1000 + i as u64, &format!("cat{}", i % categories), &v).unwrap();
    }
    vectors
}

/// Queries from the same distribution as [`clustered`] (not in the index).
pub fn queries(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| unit(&mut rng, dim)).collect()
}

pub fn near(rng: &mut ChaCha8Rng, centre: &[f32], spread: f32) -> Vec<f32> {
    let sigma = spread / (centre.len() as f32).sqrt();
    centre.iter().map(|c| c + sigma * gaussian(rng)).collect()
}

pub fn unit(rng: &mut ChaCha8Rng, dim: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..dim).map(|_| gaussian(rng)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    // Box-Muller.
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}
