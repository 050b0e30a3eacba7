//! `indexer dataset ...`: DeepFashion2-format data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use shoplens::datasets::synth::{self, SynthConfig};
use shoplens::datasets::{Df2Annotation, Df2Folder, read_gallery_gt, read_query_gt};

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Read every annotation of a DeepFashion2-format set and report what it holds. DIR may
    /// be one folder (image/ + annos/) or a set with user/, shop/ and the *_gt.json files.
    Check {
        #[arg(long)]
        data: PathBuf,
    },
    /// Write a synthetic DeepFashion2-format consumer-to-shop set (drawn garments).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 12)]
        images: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Assemble the validation gallery of the retrieval evaluation: the shop images of the
    /// validation pairs (`pair_id % 5 == 1`) as a DeepFashion2 shop folder, and catalog
    /// distractors (senders with `sender_id % 5` in {1, 3}, as in embedder training, so
    /// none was trained on) as a CSV catalog. Files are hard links to the originals, or copies across file systems (the indexer refuses links that lead out of a catalog folder).
    /// Then: `indexer build --catalog OUT/shop --catalog OUT/distractors/catalog.csv`.
    EvalGallery {
        /// DeepFashion2-format consumer-to-shop set (shop/ with its annotations).
        #[arg(long)]
        data: PathBuf,
        /// Catalog folder with catalog.csv (sku, image, label, sender_id).
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long, default_value_t = 1000)]
        distractors: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: DatasetCommand) -> Result<()> {
    match cmd {
        DatasetCommand::Check { data } => check(&data),
        DatasetCommand::EvalGallery { data, catalog, distractors, out } => eval_gallery(&data, &catalog, distractors, &out),
        DatasetCommand::Synth { out, images, seed } => {
            let summary = synth::generate(&out, &SynthConfig { images, seed, ..SynthConfig::default() })?;
            println!(
                "wrote {} consumer images, {} shop images ({} matched and {} unmatched garments) to {}",
                summary.user_images,
                summary.shop_images,
                summary.matched_items,
                summary.unmatched_items,
                out.display()
            );
            Ok(())
        }
    }
}

fn check(data: &Path) -> Result<()> {
    let folders: Vec<PathBuf> =
        if data.join("annos").is_dir() { vec![data.to_path_buf()] } else { ["user", "shop"].iter().map(|s| data.join(s)).filter(|p| p.join("annos").is_dir()).collect() };
    if folders.is_empty() {
        anyhow::bail!("{} holds neither annos/ nor user/annos or shop/annos", data.display());
    }
    for folder in folders {
        let set = Df2Folder::open(&folder)?;
        let mut per_category: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let (mut errors, mut items) = (Vec::new(), 0usize);
        for image in set.images() {
            match Df2Annotation::read(&image.annotation) {
                Ok(anno) => {
                    for item in anno.items {
                        items += 1;
                        let entry = per_category.entry(format!("{:>2} {}", item.category_id, item.category_name)).or_default();
                        entry.0 += 1;
                        entry.1 += usize::from(item.style > 0);
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        println!("{}: {} images, {} items, {} unreadable annotations", folder.display(), set.images().len(), items, errors.len());
        for (category, (n, styled)) in &per_category {
            println!("  {category:<24} {n:>6} items, {styled:>6} with style > 0");
        }
        for e in errors.iter().take(20) {
            println!("  error: {e}");
        }
    }
    for (name, is_query) in [("query_gt.json", true), ("gallery_gt.json", false)] {
        let path = data.join(name);
        if path.is_file() {
            let n = if is_query { read_query_gt(&path)?.len() } else { read_gallery_gt(&path)?.len() };
            println!("{name}: {n} entries");
        }
    }
    Ok(())
}

/// Puts a copy of `from` at `to`: a hard link where the file system allows, else a copy. Never
/// a symbolic link: the indexer refuses catalog files that lead outside their folder.
fn place(from: &Path, to: &Path) -> Result<()> {
    if to.symlink_metadata().is_ok() {
        std::fs::remove_file(to)?;
    }
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn eval_gallery(data: &Path, catalog: &Path, distractors: usize, out: &Path) -> Result<()> {
    let shop = Df2Folder::open(data.join("shop"))?;
    for sub in ["shop/image", "shop/annos", "distractors/images"] {
        std::fs::create_dir_all(out.join(sub))?;
    }
    let mut shop_images = 0;
    for image in shop.images() {
        let anno = Df2Annotation::read(&image.annotation)?;
        if anno.pair_id % 5 != 1 {
            continue;
        }
        let name = image.image.file_name().context("image file name")?;
        place(&image.image, &out.join("shop/image").join(name))?;
        place(&image.annotation, &out.join("shop/annos").join(image.annotation.file_name().context("annotation file name")?))?;
        shop_images += 1;
    }
    let csv_path = catalog.join("catalog.csv");
    let mut reader = csv::Reader::from_path(&csv_path).with_context(|| format!("{}", csv_path.display()))?;
    let headers = reader.headers()?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name).with_context(|| format!("{}: no column {name}", csv_path.display()));
    let (sku_col, image_col, sender_col) = (col("sku")?, col("image")?, col("sender_id")?);
    let label_col = headers.iter().position(|h| h == "label");
    let mut rows: Vec<csv::StringRecord> = reader.records().collect::<std::result::Result<_, _>>()?;
    rows.sort_by(|a, b| a.get(sku_col).cmp(&b.get(sku_col)));
    let mut writer = csv::Writer::from_path(out.join("distractors/catalog.csv"))?;
    writer.write_record(["sku", "image", "label"])?;
    let mut taken = 0;
    for row in rows {
        let sender: u64 = row.get(sender_col).and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        if taken == distractors || !(sender % 5 == 1 || sender % 5 == 3) {
            continue;
        }
        let source = catalog.join(row.get(image_col).unwrap_or_default());
        let name = format!("images/{}", source.file_name().and_then(|n| n.to_str()).context("image file name")?);
        place(&source, &out.join("distractors").join(&name))?;
        writer.write_record([row.get(sku_col).unwrap_or_default(), name.as_str(), label_col.and_then(|c| row.get(c)).unwrap_or_default()])?;
        taken += 1;
    }
    writer.flush()?;
    println!("{shop_images} validation shop images in {}, {taken} distractors in {}", out.join("shop").display(), out.join("distractors/catalog.csv").display());
    Ok(())
}
