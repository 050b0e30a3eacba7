//! DeepFashion2 retrieval ground truth: `query_gt.json` and `gallery_gt.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::geometry::BBox;
use crate::{Error, Result};

/// One consumer item to retrieve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryGt {
    pub query_image_id: u64,
    pub style: u32,
    pub cls: u32,
    pub pair_id: u64,
    pub bbox: [f32; 4],
}

/// One shop item of the gallery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GalleryGt {
    pub gallery_image_id: u64,
    pub style: u32,
    pub pair_id: u64,
    pub bbox: [f32; 4],
}

impl QueryGt {
    pub fn bbox(&self) -> BBox {
        BBox::new(self.bbox[0], self.bbox[1], self.bbox[2], self.bbox[3])
    }
}

impl GalleryGt {
    pub fn bbox(&self) -> BBox {
        BBox::new(self.bbox[0], self.bbox[1], self.bbox[2], self.bbox[3])
    }
}

fn read_list<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_list(&bytes, path)
}

/// Parses a ground-truth list held in memory; `path` names it in messages.
pub fn parse_list<T: for<'de> Deserialize<'de>>(bytes: &[u8], path: &Path) -> Result<Vec<T>> {
    let raw: Vec<serde_json::Value> = serde_json::from_slice(bytes).map_err(|e| Error::MalformedDataset {
        file: path.to_path_buf(),
        field: "(document)".into(),
        reason: format!("expected a JSON list: {e}"),
    })?;
    raw.into_iter()
        .enumerate()
        .map(|(i, v)| serde_json::from_value(v).map_err(|e| Error::MalformedDataset { file: path.to_path_buf(), field: format!("[{i}]"), reason: e.to_string() }))
        .collect()
}

/// Reads a `query_gt.json`.
pub fn read_query_gt(path: &Path) -> Result<Vec<QueryGt>> {
    read_list(path)
}

/// Reads a `gallery_gt.json`.
pub fn read_gallery_gt(path: &Path) -> Result<Vec<GalleryGt>> {
    read_list(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ground_truth_and_names_the_bad_entry() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("query_gt.json");
        std::fs::write(&good, r#"[{"query_image_id":1,"style":2,"cls":4,"pair_id":1,"bbox":[1,2,3,4]}]"#).unwrap();
        let q = read_query_gt(&good).unwrap();
        assert_eq!(q[0].bbox(), BBox::new(1.0, 2.0, 3.0, 4.0));
        let bad = dir.path().join("gallery_gt.json");
        std::fs::write(&bad, r#"[{"gallery_image_id":1,"style":2,"pair_id":1,"bbox":[1,2,3,4]},{"gallery_image_id":2,"style":1,"pair_id":1}]"#).unwrap();
        let err = read_gallery_gt(&bad).unwrap_err().to_string();
        assert!(err.contains("gallery_gt.json") && err.contains("`[1]`") && err.contains("bbox"), "{err}");
    }
}
