//! What an image file says it will cost before a single pixel is decoded: the sizes in its
//! headers, read by hand where the decoders would allocate first and check later (a GIF's
//! logical screen and first frame, a WebP canvas).

/// The geometry a file declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Declared {
    pub width: u32,
    pub height: u32,
    /// Pixels of buffers the decoder fills besides the canvas (a GIF's first frame, which
    /// may be larger than the screen it is drawn on).
    pub extra_pixels: u64,
}

impl Declared {
    pub fn canvas(width: u32, height: u32) -> Self {
        Self { width, height, extra_pixels: 0 }
    }

    /// Pixels the decode touches: canvas and extra buffers.
    pub fn cost(&self) -> u64 {
        self.width as u64 * self.height as u64 + self.extra_pixels
    }
}

fn u16_le(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?) as u32)
}

fn u24_le(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 3)?;
    Some(b[0] as u32 | (b[1] as u32) << 8 | (b[2] as u32) << 16)
}

/// A GIF's logical screen and its first image descriptor. `None` when the bytes end
/// before either (the decoder then fails on its own, cheaply).
pub(super) fn gif(bytes: &[u8]) -> Option<Declared> {
    let (screen_w, screen_h) = (u16_le(bytes, 6)?, u16_le(bytes, 8)?);
    let packed = *bytes.get(10)?;
    let mut at = 13;
    if packed & 0x80 != 0 {
        at += 3 << ((packed & 7) + 1);
    }
    // Skip extensions (introducer, label, sub-blocks until a zero length) up to the
    // first image descriptor; every step moves forward, so the loop ends.
    loop {
        match *bytes.get(at)? {
            0x21 => {
                at += 2;
                loop {
                    let len = *bytes.get(at)? as usize;
                    at += 1 + len;
                    if len == 0 {
                        break;
                    }
                }
            }
            0x2C => {
                let (frame_w, frame_h) = (u16_le(bytes, at + 5)?, u16_le(bytes, at + 7)?);
                return Some(Declared { width: screen_w, height: screen_h, extra_pixels: frame_w as u64 * frame_h as u64 });
            }
            _ => return None,
        }
    }
}

/// A WebP's canvas: from `VP8X` (extended: animation, alpha), `VP8 ` (lossy) or `VP8L`
/// (lossless), whichever chunk comes first.
pub(super) fn webp(bytes: &[u8]) -> Option<Declared> {
    let chunk = bytes.get(12..16)?;
    let payload = 20;
    match chunk {
        b"VP8X" => Some(Declared::canvas(u24_le(bytes, payload + 4)? + 1, u24_le(bytes, payload + 7)? + 1)),
        b"VP8 " => Some(Declared::canvas(u16_le(bytes, payload + 6)? & 0x3FFF, u16_le(bytes, payload + 8)? & 0x3FFF)),
        b"VP8L" => {
            let bits = u32::from_le_bytes(bytes.get(payload + 1..payload + 5)?.try_into().ok()?);
            Some(Declared::canvas((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
        }
        _ => None,
    }
}

/// BigTIFF (`II+\0` / `MM\0+`): a real TIFF variant the decoder does not read.
pub(super) fn is_bigtiff(bytes: &[u8]) -> bool {
    matches!(bytes.get(..4), Some(b"II+\0" | b"MM\0+"))
}

/// HEIC/HEIF and AVIF (ISO-BMFF brands): the brand, when the bytes are one of them.
pub(super) fn heif_brand(bytes: &[u8]) -> Option<&[u8]> {
    let brand = bytes.get(8..12).filter(|_| bytes.get(4..8) == Some(b"ftyp"))?;
    [b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"].iter().any(|b| brand == *b).then_some(brand)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GIF header: screen `w`×`h`, no colour table, one extension, then a frame.
    fn gif_bytes(screen: (u16, u16), frame: (u16, u16)) -> Vec<u8> {
        let mut b = b"GIF89a".to_vec();
        b.extend_from_slice(&screen.0.to_le_bytes());
        b.extend_from_slice(&screen.1.to_le_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        b.extend_from_slice(&[0x21, 0xF9, 4, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0x2C, 0, 0, 0, 0]);
        b.extend_from_slice(&frame.0.to_le_bytes());
        b.extend_from_slice(&frame.1.to_le_bytes());
        b.push(0);
        b
    }

    #[test]
    fn a_gif_declares_its_screen_and_its_first_frame() {
        let d = gif(&gif_bytes((6000, 6000), (2, 3))).unwrap();
        assert_eq!(d, Declared { width: 6000, height: 6000, extra_pixels: 6 });
        let d = gif(&gif_bytes((10, 10), (65535, 65535))).unwrap();
        assert_eq!(d.cost(), 100 + 65535 * 65535);
        let cut = gif_bytes((10, 10), (1, 1));
        assert_eq!(gif(&cut[..20]), None);
    }

    #[test]
    fn a_webp_declares_its_canvas_in_each_chunk_kind() {
        let mut x = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\x10\0\0\0".to_vec();
        x.extend_from_slice(&[0x1F, 0x4E, 0x00, 0x0F, 0x27, 0x00]); // 20000 × 10000
        assert_eq!(webp(&x), Some(Declared::canvas(20_000, 10_000)));
        let mut lossy = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\0\0\0\x9d\x01\x2a".to_vec();
        lossy.extend_from_slice(&[0x40, 0x01, 0xF0, 0x00]); // 320 × 240
        assert_eq!(webp(&lossy), Some(Declared::canvas(320, 240)));
        let mut lossless = b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x2f".to_vec();
        lossless.extend_from_slice(&((99u32) | (49u32 << 14)).to_le_bytes());
        assert_eq!(webp(&lossless), Some(Declared::canvas(100, 50)));
        assert_eq!(webp(b"RIFF\0\0\0\0WEBPVP8X"), None);
    }

    #[test]
    fn bigtiff_and_heif_are_recognised() {
        assert!(is_bigtiff(b"II+\0\x08\0\0\0"));
        assert!(is_bigtiff(b"MM\0+\0\x08\0\0"));
        assert!(!is_bigtiff(b"II*\0\x08\0\0\0"));
        assert_eq!(heif_brand(b"\0\0\0\x18ftypheic\0\0\0\0"), Some(&b"heic"[..]));
        assert_eq!(heif_brand(b"\0\0\0\x18ftypisom\0\0\0\0"), None);
    }
}
