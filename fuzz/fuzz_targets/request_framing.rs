//! The request-line follower of the searcher's connections. Input layout: one byte that
//! picks the piece size, then the connection's bytes. Whatever the bytes, it must not
//! panic, and cutting them into pieces must not change whether (or where) it refuses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoplens_searcher::framing::{Feed, RequestFraming};

/// The absolute offset where kept bytes end, if a line is refused.
fn refusal(bytes: &[u8], step: usize) -> Option<usize> {
    let mut framing = RequestFraming::new(64);
    let mut offset = 0;
    for piece in bytes.chunks(step) {
        if let Feed::TooLong { keep } = framing.feed(piece) {
            assert!(keep <= piece.len());
            return Some(offset + keep);
        }
        offset += piece.len();
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else { return };
    let whole = refusal(bytes, bytes.len().max(1));
    let pieces = refusal(bytes, usize::from(step % 32) + 1);
    // Piecewise, the refusal comes at the same line, only perhaps at a later piece
    // (the line's start was passed on already as a partial line).
    assert_eq!(whole.is_some(), pieces.is_some(), "{whole:?} vs {pieces:?}");
    if let (Some(whole), Some(pieces)) = (whole, pieces) {
        assert!(pieces >= whole, "{whole} vs {pieces}");
    }
});
