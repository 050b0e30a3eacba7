//! Integration tests of the engine, one module per area.

mod ann;
mod compat;
mod datasets;
