//! kiln's fuzzer: an in-process mutation fuzzer, on stable Rust, for what kiln reads from
//! producers: request and cancel bodies, prompts, `traceparent` headers, image headers and the
//! JPEG/PNG/WebP decoders (the targets are in `targets.rs`).
//!
//! Each input is a mutant of one in the target's corpus (its committed seeds, `fuzz/corpus/` and
//! `schemas/examples/`, plus what this run found): it is run under `catch_unwind`, with a counting
//! allocator measuring its peak heap, and a finding is a panic, a broken invariant, a peak over the
//! target's bound, or (outside tests) an input slower than the target's time limit. Inputs that
//! behave in a way not seen before (error code and message shape, heap size class) join the corpus,
//! so the run moves away from its seeds in the directions where the code does something different.
//! There is no coverage instrumentation (that needs a nightly toolchain or a separate instrumented
//! build of every crate; see ARCHITECTURE.md, "Crates, and why these"). An abort (stack overflow,
//! allocation failure) leaves the input that caused it in `target/fuzz/<target>/last-input`.
//!
//! `scripts/fuzz.sh` runs it; `cargo nextest run` runs its tests, which replay every seed and fuzz
//! each target briefly with a fixed seed.
//!
//! ```text
//! cargo run --example fuzz -- run [--inputs N] [--seed S] [--keep DIR] [TARGET..]
//! cargo run --example fuzz -- replay [--target T] [FILE..]
//! cargo run --example fuzz -- list
//! ```

mod alloc;
mod mutate;
mod targets;

use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use mutate::Rng;
use targets::Target;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// At most this many inputs join a run's corpus (beyond its seeds).
const MAX_FOUND: usize = 4096;

#[derive(Parser)]
#[command(about = "Fuzz kiln's request parser, tokenizer, image header checks and decoders")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fuzz the targets named (all by default), one after the other.
    Run {
        /// Inputs per target.
        #[arg(long, default_value_t = 100_000)]
        inputs: u64,
        /// The random seed (a run is repeatable: same seed, same inputs).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write the inputs that joined the corpus under DIR/<target>/.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Targets; all when none is named.
        targets: Vec<String>,
    },
    /// Run each seed of a target (all targets by default), or the FILEs given, and report.
    Replay {
        /// Only this target (all of them when absent, FILEs too).
        #[arg(long)]
        target: Option<String>,
        /// Inputs to run instead of the seeds.
        files: Vec<PathBuf>,
    },
    /// The targets and what they exercise.
    List,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    alloc::configure();
    capture_panics();
    let mut failed = false;
    match cli.command {
        Command::List => {
            for target in targets::TARGETS {
                println!("{:<14} {}", target.name, target.about);
            }
        }
        Command::Run {
            inputs,
            seed,
            keep,
            targets: names,
        } => {
            for target in selected(&names)? {
                abort_guard::install(&work_dir().join(target.name))?;
                let report = fuzz(target, inputs, seed, keep.as_deref(), true)?;
                println!("{}", report.summary());
                failed |= !report.findings.is_empty();
            }
        }
        Command::Replay { target, files } => {
            let chosen = selected(target.as_slice())?;
            for target in chosen {
                let inputs = if files.is_empty() {
                    seeds(target)?
                } else {
                    files
                        .iter()
                        .map(|f| Ok((f.clone(), std::fs::read(f)?)))
                        .collect::<anyhow::Result<_>>()?
                };
                for (path, input) in &inputs {
                    let run = execute(target, input);
                    println!("{}: {} ({} bytes of heap)", path.display(), run.describe(), run.peak);
                    failed |= run.finding(target, true).is_some();
                }
            }
        }
    }
    if failed {
        eprintln!("findings: see above");
        std::process::exit(1);
    }
    Ok(())
}

fn selected(names: &[String]) -> anyhow::Result<Vec<&'static Target>> {
    if names.is_empty() {
        return Ok(targets::TARGETS.iter().collect());
    }
    names
        .iter()
        .map(|n| targets::by_name(n).ok_or_else(|| anyhow::anyhow!("no target {n:?}; `list` names them")))
        .collect()
}

/// A target's seeds, in a fixed order.
fn seeds(target: &Target) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut seeds = Vec::new();
    for (dir, prefix) in target.seeds {
        let dir = targets::root().join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
            .collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path)?;
            seeds.push((path, data));
        }
    }
    anyhow::ensure!(!seeds.is_empty(), "target {} has no seeds", target.name);
    Ok(seeds)
}

/// One input's run.
struct Execution {
    /// `Ok(Ok((signature, bound)))`, `Ok(Err(broken invariant))` or `Err(panic message)`.
    result: Result<targets::Outcome, String>,
    peak: usize,
    elapsed: Duration,
    /// A panic that kiln caught itself (`imaging::decode` turns decoder panics into
    /// `invalid_image`): not a finding, but reported, since it is a bug upstream.
    contained: Option<String>,
}

impl Execution {
    fn describe(&self) -> String {
        match &self.result {
            Ok(Ok((signature, bound))) => format!("{signature} (bound {bound})"),
            Ok(Err(broken)) => format!("INVARIANT: {broken}"),
            Err(panic) => format!("PANIC: {panic}"),
        }
    }

    /// What is wrong with this run, if anything: its kind, what tells it apart from other findings
    /// of that kind (the outcome's signature; a panic's message and place), and the details.
    /// Slowness counts only when `timed` (not in tests, which may share a loaded machine).
    fn finding(&self, target: &Target, timed: bool) -> Option<(&'static str, String)> {
        match &self.result {
            Err(panic) => Some(("panic", panic.clone())),
            Ok(Err(broken)) => Some(("invariant", broken.clone())),
            Ok(Ok((signature, bound))) if self.peak > *bound => Some((
                "allocation",
                format!("peak heap {} bytes over the bound {bound} ({signature})", self.peak),
            )),
            Ok(Ok((signature, _))) if timed && self.elapsed > target.max_time => {
                Some(("slow", format!("{:?} ({signature})", self.elapsed)))
            }
            Ok(Ok(_)) => None,
        }
    }
}

fn execute(target: &Target, input: &[u8]) -> Execution {
    // Before anything is measured: the default hook would print the panic, and with RUST_BACKTRACE
    // set, symbolicate a backtrace (over 100 MiB of debug information read on the first panic).
    capture_panics();
    targets::warm_up();
    abort_guard::current(input);
    let started = Instant::now();
    let (result, peak) = alloc::measure(|| {
        CAPTURING.with(|c| c.set(true));
        let result = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
        CAPTURING.with(|c| c.set(false));
        result
    });
    let elapsed = started.elapsed();
    let message = PANIC_MESSAGE.with(|m| m.take());
    let (result, contained) = match result {
        Ok(outcome) => (Ok(outcome), message),
        Err(_) => (Err(message.unwrap_or_else(|| "a panic".to_owned())), None),
    };
    Execution {
        result,
        peak,
        elapsed,
        contained,
    }
}

/// What a run of one target found.
struct Report {
    target: &'static str,
    inputs: u64,
    elapsed: Duration,
    seeds: usize,
    corpus: usize,
    behaviours: usize,
    max_peak: usize,
    max_ratio: f64,
    slowest: Duration,
    findings: Vec<(String, String)>,
    /// Where the panics that kiln contained happened (see [`Execution::contained`]).
    contained: std::collections::BTreeSet<String>,
}

impl Report {
    fn summary(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let findings = if self.findings.is_empty() {
            "none".to_owned()
        } else {
            self.findings
                .iter()
                .map(|(kind, detail)| format!("{kind}: {detail}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let contained = match self.contained.len() {
            0 => String::new(),
            n => format!(
                "; decoder panics contained (answered invalid_image): {n} places: {}",
                self.contained.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        };
        format!(
            "{}: {} inputs in {secs:.1} s ({:.0}/s), corpus {} -> {}, {} behaviours, peak heap {:.2} MiB (at most {:.2} of its bound), slowest {:.1} ms; findings: {findings}{contained}",
            self.target,
            self.inputs,
            self.inputs as f64 / secs.max(1e-9),
            self.seeds,
            self.corpus,
            self.behaviours,
            self.max_peak as f64 / f64::from(1 << 20),
            self.max_ratio,
            self.slowest.as_secs_f64() * 1e3,
        )
    }
}

/// Fuzz `target` with `inputs` inputs: its seeds first, then mutants. `interactive`: a run from the
/// command line, with progress lines, where a slow input is a finding.
fn fuzz(
    target: &'static Target,
    inputs: u64,
    seed: u64,
    keep: Option<&Path>,
    interactive: bool,
) -> anyhow::Result<Report> {
    let seeds = seeds(target)?;
    let mut corpus: Vec<Vec<u8>> = seeds.into_iter().map(|(_, data)| data).collect();
    let mut report = Report {
        target: target.name,
        inputs: 0,
        elapsed: Duration::ZERO,
        seeds: corpus.len(),
        corpus: corpus.len(),
        behaviours: 0,
        max_peak: 0,
        max_ratio: 0.0,
        slowest: Duration::ZERO,
        findings: Vec::new(),
        contained: std::collections::BTreeSet::new(),
    };
    let mut seen = HashSet::new();
    let mut finding_kinds = HashSet::new();
    let mut rng = Rng::new(seed ^ fxhash(target.name.as_bytes()));
    let started = Instant::now();
    let mut last_progress = started;
    let found_dir = work_dir().join(target.name);
    for i in 0..inputs {
        let input = match corpus.get(i as usize).filter(|_| i < report.seeds as u64) {
            Some(seed_input) => seed_input.clone(),
            None => {
                let parent = &corpus[rng.below(corpus.len())];
                mutate::mutate(parent, &corpus, target.format, &mut rng, target.max_len)
            }
        };
        let run = execute(target, &input);
        report.inputs += 1;
        report.max_peak = report.max_peak.max(run.peak);
        report.slowest = report.slowest.max(run.elapsed);
        if let Some(panic) = &run.contained {
            let place = panic.rsplit(" at ").next().unwrap_or(panic);
            // `…/registry/src/<index>/zune-jpeg-0.5.15/src/mcu.rs:897:80` → from the crate's name.
            let short = place
                .split_once("/registry/src/")
                .and_then(|(_, rest)| rest.split_once('/'))
                .map_or(place, |(_, crate_path)| crate_path);
            report.contained.insert(short.to_owned());
        }
        if let Some((kind, detail)) = run.finding(target, interactive) {
            // One report per kind and outcome: the same bug is found many times, with other numbers.
            let key = match &run.result {
                Ok(Ok((signature, _))) => format!("{kind} {signature}"),
                _ => format!("{kind} {}", detail.lines().next().unwrap_or_default()),
            };
            if finding_kinds.insert(key) {
                std::fs::create_dir_all(&found_dir)?;
                let path = found_dir.join(format!("{kind}-{:016x}", fxhash(&input)));
                std::fs::write(&path, &input)?;
                eprintln!("{}: {kind}: {detail}\n  input saved as {}", target.name, path.display());
                report
                    .findings
                    .push((kind.to_owned(), format!("{detail} [{}]", path.display())));
            }
            continue;
        }
        let Ok(Ok((signature, bound))) = &run.result else {
            unreachable!("no finding means a clean run")
        };
        report.max_ratio = report.max_ratio.max(run.peak as f64 / *bound as f64);
        let behaviour = format!("{signature} | heap 2^{}", targets::bucket(run.peak));
        if seen.insert(behaviour) && i >= report.seeds as u64 && corpus.len() < report.seeds + MAX_FOUND {
            if let Some(dir) = keep {
                let dir = dir.join(target.name);
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join(format!("{:016x}", fxhash(&input))), &input)?;
            }
            corpus.push(input);
        }
        if interactive && last_progress.elapsed() > Duration::from_secs(30) {
            last_progress = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{}: {} inputs, {:.0}/s, corpus {}, {} behaviours",
                target.name,
                i + 1,
                (i + 1) as f64 / secs,
                corpus.len(),
                seen.len()
            );
        }
    }
    report.elapsed = started.elapsed();
    report.corpus = corpus.len();
    report.behaviours = seen.len();
    Ok(report)
}

/// Where findings and the abort guard's file go: `target/fuzz/<target>/`.
fn work_dir() -> PathBuf {
    targets::root().join("target/fuzz")
}

/// FNV-1a: names files of inputs and mixes the target's name into the seed.
fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

thread_local! {
    static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static PANIC_MESSAGE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Panics inside a fuzz input are recorded (message and place), not printed; any other panic (a
/// failing test's) goes to the hook that was there before.
fn capture_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(std::cell::Cell::get) {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let place = info.location().map(|l| l.to_string()).unwrap_or_default();
                PANIC_MESSAGE.with(|m| *m.borrow_mut() = Some(format!("{message} at {place}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// Saves the input being run when the process aborts (stack overflow, allocation failure), which
/// `catch_unwind` cannot catch: a SIGABRT handler writes it to a file opened beforehand.
mod abort_guard {
    use std::os::fd::IntoRawFd;
    use std::path::Path;
    use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicUsize, Ordering};

    static FD: AtomicI32 = AtomicI32::new(-1);
    static INPUT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
    static LEN: AtomicUsize = AtomicUsize::new(0);

    /// From now on, an abort writes the input being run to `dir/last-input`.
    pub fn install(dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let file = std::fs::File::create(dir.join("last-input"))?;
        let old = FD.swap(file.into_raw_fd(), Ordering::SeqCst);
        if old >= 0 {
            // SAFETY: `old` is a descriptor this module opened and nothing else uses.
            unsafe { libc::close(old) };
        }
        // SAFETY: `on_abort` only calls async-signal-safe functions.
        unsafe { libc::signal(libc::SIGABRT, on_abort as *const () as libc::sighandler_t) };
        Ok(())
    }

    /// The input about to run (it must live until the next call).
    pub fn current(input: &[u8]) {
        LEN.store(0, Ordering::SeqCst);
        INPUT.store(input.as_ptr().cast_mut(), Ordering::SeqCst);
        LEN.store(input.len(), Ordering::SeqCst);
    }

    extern "C" fn on_abort(signal: libc::c_int) {
        let fd = FD.load(Ordering::SeqCst);
        let (ptr, len) = (INPUT.load(Ordering::SeqCst), LEN.load(Ordering::SeqCst));
        // SAFETY: write(2) and signal(2)/raise(3) are async-signal-safe; `ptr..ptr+len` is the input
        // that was running, still alive since the abort happened inside its run.
        unsafe {
            if fd >= 0 && !ptr.is_null() {
                libc::write(fd, ptr.cast(), len);
            }
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
}

#[cfg(test)]
mod tests {
    //! In CI (`cargo nextest run --tests`): every seed replays cleanly, the bombs are refused from
    //! their headers without allocating, and each target survives a short fixed-seed fuzz run.

    use kiln::domain::ErrorCode;
    use kiln::imaging::{decode_rgb, probe_dimensions};

    use super::*;
    use targets::{header_bound, production_limits, request_bound};

    fn target(name: &str) -> &'static Target {
        targets::by_name(name).unwrap()
    }

    /// Every seed of every target: no panic, no broken invariant, within its allocation bound.
    #[test]
    fn every_seed_replays_cleanly() {
        for target in targets::TARGETS {
            let seeds = seeds(target).unwrap();
            for (path, input) in &seeds {
                let run = execute(super::targets::by_name(target.name).unwrap(), input);
                assert!(
                    run.finding(target, false).is_none(),
                    "{}: {}: {} (peak {} bytes)",
                    target.name,
                    path.display(),
                    run.describe(),
                    run.peak
                );
            }
        }
    }

    fn bombs() -> Vec<(PathBuf, Vec<u8>)> {
        ["decode_png", "decode_jpeg", "decode_webp"]
            .into_iter()
            .flat_map(|t| seeds(target(t)).unwrap())
            .filter(|(path, _)| path.file_name().unwrap().to_string_lossy().contains("bomb-"))
            .collect()
    }

    /// PNG, JPEG and WebP files whose header announces more pixels than the limits (60000x60000,
    /// a 65500x65500 SOF, a 16383x16383 VP8X canvas, ..) are refused as `image_too_large` with
    /// next to no allocation; PNGs whose metadata inflates to 64 MiB are refused without inflating it.
    #[test]
    fn bombs_are_refused_from_their_headers_before_anything_is_allocated() {
        let limits = production_limits();
        let bombs = bombs();
        assert!(bombs.len() >= 10, "{} bombs", bombs.len());
        for (path, input) in &bombs {
            let name = path.file_name().unwrap().to_string_lossy();
            let (probed, probe_peak) = alloc::measure(|| probe_dimensions(input, &limits, "image"));
            let (decoded, decode_peak) = alloc::measure(|| decode_rgb(input, &limits, "image").map(|i| i.dimensions()));
            let bound = header_bound(input.len());
            assert!(
                probe_peak <= bound && decode_peak <= bound,
                "{name}: {probe_peak} / {decode_peak} bytes"
            );
            if name.starts_with("bomb-") {
                assert_eq!(probed.unwrap_err().code, ErrorCode::ImageTooLarge, "{name}");
                assert_eq!(decoded.unwrap_err().code, ErrorCode::ImageTooLarge, "{name}");
            } else {
                // Metadata bombs: a small picture with a huge colour profile or text.
                assert!(
                    probe_peak < 4 << 20 && decode_peak < 4 << 20,
                    "{name}: {probe_peak} / {decode_peak}"
                );
            }
        }
    }

    /// A body that serde_json would turn into a tree many times its size (a long array of zeros
    /// anywhere in it; as `style`; a style blend of thousands of keys; as `prompt`) is refused
    /// holding at most three times its size (it was 16 to 40 times).
    #[test]
    fn a_request_body_never_costs_more_than_three_times_its_size_to_parse() {
        let zeros = vec!["0"; 200_000].join(",");
        let keys = (0..100_000).map(|i| format!("\"{i}\":1")).collect::<Vec<_>>().join(",");
        let head = r#"{"version":1,"request_id":"r","user_id":"u","model":"m""#;
        for body in [
            format!(r#"{head},"extra":[{zeros}]}}"#),
            format!(r#"[{zeros}]"#),
            format!(r#"{head},"params":{{"style":[{zeros}]}}}}"#),
            format!(r#"{head},"params":{{"style":{{{keys}}}}}}}"#),
            format!(r#"{head},"params":{{"prompt":[{zeros}]}}}}"#),
            format!(r#"{head},"tier":[{zeros}]}}"#),
        ] {
            let run = execute(target("request"), body.as_bytes());
            assert!(
                run.peak <= request_bound(body.len()),
                "{}..: {} bytes of heap for a body of {}: {}",
                &body[..80],
                run.peak,
                body.len(),
                run.describe()
            );
            assert!(run.finding(target("request"), false).is_none(), "{}", run.describe());
        }
    }

    /// The longest word a prompt can hold (MAX_PROMPT_BYTES) tokenizes in well under a second (a
    /// few milliseconds; BPE is quadratic in a word's length).
    #[test]
    fn the_longest_one_word_prompt_is_cheap() {
        for word in [
            "a".repeat(4096),
            "ab".repeat(2048),
            "\u{e9}".repeat(2048),
            "\u{1F600}".repeat(1024),
        ] {
            let run = execute(target("prompt"), word.as_bytes());
            assert!(run.finding(target("prompt"), false).is_none(), "{}", run.describe());
            assert!(run.elapsed < Duration::from_secs(1), "{:?}", run.elapsed);
        }
    }

    /// A few seconds of fuzzing per target with a fixed seed, as CI's smoke run: it must find
    /// nothing (a finding here is reproducible: `scripts/fuzz.sh --inputs N --seed 2024 TARGET`).
    fn short_run(name: &str, inputs: u64) {
        let report = fuzz(target(name), inputs, 2024, None, false).unwrap();
        assert!(report.findings.is_empty(), "{}", report.summary());
        assert!(
            report.corpus > report.seeds,
            "no input behaved differently: {}",
            report.summary()
        );
    }

    #[test]
    fn short_run_request() {
        short_run("request", 20000);
    }

    #[test]
    fn short_run_cancel() {
        short_run("cancel", 20000);
    }

    #[test]
    fn short_run_prompt() {
        short_run("prompt", 2000);
    }

    #[test]
    fn short_run_traceparent() {
        short_run("traceparent", 20000);
    }

    #[test]
    fn short_run_image_header() {
        short_run("image_header", 4000);
    }

    #[test]
    fn short_run_decode_png() {
        short_run("decode_png", 3000);
    }

    #[test]
    fn short_run_decode_jpeg() {
        short_run("decode_jpeg", 20000);
    }

    #[test]
    fn short_run_decode_webp() {
        short_run("decode_webp", 20000);
    }
}
