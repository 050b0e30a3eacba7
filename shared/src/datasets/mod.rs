//! DeepFashion2-format data: annotation folders, retrieval ground truth, and a synthetic
//! set generated for tests.
//!
//! The format (DeepFashion2, arXiv 1901.07973): a folder with `image/NNNNNN.jpg` and
//! `annos/NNNNNN.json`; each annotation has `source`, `pair_id` and `item1..itemN`.
//! A consumer item and a shop item match when they share `pair_id` and `style` (style 0
//! items are never matched).

mod deepfashion2;
mod retrieval_gt;
pub mod synth;

pub use deepfashion2::{Df2Annotation, Df2Folder, Df2Image, Df2Item, Source};
pub use retrieval_gt::{GalleryGt, QueryGt, parse_list, read_gallery_gt, read_query_gt};
