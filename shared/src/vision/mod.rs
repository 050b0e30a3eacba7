//! Images in: decoding with limits and orientation, and the one preprocessing path that
//! turns a photo or a garment crop into a network input, at index time and query time alike.

mod declared;
mod decode;
mod preprocess;
mod resize;

pub use decode::{DecodeLimits, decode_image};
pub use preprocess::{LetterboxGeometry, Normalisation, Preprocess, letterbox};
