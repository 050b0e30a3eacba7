//! How the engine orders a garment's shop items: its own category first by default (a
//! substitute when the shop has none of it), similarity alone on request, k distinct items
//! however many garments an item owns; and where a drawn box's category comes from. The
//! shipped embedder embeds a real CC0 photo; the shop is a snapshot built here with
//! embeddings placed at known similarities to that query.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use image::RgbImage;
use shoplens::geometry::BBox;
use shoplens::models::embedder::{GarmentEmbedder, GarmentReading};
use shoplens::serving::engine::{CategorySource, QueryGarment, Ranking, SearchEngine, SearchRequest, ServingIndex};
use shoplens::serving::snapshot::{ServedGarment, ServedItem, Snapshot};
use shoplens::store::ItemMetadata;
use shoplens::vision::{DecodeLimits, decode_image};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shipped embedder without a detector: every search is a drawn box or the whole photo.
fn engine() -> SearchEngine {
    let embedder = GarmentEmbedder::load(&repo().join("models/embedder-lite0.safetensors"), &Device::Cpu).unwrap();
    SearchEngine { detector: None, embedder, limits: DecodeLimits::default() }
}

/// The CC0 T-shirt photo and a box around the shirt.
fn photo() -> (RgbImage, BBox) {
    let image = decode_image(&std::fs::read(repo().join("shared/tests/fixtures/lite0/catalog-t-shirt-00003aeb.jpg")).unwrap(), DecodeLimits::default()).unwrap();
    let (w, h) = (image.width() as f32, image.height() as f32);
    (image, BBox::new(0.05 * w, 0.05 * h, 0.95 * w, 0.95 * h))
}

/// A unit vector with cosine `cos` to the unit vector `e`.
fn at_similarity(e: &[f32], cos: f32) -> Vec<f32> {
    // The axis e leans on least, made orthogonal to e.
    let axis = e.iter().enumerate().min_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
    let mut u: Vec<f32> = e.iter().map(|x| -x * e[axis]).collect();
    u[axis] += 1.0;
    let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt();
    let sin = (1.0 - cos * cos).sqrt();
    e.iter().zip(&u).map(|(a, b)| cos * a + sin * b / norm).collect()
}

/// A shop of items, each `(sku, category, embeddings of its garments)`.
fn shop(items: &[(&str, &str, Vec<Vec<f32>>)]) -> ServingIndex {
    let dim = items[0].2[0].len();
    let mut snapshot =
        Snapshot { generation: 1, built_at: None, models: BTreeMap::new(), dim: dim as u32, items: Vec::new(), garments: Vec::new(), embeddings: Vec::new(), ann: None };
    for (i, (sku, category, garments)) in items.iter().enumerate() {
        let metadata = ItemMetadata { sku: sku.to_string(), category: Some(category.to_string()), image: format!("{sku}.jpg"), ..Default::default() };
        snapshot.items.push(ServedItem { metadata, image_path: format!("/shop/{sku}.jpg").into(), content_hash: "00".into() });
        for e in garments {
            let id = snapshot.garments.len() as u64;
            snapshot.garments.push(ServedGarment { id, item: i as u32, bbox: BBox::new(0.0, 0.0, 10.0, 10.0), category: category.to_string(), score: 1.0 });
            snapshot.embeddings.extend(e);
        }
    }
    ServingIndex::from_snapshot(snapshot, None).unwrap()
}

fn request(k: usize, region: BBox, ranking: Ranking) -> SearchRequest {
    SearchRequest { k, category: None, region: Some(region), ranking }
}

fn skus(engine: &SearchEngine, index: &ServingIndex, image: &RgbImage, req: &SearchRequest) -> Vec<String> {
    engine.search_image(index, image, req).unwrap().garments[0].results.iter().map(|r| r.sku.clone()).collect()
}

#[test]
fn a_drawn_box_gets_its_category_from_the_category_head() {
    let engine = engine();
    let (image, region) = photo();
    let e = engine.pipeline().embed(&image, &[Some(region)]).unwrap().remove(0);
    let index = shop(&[("p", "pants", vec![at_similarity(&e, 0.5)])]);
    let garment = engine.search_image(&index, &image, &request(1, region, Ranking::SameKindFirst)).unwrap().garments.remove(0);
    assert_eq!((garment.category.as_str(), garment.category_source, garment.source), ("top", CategorySource::Classifier, "region"));
    assert!(garment.category_probability.unwrap() > 0.5, "{:?}", garment.category_probability);
    // A category given by the request wins over the head's guess.
    let asked = SearchRequest { category: Some("pants".into()), ..request(1, region, Ranking::SameKindFirst) };
    let garment = engine.search_image(&index, &image, &asked).unwrap().garments.remove(0);
    assert_eq!((garment.category.as_str(), garment.category_source), ("pants", CategorySource::Request));
}

/// A garment the pipeline read before the search (an evaluator's detection) and whose
/// category nobody gave is named from its reading's probabilities, not left "any".
#[test]
fn a_garment_read_before_the_search_is_named_by_its_readings_probabilities() {
    let engine = engine();
    let (image, region) = photo();
    let reading = engine.pipeline().read(&image, &[Some(region)]).unwrap().remove(0);
    let names = &engine.embedder.config().categories;
    let skirt = names.iter().position(|n| n == "skirt").unwrap();
    let probabilities: Vec<f32> = (0..names.len()).map(|i| if i == skirt { 0.9 } else { 0.1 / (names.len() - 1) as f32 }).collect();
    let index = shop(&[("p", "pants", vec![at_similarity(&reading.embedding, 0.5)])]);
    let garment =
        QueryGarment { bbox: region, known: None, score: 0.8, source: "detected", reading: Some(GarmentReading { embedding: reading.embedding, categories: Some(probabilities) }) };
    let (mut results, _) = engine.search_garments(&index, &image, vec![garment], &request(1, region, Ranking::SameKindFirst)).unwrap();
    let garment = results.remove(0);
    assert_eq!((garment.category.as_str(), garment.category_source), ("skirt", CategorySource::Classifier));
    assert_eq!(garment.category_probability, Some(0.9));
}

#[test]
fn default_ranking_lists_the_garments_category_first() {
    let engine = engine();
    let (image, region) = photo();
    let e = engine.pipeline().embed(&image, &[Some(region)]).unwrap().remove(0);
    // Pants are nearer to the shirt than any top (but not so near as to be the very item):
    // similarity alone would list them first.
    let exact = engine.embedder.config().exact_match_similarity.unwrap_or(1.0);
    let index = shop(&[
        ("pants-1", "pants", vec![at_similarity(&e, exact - 0.02)]),
        ("pants-2", "pants", vec![at_similarity(&e, exact - 0.04)]),
        ("pants-3", "pants", vec![at_similarity(&e, exact - 0.06)]),
        ("top-1", "top", vec![at_similarity(&e, 0.3)]),
        ("top-2", "top", vec![at_similarity(&e, 0.2)]),
    ]);
    let outcome = engine.search_image(&index, &image, &request(4, region, Ranking::SameKindFirst)).unwrap();
    let garment = &outcome.garments[0];
    assert_eq!(garment.results.iter().map(|r| r.sku.as_str()).collect::<Vec<_>>(), ["top-1", "top-2", "pants-1", "pants-2"]);
    let first = garment.ranked_first.as_ref().unwrap();
    assert_eq!((first.category.as_str(), first.relation, first.results), ("top", "same", 2));
    assert_eq!(skus(&engine, &index, &image, &request(4, region, Ranking::Similarity)), ["pants-1", "pants-2", "pants-3", "top-1"]);
}

#[test]
fn after_the_last_of_its_kind_come_its_substitutes_then_the_rest() {
    let engine = engine();
    let (image, region) = photo();
    let e = engine.pipeline().embed(&image, &[Some(region)]).unwrap().remove(0);
    let near = engine.embedder.config().exact_match_similarity.unwrap_or(1.0) - 0.05;
    let index = shop(&[("pants-1", "pants", vec![at_similarity(&e, near)]), ("top-1", "top", vec![at_similarity(&e, 0.1)]), ("coat-1", "outer", vec![at_similarity(&e, 0.0)])]);
    // A top's substitute is outer: after the shop's only top, the coat, then the pants.
    assert_eq!(skus(&engine, &index, &image, &request(3, region, Ranking::SameKindFirst)), ["top-1", "coat-1", "pants-1"]);
}

#[test]
fn the_very_item_stays_first_whatever_its_category() {
    let engine = engine();
    let exact = engine.embedder.config().exact_match_similarity.expect("the shipped embedder has a calibrated exact-match similarity");
    assert!(exact > 0.3 && exact < 0.99, "{exact}");
    let (image, region) = photo();
    let e = engine.pipeline().embed(&image, &[Some(region)]).unwrap().remove(0);
    // Indexed as pants (a wrong catalog label, or a misjudged garment), but nearly identical.
    let index = shop(&[
        ("same-item", "pants", vec![at_similarity(&e, (exact + 1.0) / 2.0)]),
        ("pants-2", "pants", vec![at_similarity(&e, exact - 0.05)]),
        ("top-1", "top", vec![at_similarity(&e, 0.3)]),
    ]);
    let garment = engine.search_image(&index, &image, &request(3, region, Ranking::SameKindFirst)).unwrap().garments.remove(0);
    assert_eq!(garment.results.iter().map(|r| r.sku.as_str()).collect::<Vec<_>>(), ["same-item", "top-1", "pants-2"]);
    assert_eq!(garment.ranked_first.map(|r| r.results), Some(1));
}

#[test]
fn a_substitute_kind_first_when_the_shop_has_none_of_the_garments_own() {
    let engine = engine();
    let (image, region) = photo();
    let e = engine.pipeline().embed(&image, &[Some(region)]).unwrap().remove(0);
    let near = engine.embedder.config().exact_match_similarity.unwrap_or(1.0) - 0.05;
    let with_outer = shop(&[("pants-1", "pants", vec![at_similarity(&e, near)]), ("coat-1", "outer", vec![at_similarity(&e, 0.3)])]);
    let garment = engine.search_image(&with_outer, &image, &request(2, region, Ranking::SameKindFirst)).unwrap().garments.remove(0);
    assert_eq!(garment.results[0].sku, "coat-1");
    assert_eq!(garment.ranked_first.as_ref().map(|r| (r.category.as_str(), r.relation)), Some(("outer", "substitute")));
    // Shoes are no substitute for a shirt: similarity decides.
    let unrelated = shop(&[("shoe-1", "footwear", vec![at_similarity(&e, 0.3)]), ("pants-1", "pants", vec![at_similarity(&e, near)])]);
    let garment = engine.search_image(&unrelated, &image, &request(2, region, Ranking::SameKindFirst)).unwrap().garments.remove(0);
    assert_eq!(garment.results[0].sku, "pants-1");
    assert_eq!(garment.ranked_first, None);
}

#[test]
fn an_item_owning_many_garments_still_leaves_k_items() {
    let engine = engine();
    let (image, region) = photo();
    let e = engine.pipeline().embed(&image, &[Some(region)]).unwrap().remove(0);
    let many: Vec<Vec<f32>> = (0..30).map(|i| at_similarity(&e, 0.99 - i as f32 * 0.001)).collect();
    let index = shop(&[
        ("outfit", "top", many),
        ("top-1", "top", vec![at_similarity(&e, 0.5)]),
        ("top-2", "top", vec![at_similarity(&e, 0.4)]),
        ("top-3", "top", vec![at_similarity(&e, 0.3)]),
    ]);
    for ranking in [Ranking::SameKindFirst, Ranking::Similarity] {
        assert_eq!(skus(&engine, &index, &image, &request(3, region, ranking)), ["outfit", "top-1", "top-2"], "{ranking:?}");
    }
}
