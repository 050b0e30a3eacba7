//! Images in: decoding with limits and orientation, and the one preprocessing path that
//! turns a photo or a garment crop into a network input, at index time and query time alike.

mod backdrop;
mod declared;
mod decode;
mod preprocess;
mod resize;

pub use backdrop::{foreground_objects, plain_backdrop, product_extent};
pub use decode::{DecodeLimits, decode_image};
pub use preprocess::{LetterboxGeometry, Normalisation, Preprocess, letterbox};
