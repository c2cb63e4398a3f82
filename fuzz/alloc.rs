//! A counting global allocator: per thread, the heap bytes live and their peak since the last
//! [`measure`], so each fuzz input's peak allocation can be checked against its target's bound.
//!
//! Counts are per thread (a `const` thread-local `Cell`, which needs no allocation and no
//! destructor), so tests running in parallel do not disturb each other; the parsers and decoders
//! fuzzed here allocate and free on the calling thread. A `realloc` counts as its new size minus its
//! old one. Any single allocation over `REFUSE_OVER` fails, which aborts the process: a fuzz input
//! asking for that much is a finding, and the machine should not swap while it is found.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Larger single allocations fail (the process aborts, and the fuzzer's abort handler saves the
/// input). 4 GiB unless `KILN_FUZZ_REFUSE_OVER` (bytes) says otherwise: set lower, it makes a large
/// allocation abort where it happens, for a debugger (`break abort`) to show who made it.
static REFUSE_OVER: AtomicUsize = AtomicUsize::new(4 << 30);

/// Reads `KILN_FUZZ_REFUSE_OVER`, once, at startup.
pub fn configure() {
    if let Some(bytes) = std::env::var("KILN_FUZZ_REFUSE_OVER").ok().and_then(|v| v.parse().ok()) {
        REFUSE_OVER.store(bytes, Ordering::Relaxed);
    }
}

fn refused(size: usize) -> bool {
    size > REFUSE_OVER.load(Ordering::Relaxed)
}

/// The allocator; installed with `#[global_allocator]` in `main.rs`.
pub struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: during a thread's teardown the slots may be gone; those bytes are not ours.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if refused(layout.size()) {
            return std::ptr::null_mut();
        }
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if refused(layout.size()) {
            return std::ptr::null_mut();
        }
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if refused(new_size) {
            return std::ptr::null_mut();
        }
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        new
    }
}

/// Runs `f` and returns its result with the peak of this thread's heap above where it started, in
/// bytes (what `f` held at its fullest, including what it returns).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let result = f();
    let peak = PEAK.with(Cell::get);
    (result, (peak - start).max(0) as usize)
}
