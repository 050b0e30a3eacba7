//! Integration tests of the engine, one module per area.

mod ann;
mod backbone;
mod compat;
mod datasets;
mod torch_import;
