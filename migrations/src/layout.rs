//! The store's trees and key encodings, shared by the engine and the migration steps.
//!
//! Keys are big-endian so that sled's byte order is numeric order.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `format_version` | `u32` BE |
//! | `meta` | `published_generation` | `u64` BE: the generation readers see |
//! | `items` | item revision id `u64` BE | item record (sku, metadata, image hash, garment ids) |
//! | `garments` | garment id `u64` BE | garment record (item, box, category, score, embedding, model) |
//! | `generations` | generation id `u64` BE | generation manifest (state, counts, models, times) |
//! | `generation_items` | generation `u64` BE ++ sku bytes | item revision id `u64` BE |
//!
//! Item and garment records are immutable once written: a changed item gets a new revision,
//! so a published generation never changes under a reader.

pub const META_TREE: &str = "meta";
pub const ITEMS_TREE: &str = "items";
pub const GARMENTS_TREE: &str = "garments";
pub const GENERATIONS_TREE: &str = "generations";
pub const GENERATION_ITEMS_TREE: &str = "generation_items";

/// Every tree of the store, in the order [`crate::MigrationTx`] exposes them.
pub const ALL_TREES: [&str; 5] = [META_TREE, ITEMS_TREE, GARMENTS_TREE, GENERATIONS_TREE, GENERATION_ITEMS_TREE];

pub const FORMAT_VERSION_KEY: &[u8] = b"format_version";
pub const PUBLISHED_GENERATION_KEY: &[u8] = b"published_generation";

/// Key of a `u64`-addressed record (item revision, garment, generation).
pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// Decodes an [`id_key`]; `None` when the bytes are not 8 long.
pub fn decode_id(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Key of a generation's membership entry for one sku.
pub fn generation_item_key(generation: u64, sku: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + sku.len());
    key.extend_from_slice(&generation.to_be_bytes());
    key.extend_from_slice(sku.as_bytes());
    key
}

/// Splits a [`generation_item_key`] into its generation and sku.
pub fn decode_generation_item_key(key: &[u8]) -> Option<(u64, &str)> {
    if key.len() < 8 {
        return None;
    }
    let generation = decode_id(&key[..8])?;
    let sku = std::str::from_utf8(&key[8..]).ok()?;
    Some((generation, sku))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_item_keys_round_trip_and_sort_by_generation() {
        let a = generation_item_key(2, "zz");
        let b = generation_item_key(10, "aa");
        assert!(a < b, "generation must dominate the order");
        assert_eq!(decode_generation_item_key(&b), Some((10, "aa")));
        assert_eq!(decode_generation_item_key(&[1, 2, 3]), None);
    }
}
