//! The Shoplens engine: everything that finds shop items for a street photo, without HTTP,
//! CLI parsing or progress bars (those live in `indexer` and `searcher`).
//!
//! - [`store`]: the catalog store on sled: items, garments and published index generations.
//! - [`catalog`]: shop catalogs (CSV, JSONL, DeepFashion2 folders) as the indexer reads them.
//! - [`pipeline`]: the one path from pixels to garment embeddings (decode → garments →
//!   crops → embeddings) of indexing, serving and evaluation.
//! - [`indexing`]: building a generation from catalogs: incremental, resumable, atomic.
//! - [`ann`]: the garment index: HNSW (hnsw_rs) with an exact path and category filters.
//! - [`datasets`]: DeepFashion2-format folders, retrieval ground truth and a synthetic set.
//! - [`geometry`]: boxes and overlap, shared by datasets, detection and evaluation.
//! - [`device`]: the candle device (CPU, or CUDA with the `cuda` feature).
//! - [`vision`]: decoding with limits and the one preprocessing path of every network input.
//! - [`training`]: training the networks on DeepFashion2-format data.
//! - [`models`]: the networks in candle (EfficientNet-Lite backbone and its layers).

pub mod ann;
pub mod catalog;
pub mod datasets;
pub mod device;
pub mod durable;
pub mod error;
pub mod evaluation;
pub mod geometry;
pub mod indexing;
pub mod models;
pub mod pipeline;
pub mod progress;
pub mod serving;
pub mod store;
pub mod training;
pub mod vision;

pub use error::{Error, Result};
