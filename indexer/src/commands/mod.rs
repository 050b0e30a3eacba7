//! One module per subcommand.

pub mod ann;
pub mod build;
pub mod dataset;
pub mod detect;
pub mod eval;
pub mod serving;
pub mod status;
pub mod train;
pub mod weights;
