//! What the searcher serves: snapshots of published generations (see [`snapshot`]) and the
//! search engine over them ([`engine`]), with no HTTP in sight.

pub mod engine;
pub mod snapshot;
