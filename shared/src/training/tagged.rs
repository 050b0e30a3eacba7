//! Tagged street photos without boxes (`ccp-unlabelled`: `image/NNNNNN.jpg` and
//! `tags.json`, `{"NNNNNN": {"classes": [taxonomy names], ...}}`): which garment classes
//! each photo shows, not where. Both trainings turn them into pseudo-labels: the
//! detector's boxes, kept only where the tags confirm their class.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// A tagged photo: its file and the taxonomy classes it shows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TaggedPhoto {
    pub id: String,
    pub image: PathBuf,
    pub classes: Vec<String>,
}

/// The tags file's bytes (a cache key of what was derived from them) and its photos, by id.
pub(crate) fn read_tagged(folder: &Path) -> Result<(Vec<u8>, Vec<TaggedPhoto>)> {
    #[derive(Deserialize)]
    struct Tags {
        classes: Vec<String>,
    }
    let tags_path = folder.join("tags.json");
    let bytes = std::fs::read(&tags_path).map_err(|e| Error::io(&tags_path, e))?;
    let tags: BTreeMap<String, Tags> =
        serde_json::from_slice(&bytes).map_err(|e| Error::MalformedDataset { file: tags_path.clone(), field: "(document)".into(), reason: e.to_string() })?;
    let photos = tags.into_iter().map(|(id, t)| TaggedPhoto { image: folder.join("image").join(format!("{id}.jpg")), id, classes: t.classes }).collect();
    Ok((bytes, photos))
}
