//! The records the catalog store keeps, and their binary encoding (postcard).
//!
//! Records carry no version of their own: the store's format version (see
//! `shoplens_migrations`) says how every record is encoded. postcard writes a struct as its
//! fields in order with nothing between them, so a field may only be appended, together
//! with a migration step that appends its encoding to every old record.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ann::AnnParams;
use crate::geometry::BBox;
use crate::{Error, Result};

/// Id of one immutable revision of an item (its metadata, image and garments).
pub type ItemRev = u64;
/// Id of one garment record.
pub type GarmentId = u64;

/// blake3 hash of an item's image bytes: a changed image means re-embedding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({self})")
    }
}

/// What the shop says about an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ItemMetadata {
    pub sku: String,
    pub title: Option<String>,
    /// The catalog's own label (for example `T-Shirt`).
    pub label: Option<String>,
    /// The taxonomy category the label maps to (for example `top`).
    pub category: Option<String>,
    /// Where the image came from: a path relative to the catalog root.
    pub image: String,
    pub price: Option<f64>,
    pub currency: Option<String>,
    pub url: Option<String>,
    /// Free attributes of the catalog row (colour, brand, ...).
    pub attributes: BTreeMap<String, String>,
}

/// One immutable revision of an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemRecord {
    pub metadata: ItemMetadata,
    pub content_hash: ContentHash,
    /// The models that produced this revision's garments (`"detector"`, `"embedder"` → version).
    pub models: BTreeMap<String, String>,
    /// Length of every garment embedding of this revision.
    pub dim: u32,
    pub garments: Vec<GarmentId>,
    /// The image file this revision was read from, as the build found it (catalog root
    /// joined with [`ItemMetadata::image`]): what `/v1/items/{sku}/image` serves and what a
    /// serving snapshot is rebuilt from. `None` for revisions written before format 2; the
    /// next build records it.
    pub image_path: Option<String>,
}

/// A garment found in an item's image, with its embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GarmentRecord {
    pub item_rev: ItemRev,
    pub sku: String,
    pub bbox: BBox,
    pub category: String,
    /// Detector confidence; 1 for ground-truth boxes and whole-image fallbacks.
    pub score: f32,
    /// The embedding model's version.
    pub model_version: String,
    pub embedding: Vec<f32>,
}

/// A garment to store, before it has an id.
#[derive(Debug, Clone, PartialEq)]
pub struct NewGarment {
    pub bbox: BBox,
    pub category: String,
    pub score: f32,
    pub embedding: Vec<f32>,
}

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GenerationState {
    /// Being written by a build; invisible to readers.
    Building,
    /// The one readers see.
    Published,
    /// Was published, superseded since; kept for retention.
    Retired,
    /// Being pruned; invisible to readers, finished by the next prune.
    Removing,
}

/// What a build promises about every garment of its generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationSpec {
    /// Embedding length.
    pub dim: u32,
    /// Model name → version used for this generation.
    pub models: BTreeMap<String, String>,
}

/// The description of one generation, stored in the `generations` tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationManifest {
    pub id: u64,
    pub state: GenerationState,
    pub spec: GenerationSpec,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// RFC 3339, UTC; set on publish.
    pub built_at: Option<String>,
    pub items: u64,
    pub garments: u64,
    /// The ANN parameters the generation's graph was built with, so every reader loads
    /// the dump as written. `None`: written before format 2, with the defaults of its day.
    pub ann: Option<AnnParams>,
    /// The catalogs the generation was built from, as given to the build.
    pub catalogs: Vec<String>,
}

pub(crate) fn encode<T: Serialize>(tree: &'static str, key: &dyn fmt::Display, value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| Error::CorruptRecord { tree, key: key.to_string(), reason: format!("cannot encode: {e}") })
}

/// Decodes a record, naming the key on failure; trailing bytes count as damage.
pub(crate) fn decode<T: DeserializeOwned>(tree: &'static str, key: &dyn fmt::Display, bytes: &[u8]) -> Result<T> {
    let corrupt = |reason: String| Error::CorruptRecord { tree, key: key.to_string(), reason };
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| corrupt(format!("cannot decode: {e}")))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} unexpected trailing bytes", rest.len())));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garment_round_trips_and_truncation_is_an_error_naming_the_key() {
        let g = GarmentRecord {
            item_rev: 7,
            sku: "sku-1".into(),
            bbox: BBox::new(1.0, 2.0, 3.0, 4.0),
            category: "top".into(),
            score: 0.9,
            model_version: "m1".into(),
            embedding: vec![0.5; 16],
        };
        let bytes = encode("garments", &42, &g).unwrap();
        let back: GarmentRecord = decode("garments", &42, &bytes).unwrap();
        assert_eq!(back, g);
        let err = decode::<GarmentRecord>("garments", &42, &bytes[..bytes.len() - 3]).unwrap_err();
        assert!(err.to_string().contains("garments/42"), "{err}");
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode::<GarmentRecord>("garments", &42, &longer).is_err());
    }

    #[test]
    fn content_hash_is_hex_and_depends_on_bytes() {
        let a = ContentHash::of_bytes(b"a");
        assert_eq!(a.to_string().len(), 64);
        assert_ne!(a, ContentHash::of_bytes(b"b"));
    }
}
