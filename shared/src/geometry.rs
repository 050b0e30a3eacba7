//! Axis-aligned boxes in pixel-edge coordinates, as DeepFashion2 writes them: a box
//! `[x1, y1, x2, y2]` covers columns `x1..x2` and rows `y1..y2`, so `width = x2 - x1`.

use serde::{Deserialize, Serialize};

/// A box `[x1, y1, x2, y2]` in pixels of its image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BBox {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
}

impl BBox {
    pub const fn new(x1: f32, y1: f32, x2: f32, y2: f32) -> Self {
        Self { x1, y1, x2, y2 }
    }

    /// The box of `[x1, y1, x2, y2]`.
    pub const fn from_array([x1, y1, x2, y2]: [f32; 4]) -> Self {
        Self { x1, y1, x2, y2 }
    }

    /// The box as `[x1, y1, x2, y2]`.
    pub fn to_array(self) -> [f32; 4] {
        [self.x1, self.y1, self.x2, self.y2]
    }

    pub fn width(&self) -> f32 {
        (self.x2 - self.x1).max(0.0)
    }

    pub fn height(&self) -> f32 {
        (self.y2 - self.y1).max(0.0)
    }

    pub fn area(&self) -> f32 {
        self.width() * self.height()
    }

    /// True when every coordinate is finite and the box has a positive area.
    pub fn is_valid(&self) -> bool {
        self.to_array().iter().all(|v| v.is_finite()) && self.x2 > self.x1 && self.y2 > self.y1
    }

    /// Intersection over union; 0 when either box is empty.
    pub fn iou(&self, other: &BBox) -> f32 {
        let w = (self.x2.min(other.x2) - self.x1.max(other.x1)).max(0.0);
        let h = (self.y2.min(other.y2) - self.y1.max(other.y1)).max(0.0);
        let inter = w * h;
        let union = self.area() + other.area() - inter;
        if union <= 0.0 { 0.0 } else { inter / union }
    }

    /// The share of the smaller box that lies inside the other: 1 when one box contains
    /// the other, whatever their sizes (where IoU stays low for a part inside a whole).
    pub fn containment(&self, other: &BBox) -> f32 {
        let w = (self.x2.min(other.x2) - self.x1.max(other.x1)).max(0.0);
        let h = (self.y2.min(other.y2) - self.y1.max(other.y1)).max(0.0);
        let smaller = self.area().min(other.area());
        if smaller <= 0.0 { 0.0 } else { w * h / smaller }
    }

    /// The box moved by `(dx, dy)`.
    pub fn translate(&self, dx: f32, dy: f32) -> BBox {
        BBox::new(self.x1 + dx, self.y1 + dy, self.x2 + dx, self.y2 + dy)
    }

    /// The box clipped to an image of `width` × `height`.
    pub fn clip(&self, width: u32, height: u32) -> BBox {
        let (w, h) = (width as f32, height as f32);
        BBox { x1: self.x1.clamp(0.0, w), y1: self.y1.clamp(0.0, h), x2: self.x2.clamp(0.0, w), y2: self.y2.clamp(0.0, h) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_of_known_boxes() {
        let a = BBox::new(0.0, 0.0, 10.0, 10.0);
        let b = BBox::new(5.0, 0.0, 15.0, 10.0);
        assert!((a.iou(&b) - 50.0 / 150.0).abs() < 1e-6);
        assert_eq!(a.iou(&a), 1.0);
        assert_eq!(a.iou(&BBox::new(20.0, 20.0, 30.0, 30.0)), 0.0);
        assert_eq!(BBox::new(1.0, 1.0, 1.0, 5.0).iou(&a), 0.0);
    }

    #[test]
    fn containment_is_one_for_a_part_inside_a_whole() {
        let whole = BBox::new(0.0, 0.0, 100.0, 200.0);
        let part = BBox::new(10.0, 100.0, 90.0, 190.0);
        assert_eq!(whole.containment(&part), 1.0);
        assert_eq!(part.containment(&whole), 1.0);
        assert!(whole.iou(&part) < 0.4);
        let half_out = BBox::new(50.0, 0.0, 150.0, 100.0);
        assert!((whole.containment(&half_out) - 0.5).abs() < 1e-6);
        assert_eq!(whole.containment(&BBox::new(5.0, 5.0, 5.0, 9.0)), 0.0);
        assert_eq!(part.translate(5.0, -10.0).to_array(), [15.0, 90.0, 95.0, 180.0]);
    }

    #[test]
    fn validity_and_clipping() {
        assert!(!BBox::new(5.0, 0.0, 5.0, 3.0).is_valid());
        assert!(!BBox::new(0.0, 0.0, f32::NAN, 3.0).is_valid());
        let c = BBox::new(-4.0, 2.0, 50.0, 70.0).clip(40, 60);
        assert_eq!(c.to_array(), [0.0, 2.0, 40.0, 60.0]);
    }
}
