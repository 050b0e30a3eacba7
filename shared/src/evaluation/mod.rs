//! Measuring Shoplens the way DeepFashion2 does, so our numbers compare with the paper's.

pub mod detection;
pub mod relevance;
pub mod retrieval;
