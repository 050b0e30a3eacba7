//! Catalog files as the indexer reads them: CSV and JSON lines. Every row is an entry or a
//! row error; an entry's image never resolves outside the catalog's folder.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use shoplens::catalog::{LabelMap, parse_csv, parse_jsonl};

fuzz_target!(|data: &[u8]| {
    let labels = LabelMap::default();
    let root = Path::new("catalog");
    let check = |entries: &[shoplens::catalog::CatalogEntry]| {
        for e in entries {
            let inside = e.image_path.strip_prefix(root).expect("image paths stay under the catalog root");
            assert!(inside.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)), "{:?}", e.image_path);
            assert!(!e.metadata.sku.is_empty());
        }
    };
    if let Ok((entries, _errors)) = parse_csv(data, &root.join("catalog.csv"), &labels) {
        check(&entries);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let (entries, _errors) = parse_jsonl(text, &root.join("catalog.jsonl"), &labels);
        check(&entries);
    }
});
