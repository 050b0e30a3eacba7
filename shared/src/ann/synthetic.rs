//! Clustered synthetic unit vectors, seeded: the data of the ANN tests and benchmarks.
//!
//! Real embeddings cluster (garments of one kind lie together), and uniform random vectors in
//! high dimension have no neighbour structure at all, so recall is measured on clusters:
//! a point is a random centre plus N(0, (spread/√d)²) per dimension, normalised.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::GarmentVectors;

/// `n` vectors around `centres` random centres (spread 0.7). Row i has garment id
/// `1000 + i` and category `cat{i % categories}`.
pub fn clustered(n: usize, dim: usize, centres: usize, categories: usize, seed: u64) -> GarmentVectors {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centre_vecs: Vec<Vec<f32>> = (0..centres.max(1)).map(|_| unit(&mut rng, dim)).collect();
    let mut vectors = GarmentVectors::new(dim);
    for i in 0..n {
        let c = rng.random_range(0..centre_vecs.len());
        let v = near(&mut rng, &centre_vecs[c], 0.7);
        vectors.push(1000 + i as u64, &format!("cat{}", i % categories.max(1)), &v).expect("synthetic vectors are finite and non-zero");
    }
    vectors
}

/// `n` queries, each near a row of `vectors` (spread 0.5), so their neighbourhoods are
/// meaningful.
pub fn queries_near(vectors: &GarmentVectors, n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let row = rng.random_range(0..vectors.len());
            near(&mut rng, vectors.row(row), 0.5)
        })
        .collect()
}

/// A uniformly random unit vector.
pub fn unit(rng: &mut ChaCha8Rng, dim: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..dim).map(|_| gaussian(rng)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn near(rng: &mut ChaCha8Rng, centre: &[f32], spread: f32) -> Vec<f32> {
    let sigma = spread / (centre.len() as f32).sqrt();
    centre.iter().map(|c| c + sigma * gaussian(rng)).collect()
}

/// A standard normal sample (Box-Muller).
fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}
