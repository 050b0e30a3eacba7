//! Shows the engine's progress events: bars with rate and ETA on a terminal, plain log
//! lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use shoplens::progress::Progress;

/// Turns [`Progress`] events into a bar or log lines.
#[derive(Default)]
pub struct Reporter {
    bar: Option<ProgressBar>,
}

impl Reporter {
    pub fn handle(&mut self, event: Progress) {
        match event {
            Progress::Stage { name, total } => {
                self.finish();
                let style = ProgressStyle::with_template("{msg:24} [{bar:40}] {pos}/{len} {per_sec} eta {eta}").expect("valid template");
                let bar = ProgressBar::new(total).with_style(style).with_message(name.clone());
                if bar.is_hidden() {
                    // Not a terminal (a log file, cron, CI): say each stage once instead.
                    eprintln!("{name} ({total})");
                }
                self.bar = Some(bar);
            }
            Progress::Advance(n) => {
                if let Some(bar) = &self.bar {
                    bar.inc(n);
                }
            }
            Progress::Message(message) => match &self.bar {
                Some(bar) if !bar.is_hidden() => bar.println(message),
                _ => eprintln!("{message}"),
            },
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
