//! Mapping a catalog's own labels (`T-Shirt`, `Outwear`) to taxonomy categories (`top`,
//! `outer`), so catalog items and detected garments share one category vocabulary.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Error, Result};

/// Catalog label → taxonomy category, compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    map: BTreeMap<String, String>,
}

impl Default for LabelMap {
    /// The labels of the CC0 clothing catalog mapped to the 13-class street taxonomy
    /// (`street2shop-ccp/taxonomy.json`).
    fn default() -> Self {
        let pairs = [
            ("t-shirt", "top"),
            ("longsleeve", "top"),
            ("shirt", "top"),
            ("polo", "top"),
            ("undershirt", "top"),
            ("hoodie", "top"),
            ("body", "top"),
            ("top", "top"),
            ("blouse", "top"),
            ("outwear", "outer"),
            ("blazer", "outer"),
            ("pants", "pants"),
            ("shorts", "shorts"),
            ("skirt", "skirt"),
            ("dress", "dress"),
            ("shoes", "footwear"),
            ("hat", "headwear"),
        ];
        Self { map: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }
}

impl LabelMap {
    /// Reads a JSON object `{"label": "category", ...}` that extends (and overrides) the
    /// default map.
    pub fn with_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let extra: BTreeMap<String, String> = serde_json::from_slice(&bytes).map_err(|e| Error::MalformedDataset {
            file: path.to_path_buf(),
            field: "(document)".into(),
            reason: format!("expected a JSON object of label → category: {e}"),
        })?;
        let mut map = Self::default();
        map.map.extend(extra.into_iter().map(|(k, v)| (k.to_lowercase(), v)));
        Ok(map)
    }

    /// The category of `label`; an unmapped label becomes its own category, lowercased, so
    /// nothing is silently dropped.
    pub fn category(&self, label: &str) -> String {
        let key = label.trim().to_lowercase();
        self.map.get(&key).cloned().unwrap_or(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_case_insensitively_and_keeps_unknown_labels() {
        let m = LabelMap::default();
        assert_eq!(m.category("T-Shirt"), "top");
        assert_eq!(m.category(" OUTWEAR "), "outer");
        assert_eq!(m.category("Kilt"), "kilt");
    }
}
