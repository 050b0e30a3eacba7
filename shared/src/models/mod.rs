//! Neural networks in candle, one file per family (see `../../STYLE` habits): the
//! EfficientNet-Lite backbone and the layers it is made of.

pub mod depthwise;
pub mod efficientnet_lite;
pub mod detector;
pub mod embedder;
pub mod epilogue;
pub mod layers;
mod planes;
pub mod torch_import;
pub mod weights_file;
