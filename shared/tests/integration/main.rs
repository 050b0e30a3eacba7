//! Integration tests of the engine, one module per area.

mod ann;
mod backbone;
mod compat;
mod datasets;
mod detector;
mod embedder;
mod evaluation;
mod gpu;
mod indexing;
mod ranking;
mod torch_import;
