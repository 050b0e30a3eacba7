//! How weights are stored: our safetensors files with their configuration, the reader every
//! network loads its tensors through, and the import of the PyTorch checkpoints we start from.

pub mod tensors;
pub mod torch_import;
pub mod weights_file;
