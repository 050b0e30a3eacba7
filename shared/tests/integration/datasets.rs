use shoplens::datasets::synth::{self, SynthConfig};
use shoplens::datasets::{Df2Annotation, Df2Folder, Source, read_gallery_gt, read_query_gt};

#[test]
fn synthetic_set_reads_back_with_consistent_ground_truth() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig { images: 8, ..SynthConfig::default() };
    let summary = synth::generate(dir.path(), &cfg).unwrap();
    assert_eq!(summary.user_images, 8);
    assert_eq!(summary.shop_images, summary.matched_items);

    let user = Df2Folder::open(dir.path().join("user")).unwrap();
    let shop = Df2Folder::open(dir.path().join("shop")).unwrap();
    assert_eq!(user.images().len(), 8);
    assert_eq!(shop.images().len(), summary.shop_images);
    let queries = read_query_gt(&dir.path().join("query_gt.json")).unwrap();
    let gallery = read_gallery_gt(&dir.path().join("gallery_gt.json")).unwrap();
    assert_eq!(queries.len(), summary.matched_items);

    for q in &queries {
        let anno = Df2Annotation::read(&user.image(q.query_image_id).unwrap().annotation).unwrap();
        assert_eq!(anno.source, Source::User);
        let item = anno.items.iter().find(|i| i.style == q.style).expect("query item in its image");
        assert_eq!((item.category_id, item.bbox), (q.cls, q.bbox()));
        // Exactly one shop image matches (pair_id, style), and its annotation agrees.
        let matches: Vec<_> = gallery.iter().filter(|g| g.pair_id == q.pair_id && g.style == q.style).collect();
        assert_eq!(matches.len(), 1);
        let shop_anno = Df2Annotation::read(&shop.image(matches[0].gallery_image_id).unwrap().annotation).unwrap();
        assert_eq!((shop_anno.source, shop_anno.pair_id), (Source::Shop, q.pair_id));
        assert_eq!(shop_anno.items[0].bbox, matches[0].bbox());
        assert_eq!(shop_anno.items[0].category_id, q.cls);
    }
}

#[test]
fn synthetic_boxes_are_tight_around_drawn_garments() {
    let dir = tempfile::tempdir().unwrap();
    synth::generate(dir.path(), &SynthConfig { images: 4, seed: 3, ..SynthConfig::default() }).unwrap();
    let shop = Df2Folder::open(dir.path().join("shop")).unwrap();
    for entry in shop.images() {
        let anno = Df2Annotation::read(&entry.annotation).unwrap();
        let img = image::open(&entry.image).unwrap().to_rgb8();
        let b = anno.items[0].bbox;
        // Outside the box the shop image is white (JPEG noise aside).
        let non_white = |x: u32, y: u32| img.get_pixel(x, y).0.iter().any(|&c| c < 200);
        let outside = (0..img.height())
            .flat_map(|y| (0..img.width()).map(move |x| (x, y)))
            .filter(|&(x, y)| (x as f32) < b.x1 - 2.0 || (x as f32) >= b.x2 + 2.0 || (y as f32) < b.y1 - 2.0 || (y as f32) >= b.y2 + 2.0)
            .filter(|&(x, y)| non_white(x, y))
            .count();
        assert_eq!(outside, 0, "{}", entry.image.display());
    }
}

#[test]
fn generation_is_deterministic() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = SynthConfig { images: 3, ..SynthConfig::default() };
    synth::generate(a.path(), &cfg).unwrap();
    synth::generate(b.path(), &cfg).unwrap();
    for f in ["query_gt.json", "gallery_gt.json", "user/image/000002.jpg", "shop/annos/000001.json"] {
        assert_eq!(std::fs::read(a.path().join(f)).unwrap(), std::fs::read(b.path().join(f)).unwrap(), "{f}");
    }
}

#[test]
fn a_folder_missing_parts_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Df2Folder::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("annos"), "{err}");
    std::fs::create_dir_all(dir.path().join("annos")).unwrap();
    std::fs::create_dir_all(dir.path().join("image")).unwrap();
    std::fs::write(dir.path().join("annos/000001.json"), "{}").unwrap();
    let err = Df2Folder::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("000001.jpg"), "{err}");
}
