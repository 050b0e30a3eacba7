//! One generation's garment embeddings as a flat matrix.

use std::collections::BTreeMap;

use crate::store::{GarmentId, GenerationGarments};
use crate::{Error, Result};

/// Garment embeddings, L2-normalised, row-major, with ids and categories per row.
#[derive(Debug, Clone, PartialEq)]
pub struct GarmentVectors {
    dim: usize,
    ids: Vec<GarmentId>,
    categories: Vec<u16>,
    category_names: Vec<String>,
    data: Vec<f32>,
}

/// Scales `v` to unit length; `None` when it has no direction or a non-finite value.
pub(crate) fn normalise(v: &mut [f32]) -> Option<()> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !norm.is_finite() || norm < 1e-12 {
        return None;
    }
    v.iter_mut().for_each(|x| *x /= norm);
    Some(())
}

impl GarmentVectors {
    /// An empty matrix of `dim`-d vectors.
    pub fn new(dim: usize) -> Self {
        Self { dim, ids: Vec::new(), categories: Vec::new(), category_names: Vec::new(), data: Vec::new() }
    }

    /// Appends one garment, normalising its embedding.
    pub fn push(&mut self, id: GarmentId, category: &str, embedding: &[f32]) -> Result<()> {
        if embedding.len() != self.dim {
            return Err(Error::DimensionMismatch { expected: self.dim, found: embedding.len() });
        }
        let start = self.data.len();
        self.data.extend_from_slice(embedding);
        if normalise(&mut self.data[start..]).is_none() {
            self.data.truncate(start);
            return Err(Error::InvalidVector { what: format!("of garment {id}"), reason: "zero length or not finite".into() });
        }
        let category = match self.category_names.iter().position(|c| c == category) {
            Some(at) => at,
            None => {
                self.category_names.push(category.to_string());
                self.category_names.len() - 1
            }
        };
        self.ids.push(id);
        self.categories.push(category as u16);
        Ok(())
    }

    /// The vectors of a generation read from the store.
    pub fn from_generation(generation: &GenerationGarments) -> Result<Self> {
        let mut vectors = Self::new(generation.manifest.spec.dim as usize);
        for (id, garment) in &generation.garments {
            vectors.push(*id, &garment.category, &garment.embedding)?;
        }
        Ok(vectors)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The normalised vector of `row`.
    pub fn row(&self, row: usize) -> &[f32] {
        &self.data[row * self.dim..(row + 1) * self.dim]
    }

    /// The garment id of `row`.
    pub fn id(&self, row: usize) -> GarmentId {
        self.ids[row]
    }

    pub fn ids(&self) -> &[GarmentId] {
        &self.ids
    }

    /// The category name of `row`.
    pub fn category(&self, row: usize) -> &str {
        &self.category_names[self.categories[row] as usize]
    }

    /// Rows of each category, ascending.
    pub fn rows_by_category(&self) -> BTreeMap<String, Vec<u32>> {
        let mut by: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (row, &c) in self.categories.iter().enumerate() {
            by.entry(self.category_names[c as usize].clone()).or_default().push(row as u32);
        }
        by
    }

    /// The whole matrix, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// A fingerprint of which garments the matrix holds, in which order: garment records are
    /// immutable and ids never reused, so equal fingerprints mean equal contents.
    pub fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&(self.dim as u64).to_le_bytes());
        for id in &self.ids {
            h.update(&id.to_le_bytes());
        }
        h.finalize().to_hex().to_string()
    }
}
