//! Shop catalogs as the indexer reads them: CSV or JSONL files and DeepFashion2-format shop
//! folders, turned into [`CatalogEntry`] values. A bad row is reported with its line and
//! skipped; it never stops the rest.

pub mod files;
mod labels;
pub mod related;
mod sources;

pub use labels::LabelMap;
pub use sources::{CatalogEntry, CatalogSource, RowError, parse_csv, parse_jsonl, read_catalog};
