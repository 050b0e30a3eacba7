//! Shows the engine's progress events: bars with rate and ETA on a terminal, plain log
//! lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use shoplens::progress::Progress;

/// Turns [`Progress`] events into a bar or log lines.
#[derive(Default)]
pub struct Reporter {
    bar: Option<ProgressBar>,
    /// Without a terminal (a log file, cron, CI) each stage is logged once at its start
    /// and at every tenth of its way, so a night's log shows where a build stood.
    logged: Option<LoggedStage>,
}

struct LoggedStage {
    name: String,
    total: u64,
    done: u64,
    tenths: u64,
}

impl Reporter {
    pub fn handle(&mut self, event: Progress) {
        match event {
            Progress::Stage { name, total } => {
                self.finish();
                let style = ProgressStyle::with_template("{msg:24} [{bar:40}] {pos}/{len} {per_sec} eta {eta}").expect("valid template");
                let bar = ProgressBar::new(total).with_style(style).with_message(name.clone());
                if bar.is_hidden() {
                    eprintln!("{name} ({total})");
                    self.logged = Some(LoggedStage { name, total, done: 0, tenths: 0 });
                }
                self.bar = Some(bar);
            }
            Progress::Advance(n) => {
                if let Some(bar) = &self.bar {
                    bar.inc(n);
                }
                if let Some(stage) = &mut self.logged {
                    stage.advance(n);
                }
            }
            Progress::Message(message) => match &self.bar {
                Some(bar) if !bar.is_hidden() => bar.println(message),
                _ => eprintln!("{message}"),
            },
        }
    }

    pub fn finish(&mut self) {
        self.logged = None;
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

impl LoggedStage {
    fn advance(&mut self, n: u64) {
        self.done += n;
        let tenths = (self.done * 10).checked_div(self.total).unwrap_or(10);
        if tenths > self.tenths {
            self.tenths = tenths;
            eprintln!("{} {}/{}", self.name, self.done, self.total);
        }
    }
}
