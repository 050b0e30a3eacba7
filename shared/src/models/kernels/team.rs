//! The kernels' parallel loops: the calling thread and a small team of helper threads share
//! a loop's tasks, and a helper keeps watching for the next loop for a moment after each one
//! before it sleeps.
//!
//! Why not rayon, as everywhere else: a forward pass at batch 1 is about 100 loops of 50–100
//! microseconds, and rayon's idle worker goes to sleep after a few dozen yields, so most
//! loops began by waking it (about 56 context switches per backbone pass, 1.67 of 2 cores
//! busy). Keeping a rayon worker busy-waiting instead needs a job on the pool that the
//! pass's own worker may pick up inside a join and then wait on forever. A helper here is no
//! rayon worker: it only ever runs loop tasks, never blocks on anyone, and a caller that
//! finds the team busy (another pass running on the other core) runs its loop alone.
//!
//! Passes side by side are another matter: a pass that begins beside another one (or
//! inside [`side_by_side`]), or while every core has a pass, runs its loops on rayon, whose
//! idle worker steals their tasks once the other pass ends. Given the team, the first of a
//! photo's crops took the helper while the other core ran its own crop: three threads on
//! two cores, and the photo's embedding 4–5 ms slower.
//!
//! Results never depend on who runs a task: the kernels cut their work into tasks from the
//! tensor shapes alone, and each task writes its own part of the output.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper watches for the next loop before it sleeps: longer than the gaps
/// between the loops of one pass (tens of microseconds), short against the time between
/// two searches, so an idle server burns at most this much per pass.
const WATCH_FOR: Duration = Duration::from_micros(300);

/// Runs `task(0) … task(tasks − 1)`, each exactly once, on the calling thread and the
/// team's helpers, and returns when all are done. Tasks must not depend on their order.
pub(crate) fn for_each_task(tasks: usize, task: impl Fn(usize) + Sync) {
    for_each_task_init(tasks, || (), |_, i| task(i));
}

/// [`for_each_task`] with a per-thread scratch value: each thread taking part calls `init`
/// once and hands the value to every task it runs.
pub(crate) fn for_each_task_init<S>(tasks: usize, init: impl Fn() -> S + Sync, task: impl Fn(&mut S, usize) + Sync) {
    let body = |claim: &dyn Fn() -> Option<usize>| {
        let Some(first) = claim() else { return };
        let mut scratch = init();
        task(&mut scratch, first);
        while let Some(i) = claim() {
            task(&mut scratch, i);
        }
    };
    let team = team();
    if tasks >= 2 && (MODE.with(|m| m.get()) == PassMode::Rayon || team.cores_taken()) {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each_init(&init, |scratch, i| task(scratch, i));
        return;
    }
    let alone = tasks < 2 || tasks > u32::MAX as usize || team.helpers == 0 || rayon::current_num_threads() < 2 || team.busy.swap(true, SeqCst);
    if alone {
        let left = Tasks::new(tasks);
        body(&|| left.take_front());
        return;
    }
    team.run(tasks, &body);
}

/// [`for_each_task`] over the `chunk`-long pieces of `data` (the last may be shorter):
/// `task(index, piece)`.
pub(crate) fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, task: impl Fn(usize, &mut [T]) + Sync) {
    for_each_chunk_mut_init(data, chunk, || (), |_, i, piece| task(i, piece));
}

/// [`for_each_chunk_mut`] with a per-thread scratch value, as in [`for_each_task_init`].
pub(crate) fn for_each_chunk_mut_init<T: Send, S>(data: &mut [T], chunk: usize, init: impl Fn() -> S + Sync, task: impl Fn(&mut S, usize, &mut [T]) + Sync) {
    let (len, chunk) = (data.len(), chunk.max(1));
    let base = Pieces(data.as_mut_ptr());
    for_each_task_init(len.div_ceil(chunk), init, |scratch, i| {
        let start = i * chunk;
        // SAFETY: task i alone gets values start..start+chunk (cut at len) of `data`, which
        // stays mutably borrowed until every task is done.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.at(start), chunk.min(len - start)) };
        task(scratch, i, piece);
    });
}

/// The start of a slice whose disjoint pieces the tasks of one loop write.
struct Pieces<T>(*mut T);
// SAFETY: only disjoint pieces are handed out, each to one task (see `for_each_chunk_mut_init`).
unsafe impl<T: Send> Sync for Pieces<T> {}

impl<T> Pieces<T> {
    /// # Safety
    /// `offset` must lie within the slice.
    unsafe fn at(&self, offset: usize) -> *mut T {
        // SAFETY: as the caller promises.
        unsafe { self.0.add(offset) }
    }
}

/// Forward passes running now, each counted once on the thread that runs it (see
/// [`ForwardPass`]).
static PASSES: AtomicUsize = AtomicUsize::new(0);

/// What this thread's forward pass may use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PassMode {
    /// No pass is running on this thread (a kernel called on its own).
    None,
    /// The pass began with the cores to itself: the team serves its loops while no other
    /// pass runs.
    Team,
    /// The pass began beside another one: its loops go to rayon, whose idle worker takes
    /// tasks when the other pass ends (what a photo's crops embedded side by side need).
    Rayon,
}

thread_local! {
    static MODE: std::cell::Cell<PassMode> = const { std::cell::Cell::new(PassMode::None) };
}

/// Marks a forward pass on this thread while it lives (nested passes count once).
pub(crate) struct ForwardPass {
    outermost: bool,
}

impl ForwardPass {
    pub fn begin() -> Self {
        let outermost = MODE.with(|m| m.get()) == PassMode::None;
        if outermost {
            let beside_another = PASSES.fetch_add(1, SeqCst) > 0 || SIDE_BY_SIDE.with(|s| s.get());
            MODE.with(|m| m.set(if beside_another { PassMode::Rayon } else { PassMode::Team }));
        }
        Self { outermost }
    }
}

thread_local! {
    static SIDE_BY_SIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, one of several forward passes a caller runs side by side on rayon's workers
/// (a photo's crops), with its loops on rayon: the first of them would otherwise find the
/// cores free, take the team, and keep a helper competing with the others for the cores.
pub fn side_by_side<R>(f: impl FnOnce() -> R) -> R {
    let before = SIDE_BY_SIDE.with(|s| s.replace(true));
    let result = f();
    SIDE_BY_SIDE.with(|s| s.set(before));
    result
}

impl Drop for ForwardPass {
    fn drop(&mut self) {
        if self.outermost {
            PASSES.fetch_sub(1, SeqCst);
            MODE.with(|m| m.set(PassMode::None));
        }
    }
}

/// The tasks of a loop not yet claimed, `front..back`: the caller takes them from the front,
/// helpers from the back, so each thread runs a contiguous run of tasks (neighbouring blocks
/// share inputs in its cache) until they meet, whatever the tasks' lengths. Taking them in
/// turns instead made batch-8 passes 3–8 % slower than rayon's halves.
struct Tasks(AtomicU64);

impl Tasks {
    fn new(tasks: usize) -> Self {
        Self(AtomicU64::new(Self::pack(0, tasks)))
    }

    fn pack(front: usize, back: usize) -> u64 {
        (back as u64) << 32 | front as u64
    }

    fn unpack(v: u64) -> (usize, usize) {
        ((v & u32::MAX as u64) as usize, (v >> 32) as usize)
    }

    fn take_front(&self) -> Option<usize> {
        self.take(|front, back| (front + 1, back, front))
    }

    fn take_back(&self) -> Option<usize> {
        self.take(|front, back| (front, back - 1, back - 1))
    }

    fn take(&self, step: impl Fn(usize, usize) -> (usize, usize, usize)) -> Option<usize> {
        let mut current = self.0.load(SeqCst);
        loop {
            let (front, back) = Self::unpack(current);
            if front >= back {
                return None;
            }
            let (front, back, task) = step(front, back);
            match self.0.compare_exchange_weak(current, Self::pack(front, back), SeqCst, SeqCst) {
                Ok(_) => return Some(task),
                Err(now) => current = now,
            }
        }
    }

    /// Claims whatever is left, so no helper starts on it (after a panic in the caller's own
    /// tasks).
    fn close(&self) {
        while self.take_back().is_some() {}
    }

    fn any_left(&self) -> bool {
        let (front, back) = Self::unpack(self.0.load(SeqCst));
        front < back
    }
}

/// A loop's body as every thread taking part runs it: claim tasks until none is left.
type Body<'a> = dyn Fn(&dyn Fn() -> Option<usize>) + Sync + 'a;

/// One loop published to the helpers.
struct Job {
    /// The caller's loop body; borrowed from its stack, valid until the caller returns,
    /// which it does only once every helper that entered the body has left it.
    body: *const Body<'static>,
    left: Tasks,
    /// Helpers inside `body` (or about to check whether to enter it).
    active: AtomicUsize,
    panicked: AtomicBool,
}

// SAFETY: `body` points to a `Sync` closure, called only while the caller waits (see `Job`).
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// A helper's share: announce itself first, then enter the body only if tasks are left.
    /// The caller waits for `active` to fall to 0 after every task was claimed, so a helper
    /// counted there either sees tasks left and is waited for, or sees none and never
    /// touches the body.
    fn help(&self, team: &Team) {
        self.active.fetch_add(1, SeqCst);
        // A pass that began on the other core since the loop was published needs the core
        // more than this loop does.
        if self.left.any_left() && !team.cores_taken() {
            // SAFETY: the caller is still inside `run` (it waits for `active`), so the body
            // it borrowed is alive.
            let body = unsafe { &*self.body };
            if catch_unwind(AssertUnwindSafe(|| body(&|| self.left.take_back()))).is_err() {
                self.panicked.store(true, SeqCst);
            }
        }
        self.active.fetch_sub(1, SeqCst);
    }
}

struct Team {
    helpers: usize,
    /// Taken by the caller whose loop the helpers serve.
    busy: AtomicBool,
    job: Mutex<Option<Arc<Job>>>,
    /// Counts published loops: a helper that sees it change looks at `job`.
    published: AtomicU64,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let team: &'static Team = Box::leak(Box::new(Team {
            helpers: threads().saturating_sub(1),
            busy: AtomicBool::new(false),
            job: Mutex::new(None),
            published: AtomicU64::new(0),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let started = (0..team.helpers).filter(|i| std::thread::Builder::new().name(format!("kernel-helper-{i}")).spawn(move || team.serve()).is_ok()).count();
        // A helper that could not start would leave loops waiting for nobody; none of them
        // is needed for correctness, so run alone if any is missing.
        if started < team.helpers {
            team.busy.store(true, SeqCst);
        }
        team
    })
}

/// Threads the kernels use in all: as many as rayon's global pool has (`RAYON_NUM_THREADS`,
/// else one per core), so one setting sizes both.
fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl Team {
    /// Whether every core has a forward pass of its own.
    fn cores_taken(&self) -> bool {
        PASSES.load(SeqCst) > self.helpers
    }

    /// Publishes the loop, takes part, waits for the helpers, then frees the team. A panic
    /// in any task is raised again here, after every helper has left the body.
    fn run(&self, tasks: usize, body: &Body<'_>) {
        // SAFETY: only the lifetime is erased; `Job` documents why the pointer is not used
        // after this function returns.
        let body: *const Body<'static> = unsafe { std::mem::transmute(body as *const Body<'_>) };
        let job = Arc::new(Job { body, left: Tasks::new(tasks), active: AtomicUsize::new(0), panicked: AtomicBool::new(false) });
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.clone());
        self.published.fetch_add(1, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        // SAFETY: as in `Job::help`; the caller's own borrow.
        // Every task is claimed once this returns (the body stops when none is left).
        let own = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.body)(&|| job.left.take_front()) }));
        job.left.close();
        // A helper finishing its last task; should it have lost its core to another thread,
        // yield so that it gets one back sooner.
        let mut spins = 0u32;
        while job.active.load(SeqCst) > 0 {
            spins += 1;
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.busy.store(false, SeqCst);
        if let Err(panic) = own {
            resume_unwind(panic);
        }
        if job.panicked.load(SeqCst) {
            panic!("a kernel task panicked on a helper thread");
        }
    }

    /// A helper's life: watch for a loop, help with it, and sleep when none comes for
    /// [`WATCH_FOR`].
    fn serve(&self) {
        let mut seen = self.published.load(SeqCst);
        loop {
            seen = self.next_loop(seen);
            let job = self.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(job) = job {
                job.help(self);
            }
        }
    }

    fn next_loop(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let now = self.published.load(SeqCst);
            if now != seen {
                return now;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(64) && (start.elapsed() > WATCH_FOR || self.cores_taken()) {
                break;
            }
        }
        let mut guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, SeqCst);
        loop {
            let now = self.published.load(SeqCst);
            if now != seen {
                self.sleepers.fetch_sub(1, SeqCst);
                return now;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps a task busy for `micros`, so that a sleeping helper has woken before the loop
    /// ends and takes tasks from the back.
    fn work_for(micros: u64) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_micros(micros) {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn every_task_runs_exactly_once_with_its_threads_scratch() {
        for tasks in [0, 1, 2, 7, 1000] {
            let runs: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            let inits = AtomicUsize::new(0);
            for_each_task_init(
                tasks,
                || inits.fetch_add(1, SeqCst),
                |_, i| {
                    work_for(20);
                    runs[i].fetch_add(1, SeqCst);
                },
            );
            assert!(runs.iter().all(|r| r.load(SeqCst) == 1), "{tasks} tasks");
            assert!(inits.load(SeqCst) <= tasks.min(threads()), "{tasks} tasks: one scratch per thread taking part");
        }
    }

    #[test]
    fn loops_from_many_threads_at_once_all_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        for_each_task(33, |i| {
                            total.fetch_add(i + 1, SeqCst);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(SeqCst), 4 * 200 * (33 * 34 / 2));
    }

    #[test]
    fn a_loop_inside_a_task_runs_on_that_thread() {
        let total = AtomicUsize::new(0);
        for_each_task(8, |_| {
            for_each_task(5, |i| {
                total.fetch_add(i, SeqCst);
            })
        });
        assert_eq!(total.load(SeqCst), 8 * 10);
    }

    #[test]
    fn passes_side_by_side_use_rayon_and_nested_passes_count_once() {
        let mode = || MODE.with(|m| m.get());
        side_by_side(|| {
            let _outer = ForwardPass::begin();
            assert!(mode() == PassMode::Rayon, "a pass started side by side leaves the team to lone passes");
        });
        let outer = ForwardPass::begin();
        let first = mode();
        assert!(first != PassMode::None);
        drop(ForwardPass::begin());
        assert!(mode() == first, "the inner pass (the detector's backbone) keeps the outer one's mode");
        drop(outer);
        assert!(mode() == PassMode::None);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_keeps_working() {
        let on_helper = || std::thread::current().name().is_some_and(|n| n.starts_with("kernel-helper"));
        // The caller's own panic.
        assert!(catch_unwind(|| for_each_task(8, |i| assert_ne!(i, 0, "the caller's first task fails"))).is_err());
        // A helper's panic: tasks fail only on a helper, so try until one took part (other
        // tests may hold the team for a while).
        if team().helpers > 0 {
            let helped = (0..200).any(|_| {
                let ran_on_helper = AtomicBool::new(false);
                let caught = catch_unwind(AssertUnwindSafe(|| {
                    for_each_task(16, |_| {
                        work_for(100);
                        if on_helper() {
                            ran_on_helper.store(true, SeqCst);
                            panic!("a task fails on the helper");
                        }
                    })
                }));
                let helped = ran_on_helper.load(SeqCst);
                assert!(!helped || caught.is_err(), "a helper's panic must reach the caller");
                helped
            });
            assert!(helped, "no helper took part in 200 loops of 1.6 ms");
        }
        let total = AtomicUsize::new(0);
        for_each_task(64, |_| {
            total.fetch_add(1, SeqCst);
        });
        assert_eq!(total.load(SeqCst), 64);
    }
}
