//! The `multipart/form-data` reader (RFC 7578 over RFC 2046 §5.1) for uploads. The whole
//! body is already in memory (read under the upload limits), so the parser is a pure
//! function over bytes: it finds the photo's part and returns where its content lies. It
//! cannot panic: every index goes through `get`, and a body that does not follow the
//! format is an error that says where it went wrong. It replaces actix-multipart 0.7.2,
//! which panicked a worker on a 1–3 character boundary after a short line.

use std::ops::Range;

use memchr::memmem;

/// A form that cannot be read, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipartError(pub String);

impl std::fmt::Display for MultipartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail<T>(reason: impl Into<String>) -> Result<T, MultipartError> {
    Err(MultipartError(reason.into()))
}

/// Longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;
/// Longest header block of one part; a photo's part needs a few hundred bytes.
const MAX_PART_HEADERS: usize = 16 * 1024;
/// Parts looked at before giving up on finding the photo.
const MAX_PARTS: usize = 64;
/// Field names taken as the photo when the part carries no file name.
const PHOTO_FIELDS: [&str; 3] = ["image", "file", "photo"];

/// True when `content_type` is `multipart/form-data` (media types compare
/// case-insensitively, RFC 9110 §8.3.1).
pub fn is_form_data(content_type: &str) -> bool {
    media_type(content_type).eq_ignore_ascii_case("multipart/form-data")
}

fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// The `boundary` parameter of a `Content-Type` value, unquoted.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    for param in content_type.split(';').skip(1) {
        let Some((name, value)) = param.split_once('=') else { continue };
        if !name.trim().eq_ignore_ascii_case("boundary") {
            continue;
        }
        let value = value.trim();
        let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
        if value.is_empty() || value.len() > MAX_BOUNDARY || value.bytes().any(|b| b.is_ascii_control()) {
            return fail(format!("the multipart boundary must be 1 to {MAX_BOUNDARY} printable characters"));
        }
        return Ok(value.to_string());
    }
    fail("a multipart/form-data upload needs a boundary parameter in its Content-Type")
}

/// Where the photo's content lies in `body`: the first part with a file name, or the
/// first one named `image`, `file` or `photo`.
pub fn photo_part(body: &[u8], boundary: &str) -> Result<Range<usize>, MultipartError> {
    let delimiter = [b"\r\n--", boundary.as_bytes()].concat();
    // The first delimiter may open the body (no preamble) or follow a preamble's CRLF.
    let mut at = if body.starts_with(&delimiter[2..]) {
        delimiter.len() - 2
    } else {
        match memmem::find(body, &delimiter) {
            Some(p) => p + delimiter.len(),
            None => return fail("the body holds no multipart boundary line (each boundary line is \"--\" and the boundary, after a CRLF)"),
        }
    };
    for _ in 0..MAX_PARTS {
        let rest = body.get(at..).unwrap_or_default();
        if rest.starts_with(b"--") {
            return fail("the form has no photo: send it as a file field named image");
        }
        let headers_start = at + after_delimiter_line(rest)?;
        let (headers, content_start) = part_headers(body, headers_start)?;
        let content_end = match memmem::find(body.get(content_start..).unwrap_or_default(), &delimiter) {
            Some(p) => content_start + p,
            None => return fail("the form ends inside a part: its closing boundary is missing"),
        };
        if is_photo(headers) {
            return Ok(content_start..content_end);
        }
        at = content_end + delimiter.len();
    }
    fail(format!("no photo among the first {MAX_PARTS} parts of the form"))
}

/// Bytes from just after a boundary to the part's headers: optional transport padding
/// (spaces, tabs) and a CRLF.
fn after_delimiter_line(rest: &[u8]) -> Result<usize, MultipartError> {
    let padding = rest.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    match rest.get(padding..padding + 2) {
        Some(b"\r\n") => Ok(padding + 2),
        _ => fail("a boundary line must end with CRLF"),
    }
}

/// The part's header block (without its blank line) and where its content starts.
fn part_headers(body: &[u8], start: usize) -> Result<(&[u8], usize), MultipartError> {
    let rest = body.get(start..).unwrap_or_default();
    if rest.starts_with(b"\r\n") {
        return Ok((&[], start + 2));
    }
    let window = &rest[..rest.len().min(MAX_PART_HEADERS)];
    match memmem::find(window, b"\r\n\r\n") {
        Some(end) => Ok((&rest[..end], start + end + 4)),
        None if rest.len() > MAX_PART_HEADERS => fail(format!("a part's headers are over {MAX_PART_HEADERS} bytes")),
        None => fail("a part's headers do not end with a blank line"),
    }
}

/// Whether a part's `Content-Disposition` makes it the photo.
fn is_photo(headers: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(headers) else { return false };
    text.split("\r\n").filter_map(|line| line.split_once(':')).filter(|(name, _)| name.trim().eq_ignore_ascii_case("content-disposition")).any(|(_, value)| {
        let mut params = value.split(';').skip(1).filter_map(|p| p.split_once('=')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().trim_matches('"')));
        params.any(|(key, value)| key == "filename" || key == "filename*" || (key == "name" && PHOTO_FIELDS.contains(&value)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (disposition, content) in parts {
            body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\nContent-Type: image/jpeg\r\n\r\n").as_bytes());
            body.extend_from_slice(content);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        body
    }

    #[test]
    fn finds_the_photo_part_among_others() {
        let body = form("XyZ", &[("name=\"note\"", b"hello"), ("name=\"upload\"; filename=\"a.jpg\"", b"\xFF\xD8photo\r\n--Xy\xFF\xD9")]);
        let range = photo_part(&body, "XyZ").unwrap();
        assert_eq!(&body[range], b"\xFF\xD8photo\r\n--Xy\xFF\xD9");
        let named = form("b", &[("name=\"image\"", b"pixels")]);
        assert_eq!(&named[photo_part(&named, "b").unwrap()], b"pixels");
        let mut preamble = b"ignored preamble\r\n".to_vec();
        preamble.extend_from_slice(&named);
        assert_eq!(&preamble[photo_part(&preamble, "b").unwrap()], b"pixels");
    }

    #[test]
    fn the_content_type_gives_the_boundary_whatever_the_case() {
        assert!(is_form_data("MULTIPART/FORM-DATA; boundary=x"));
        assert!(!is_form_data("image/jpeg"));
        assert_eq!(boundary("multipart/form-data; BOUNDARY=\"a b\"").unwrap(), "a b");
        assert_eq!(boundary("multipart/form-data; charset=utf-8; boundary=----W").unwrap(), "----W");
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))).is_err());
    }

    #[test]
    fn broken_forms_are_errors_not_panics() {
        // The request that panicked actix-multipart 0.7.2.
        assert!(photo_part(b"\n--C--\r\n", "C").is_err());
        for body in [&b""[..], b"--C", b"--C\r\n", b"--C\r\nContent-Disposition: form-data; name=image\r\n\r\npix", b"--C--\r\n", b"--Cx\r\n\r\n\r\n--C--"] {
            assert!(photo_part(body, "C").is_err(), "{:?}", String::from_utf8_lossy(body));
        }
        let no_photo = form("C", &[("name=\"note\"", b"text")]);
        assert!(photo_part(&no_photo, "C").unwrap_err().0.contains("no photo"));
        // Every prefix of a valid form is refused or read, never a panic.
        let body = form("C", &[("name=\"image\"; filename=\"x\"", b"abc")]);
        for end in 0..body.len() {
            let _ = photo_part(&body[..end], "C");
        }
    }
}
