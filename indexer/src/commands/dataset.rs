//! `indexer dataset ...`: DeepFashion2-format data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
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
}

pub fn run(cmd: DatasetCommand) -> Result<()> {
    match cmd {
        DatasetCommand::Check { data } => check(&data),
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
    let folders: Vec<PathBuf> = if data.join("annos").is_dir() {
        vec![data.to_path_buf()]
    } else {
        ["user", "shop"].iter().map(|s| data.join(s)).filter(|p| p.join("annos").is_dir()).collect()
    };
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
