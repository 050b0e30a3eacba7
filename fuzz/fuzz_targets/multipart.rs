//! The upload form reader of `/v1/search` (it replaced actix-multipart, which panicked on
//! a short boundary). Input layout: the Content-Type value, a newline, the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoplens_searcher::multipart::{boundary, is_form_data, photo_part};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (content_type, body) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let Ok(content_type) = std::str::from_utf8(content_type) else { return };
    let _ = is_form_data(content_type);
    let Ok(boundary) = boundary(content_type) else { return };
    assert!(!boundary.is_empty() && boundary.len() <= 70);
    if let Ok(part) = photo_part(body, &boundary) {
        // The photo lies inside the body and does not run into its closing boundary.
        assert!(part.start <= part.end && part.end <= body.len());
        let delimiter = [b"\r\n--", boundary.as_bytes()].concat();
        assert!(body[part.end..].starts_with(&delimiter));
        assert!(!body[part.clone()].windows(delimiter.len()).any(|w| w == delimiter.as_slice()));
    }
});
