//! The engine's one error type. Each variant says what went wrong with the values that
//! matter, and [`Error::is_user_error`] says whose fault it is (4xx vs 5xx at the API).

use std::path::PathBuf;

/// Result alias of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- the caller's or the data's fault ----
    /// A DeepFashion2-format file (annotation, ground truth) does not follow the format.
    #[error("{}: field `{field}`: {reason}", file.display())]
    MalformedDataset { file: PathBuf, field: String, reason: String },
    /// A dataset folder lacks a part it must have.
    #[error("{}: {reason}", path.display())]
    InvalidDatasetLayout { path: PathBuf, reason: String },
    /// A query or garment vector has the wrong length.
    #[error("vector has {found} values, the index holds {expected}-d vectors")]
    DimensionMismatch { expected: usize, found: usize },
    /// A vector that cannot be compared (zero or not finite).
    #[error("vector {what} is not usable: {reason}")]
    InvalidVector { what: String, reason: String },
    /// `k` outside what a search accepts.
    #[error("k must be between 1 and {max}, got {k}")]
    InvalidK { k: usize, max: usize },
    /// A category filter naming no category of the index.
    #[error("unknown category {0:?}")]
    UnknownCategory(String),
    /// A request for something the store does not hold.
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// The store opens but no generation was ever published.
    #[error("the store has no published index generation yet: run `indexer build` first")]
    NoPublishedGeneration,
    /// Bytes that are not a decodable image (empty, truncated, corrupt).
    #[error("cannot decode the image: {reason}")]
    ImageDecode { reason: String },
    /// An image format Shoplens does not read.
    #[error("unsupported image format: {format}")]
    UnsupportedImageFormat { format: String },
    /// An image larger than the decode limits (decompression bombs included).
    #[error("image of {width}×{height} pixels exceeds the limit of {max_pixels} pixels")]
    ImageTooLarge { width: u32, height: u32, max_pixels: u64 },
    /// A file declaring far more pixels than its size can honestly hold (cost amplification:
    /// a few bytes that would cost seconds of CPU and hundreds of MB to decode).
    #[error("a {bytes}-byte file declaring {width}×{height} pixels is refused: {reason}")]
    DecodeBudget { width: u32, height: u32, bytes: usize, reason: String },
    /// A search stopped between stages because nobody waits for its answer any more (the
    /// caller's `cancelled` said so).
    #[error("the search was stopped after {stage}: nobody is waiting for its answer")]
    Cancelled { stage: &'static str },
    /// A box that selects nothing of its image.
    #[error("invalid box: {reason}")]
    InvalidBox { reason: String },
    /// Invalid configuration passed by the operator.
    #[error("invalid setting {name}: {reason}")]
    InvalidSetting { name: &'static str, reason: String },

    // ---- internal or environment ----
    /// The store cannot be brought to this build's format.
    #[error(transparent)]
    StoreFormat(#[from] shoplens_migrations::MigrationError),
    /// A record in the store cannot be decoded: damaged or hostile data.
    #[error("store record {tree}/{key} is damaged: {reason}")]
    CorruptRecord { tree: &'static str, key: String, reason: String },
    /// A store operation breaks the generation rules (a bug or a concurrent writer).
    #[error("index generation {generation}: {reason}")]
    GenerationConflict { generation: u64, reason: String },
    /// The on-disk ANN graph could not be read or written.
    #[error("ANN graph {}: {reason}", path.display())]
    AnnDump { path: PathBuf, reason: String },
    /// A serving snapshot could not be read or written.
    #[error("serving snapshot {}: {reason}", path.display())]
    Snapshot { path: PathBuf, reason: String },
    /// sled failed.
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A weights file that is missing, malformed or of another network.
    #[error("invalid weights: {reason}")]
    InvalidWeights { reason: String },
    /// candle failed (device, tensor shapes, weights).
    #[error("model runtime: {0}")]
    Candle(#[from] candle_core::Error),
    /// An image could not be encoded or written (datasets we generate).
    #[error("image {}: {source}", path.display())]
    ImageWrite {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
}

impl Error {
    /// True when the caller or their data is at fault (HTTP 4xx), false for internal
    /// failures (HTTP 5xx).
    /// Exhaustive, so that a new variant is classified on purpose.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::MalformedDataset { .. }
            | Error::InvalidDatasetLayout { .. }
            | Error::DimensionMismatch { .. }
            | Error::InvalidVector { .. }
            | Error::InvalidK { .. }
            | Error::UnknownCategory(_)
            | Error::NotFound { .. }
            | Error::InvalidSetting { .. }
            | Error::ImageDecode { .. }
            | Error::UnsupportedImageFormat { .. }
            | Error::ImageTooLarge { .. }
            | Error::DecodeBudget { .. }
            | Error::Cancelled { .. }
            | Error::InvalidBox { .. } => true,
            Error::NoPublishedGeneration
            | Error::StoreFormat(_)
            | Error::CorruptRecord { .. }
            | Error::GenerationConflict { .. }
            | Error::AnnDump { .. }
            | Error::Snapshot { .. }
            | Error::Storage(_)
            | Error::Io { .. }
            | Error::InvalidWeights { .. }
            | Error::Candle(_)
            | Error::ImageWrite { .. } => false,
        }
    }

    /// A stable machine-readable code, used by the API's `{"error":{"code"}}`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::MalformedDataset { .. } => "malformed_dataset",
            Error::InvalidDatasetLayout { .. } => "invalid_dataset_layout",
            Error::DimensionMismatch { .. } => "dimension_mismatch",
            Error::InvalidVector { .. } => "invalid_vector",
            Error::InvalidK { .. } => "invalid_k",
            Error::UnknownCategory(_) => "unknown_category",
            Error::NotFound { .. } => "not_found",
            Error::NoPublishedGeneration => "no_index",
            Error::InvalidSetting { .. } => "invalid_setting",
            Error::ImageDecode { .. } => "invalid_image",
            Error::UnsupportedImageFormat { .. } => "unsupported_image_format",
            Error::ImageTooLarge { .. } => "image_too_large",
            Error::DecodeBudget { .. } => "decode_budget",
            Error::Cancelled { .. } => "client_closed_request",
            Error::InvalidBox { .. } => "invalid_box",
            Error::InvalidWeights { .. } => "invalid_weights",
            Error::StoreFormat(_) => "store_format",
            Error::CorruptRecord { .. } => "corrupt_record",
            Error::GenerationConflict { .. } => "generation_conflict",
            Error::AnnDump { .. } => "ann_dump",
            Error::Snapshot { .. } => "snapshot",
            Error::Storage(_) => "storage",
            Error::Io { .. } => "io",
            Error::Candle(_) => "model_runtime",
            Error::ImageWrite { .. } => "image_write",
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
