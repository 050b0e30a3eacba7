//! Plain backdrops: a packshot shows its garment alone on a flat colour, and there the
//! garment's extent is in the pixels themselves, sharper than any detector's box.
//!
//! Shops photograph products on white or on a plain colour; the DeepFashion2-style shop
//! folders cut each garment out onto white. On such a photo the detector, which learnt
//! garments in context, can split one garment into parts or miss it, while the pixels that
//! differ from the backdrop frame it exactly (on the validation cut-outs their extent is
//! the annotated box). This module only finds the product on a plain backdrop (the objects
//! standing on it, and their joint extent); whether the product is one garment is for the
//! networks to say (`models::fusion`).
//!
//! Measured on the data we have (`benches/NOTES.md`, 2026-12-05, seventh session): every
//! validation shop cut-out has a plain border at the thresholds below, no street photo
//! does (0 of 300 labelled, 0 of 300 unlabelled), and 1.75 % of the CC0 catalog photos do.

use image::RgbImage;

use crate::geometry::BBox;

/// A pixel within this of the backdrop colour in every channel is backdrop (JPEG ringing
/// and a slightly uneven white stay under it).
const TOLERANCE: u8 = 24;
/// The share of border pixels that must be backdrop for the photo to have a plain one.
const PLAIN_BORDER_SHARE: f32 = 0.97;
/// The grid the foreground is grouped on: this many cells along the longer side.
const GRID_CELLS: u32 = 64;
/// Foreground cells this many cells apart (in either direction) belong to one object:
/// the two shoes of a pair, a bag and its strap, a garment's parts across a thin gap.
const JOIN_CELLS: i64 = 2;
/// An object smaller than this share of the photo is a speck or a stain, not a garment.
const MIN_OBJECT_SHARE: f32 = 0.002;

/// The backdrop colour of `image` when its border is plain: the per-channel median of the
/// border pixels, provided [`PLAIN_BORDER_SHARE`] of them lie within [`TOLERANCE`] of it.
pub fn plain_backdrop(image: &RgbImage) -> Option<[u8; 3]> {
    let (w, h) = image.dimensions();
    if w < 3 || h < 3 {
        return None;
    }
    let border: Vec<[u8; 3]> = (0..w).flat_map(|x| [(x, 0), (x, h - 1)]).chain((1..h - 1).flat_map(|y| [(0, y), (w - 1, y)])).map(|(x, y)| image.get_pixel(x, y).0).collect();
    let colour = [0, 1, 2].map(|c| {
        let mut channel: Vec<u8> = border.iter().map(|p| p[c]).collect();
        let mid = channel.len() / 2;
        *channel.select_nth_unstable(mid).1
    });
    let plain = border.iter().filter(|p| is_backdrop(p, &colour)).count();
    (plain as f32 >= PLAIN_BORDER_SHARE * border.len() as f32).then_some(colour)
}

fn is_backdrop(pixel: &[u8; 3], colour: &[u8; 3]) -> bool {
    pixel.iter().zip(colour).all(|(p, c)| p.abs_diff(*c) <= TOLERANCE)
}

/// The extents of the separate objects standing on the backdrop `colour`, largest first:
/// foreground pixels grouped on a coarse grid, cells within [`JOIN_CELLS`] of each other
/// in one object, specks dropped. Each extent is exact to the pixel.
pub fn foreground_objects(image: &RgbImage, colour: [u8; 3]) -> Vec<BBox> {
    let grid = ForegroundGrid::of(image, colour);
    let mut seen = vec![false; grid.cells.len()];
    let mut objects: Vec<(u64, Extent)> = Vec::new();
    for start in 0..grid.cells.len() {
        if seen[start] || grid.cells[start].pixels == 0 {
            continue;
        }
        seen[start] = true;
        let (mut pixels, mut extent, mut stack) = (0u64, grid.cells[start].extent, vec![start]);
        while let Some(i) = stack.pop() {
            pixels += grid.cells[i].pixels;
            extent = union(extent, grid.cells[i].extent);
            for j in grid.near(i) {
                if !seen[j] && grid.cells[j].pixels > 0 {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        objects.push((pixels, extent));
    }
    let min_pixels = MIN_OBJECT_SHARE * (image.width() * image.height()) as f32;
    objects.retain(|(pixels, _)| *pixels as f32 >= min_pixels);
    objects.sort_by_key(|o| std::cmp::Reverse(o.0));
    objects.into_iter().map(|(_, [x1, y1, x2, y2])| BBox::new(x1 as f32, y1 as f32, x2 as f32 + 1.0, y2 as f32 + 1.0)).collect()
}

/// The extent of everything standing on a plain backdrop: a packshot's product, which may
/// lie in pieces (the two shoes of a pair set apart, a garment cut out around what hid
/// part of it); specks dropped. `None` when the backdrop is not plain or holds nothing.
pub fn product_extent(image: &RgbImage) -> Option<BBox> {
    let colour = plain_backdrop(image)?;
    foreground_objects(image, colour).into_iter().reduce(|a, b| BBox::new(a.x1.min(b.x1), a.y1.min(b.y1), a.x2.max(b.x2), a.y2.max(b.y2)))
}

/// Inclusive pixel extent `[x1, y1, x2, y2]`.
type Extent = [u32; 4];

fn union(a: Extent, b: Extent) -> Extent {
    [a[0].min(b[0]), a[1].min(b[1]), a[2].max(b[2]), a[3].max(b[3])]
}

#[derive(Clone, Copy)]
struct Cell {
    /// Foreground pixels in the cell.
    pixels: u64,
    /// Their extent (meaningless while `pixels` is 0).
    extent: Extent,
}

/// The foreground of a photo counted per grid cell.
struct ForegroundGrid {
    cols: usize,
    rows: usize,
    cells: Vec<Cell>,
}

impl ForegroundGrid {
    fn of(image: &RgbImage, colour: [u8; 3]) -> Self {
        let (w, h) = image.dimensions();
        let side = w.max(h).div_ceil(GRID_CELLS).max(1);
        let (cols, rows) = (w.div_ceil(side) as usize, h.div_ceil(side) as usize);
        let mut cells = vec![Cell { pixels: 0, extent: [u32::MAX, u32::MAX, 0, 0] }; cols * rows];
        for (x, y, p) in image.enumerate_pixels() {
            if is_backdrop(&p.0, &colour) {
                continue;
            }
            let cell = &mut cells[(y / side) as usize * cols + (x / side) as usize];
            cell.pixels += 1;
            cell.extent = union(cell.extent, [x, y, x, y]);
        }
        Self { cols, rows, cells }
    }

    /// The cells within [`JOIN_CELLS`] of cell `i` (itself excluded).
    fn near(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let (col, row) = ((i % self.cols) as i64, (i / self.cols) as i64);
        (-JOIN_CELLS..=JOIN_CELLS).flat_map(move |dy| (-JOIN_CELLS..=JOIN_CELLS).map(move |dx| (col + dx, row + dy))).filter_map(move |(c, r)| {
            let inside = c >= 0 && r >= 0 && c < self.cols as i64 && r < self.rows as i64 && (c, r) != (col, row);
            inside.then(|| r as usize * self.cols + c as usize)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

    fn canvas(w: u32, h: u32, colour: Rgb<u8>) -> RgbImage {
        RgbImage::from_pixel(w, h, colour)
    }

    fn paint(image: &mut RgbImage, [x1, y1, x2, y2]: [u32; 4], colour: Rgb<u8>) {
        for y in y1..y2 {
            for x in x1..x2 {
                image.put_pixel(x, y, colour);
            }
        }
    }

    #[test]
    fn a_garment_on_white_is_one_object_framed_to_the_pixel() {
        let mut image = canvas(200, 300, WHITE);
        paint(&mut image, [40, 30, 150, 260], Rgb([30, 60, 120]));
        // A nearly white lining inside does not break it apart.
        paint(&mut image, [60, 50, 120, 100], Rgb([250, 250, 250]));
        assert_eq!(plain_backdrop(&image), Some([255, 255, 255]));
        assert_eq!(product_extent(&image), Some(BBox::new(40.0, 30.0, 150.0, 260.0)));
    }

    #[test]
    fn a_pair_of_shoes_with_a_gap_is_one_object_and_a_product_spans_all_its_objects() {
        let mut image = canvas(320, 200, Rgb([236, 228, 220]));
        let leather = Rgb([90, 40, 20]);
        paint(&mut image, [40, 80, 110, 140], leather);
        paint(&mut image, [116, 80, 186, 140], leather);
        let backdrop = plain_backdrop(&image).unwrap();
        assert_eq!(foreground_objects(&image, backdrop), vec![BBox::new(40.0, 80.0, 186.0, 140.0)], "a 6-pixel gap at 5 pixels a cell");
        paint(&mut image, [250, 20, 300, 180], leather);
        assert_eq!(foreground_objects(&image, backdrop).len(), 2);
        assert_eq!(product_extent(&image), Some(BBox::new(40.0, 20.0, 300.0, 180.0)), "whether that is one garment is the networks' call");
    }

    #[test]
    fn specks_are_not_objects_and_a_busy_border_is_not_a_backdrop() {
        let mut image = canvas(200, 200, WHITE);
        paint(&mut image, [50, 50, 150, 150], Rgb([200, 20, 20]));
        paint(&mut image, [5, 190, 7, 192], Rgb([0, 0, 0]));
        assert_eq!(product_extent(&image), Some(BBox::new(50.0, 50.0, 150.0, 150.0)));
        // A street photo: the border is anything but one colour.
        let street = RgbImage::from_fn(200, 200, |x, y| Rgb([(x * 7 % 256) as u8, (y * 13 % 256) as u8, ((x + y) % 256) as u8]));
        assert_eq!(plain_backdrop(&street), None);
        // A garment filling the photo to its edges leaves no backdrop to see.
        let mut filled = canvas(100, 100, WHITE);
        paint(&mut filled, [0, 0, 100, 100], Rgb([10, 10, 10]));
        paint(&mut filled, [0, 0, 100, 10], WHITE);
        assert_eq!(product_extent(&filled), None);
        // Nothing but backdrop: no product.
        assert_eq!(product_extent(&canvas(50, 50, WHITE)), None);
    }
}
