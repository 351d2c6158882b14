//! Files used in place: a tensor whose bytes lie in a weight file with the dtype the model wants
//! becomes a CPU tensor over the file's pages, as PyTorch's memory-mapped loading does. Nothing
//! is zero-filled or copied at load time; the pages come from the page cache when first used.
//!
//! A file is mapped copy-on-write (`MAP_PRIVATE`): a write to a weight (none is expected) stays
//! private to the process and never reaches the file. A tensor over the mapping is a `Vec` that
//! must never reach the system allocator: [`MappedAlloc`], the binary's global allocator,
//! recognises pointers into a registered mapping, and the mapping is unmapped when the last
//! tensor in it and the [`Mapping`] itself are dropped. A program that links the library but
//! keeps another global allocator (the library's own unit tests) gets copies:
//! [`in_place_available`] is false there, and [`Mapping::vec`] gives `None`.
//!
//! The contract, which every `unsafe` here leans on:
//! - a `Vec` over a mapping exists only once [`in_place_available`] proved that the global
//!   allocator is [`MappedAlloc`] (an allocation through `std::alloc` reached it), so its free
//!   reaches [`MappedAlloc::dealloc`], which gives the slot an owner back instead of calling the
//!   system allocator;
//! - a registered range stays mapped while it has owners: the [`Mapping`] and each `Vec`;
//! - the bytes are plain values of the element type ([`Plain`]), and nobody writes through a
//!   `Vec` while another view of the same bytes is alive ([`Mapping::vec`]'s caller promises).

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Whether [`MappedAlloc`] is the global allocator: [`UNKNOWN`] until [`in_place_available`]
/// asks the global allocator, then [`YES`] or [`NO`] for the rest of the program.
static INSTALLED: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;
/// How many threads are asking ([`in_place_available`]): only then does an allocation look at
/// its thread's [`PROBE`].
static PROBING: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    /// This thread's question to the global allocator: [`ASKED`] while it allocates to find out
    /// whether that reaches [`MappedAlloc`], which answers [`SEEN`]. Const-initialised and
    /// without a destructor, so reading it never allocates (no recursion into the allocator).
    static PROBE: std::cell::Cell<u8> = const { std::cell::Cell::new(IDLE) };
}
const IDLE: u8 = 0;
const ASKED: u8 = 1;
const SEEN: u8 = 2;
/// How many slots hold a mapping (0: frees take the system allocator's path at once).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// One past the highest slot ever taken: lookups scan no further.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// Serialises taking and clearing slots; lookups read the atomics without it.
static SLOT_LOCK: Mutex<()> = Mutex::new(());

const SLOTS: usize = 128;

/// One mapping: its address range and how many owners (the [`Mapping`], tensors) it has.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    owners: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    owners: AtomicUsize::new(0),
};
static SLOT: [Slot; SLOTS] = [EMPTY; SLOTS];

/// The slot whose mapping holds `ptr`.
fn slot_of(ptr: usize) -> Option<&'static Slot> {
    if ACTIVE.load(Ordering::Acquire) == 0 {
        return None;
    }
    SLOT[..HIGH.load(Ordering::Acquire)].iter().find(|s| {
        let start = s.start.load(Ordering::Acquire);
        start != 0 && ptr >= start && ptr < start + s.len.load(Ordering::Acquire)
    })
}

/// Drops one owner of `slot`; the last one unmaps it.
fn release(slot: &Slot) {
    if slot.owners.fetch_sub(1, Ordering::AcqRel) == 1 {
        let _guard = SLOT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let (start, len) = (
            slot.start.load(Ordering::Acquire),
            slot.len.load(Ordering::Acquire),
        );
        slot.start.store(0, Ordering::Release);
        slot.len.store(0, Ordering::Release);
        ACTIVE.fetch_sub(1, Ordering::AcqRel);
        // SAFETY: the range was mapped by `Mapping::open`; its owners (the `Mapping`, each `Vec`
        // over it) are all gone, so nothing points into it any more, and the slot no longer
        // names it, so no later free takes a new allocation there for one of ours.
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
    }
}

/// The system allocator, plus the release of tensors that live in a mapped file. Install it in
/// a binary with `#[global_allocator]` to load weights in place.
pub struct MappedAlloc;

// SAFETY: every call is forwarded to `System` with its own arguments, except the free and the
// reallocation of a pointer into a registered mapping: those blocks are `Vec`s that
// `Mapping::vec` made, which this allocator (being the global one, see `in_place_available`)
// treats as its own allocations of any layout. Their free drops an owner of the mapping; their
// reallocation copies the bytes asked for into a fresh system block, then drops the owner. No
// mapped block is ever passed to `System`, and no system block lies in a registered range
// (mappings and system blocks are disjoint address ranges while the mapping lives).
unsafe impl GlobalAlloc for MappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if PROBING.load(Ordering::Relaxed) != 0 {
            // `try_with`: a thread being torn down answers nothing rather than panicking.
            let _ = PROBE.try_with(|p| {
                if p.get() == ASKED {
                    p.set(SEEN);
                }
            });
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match slot_of(ptr as usize) {
            Some(slot) => release(slot),
            None => System.dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match slot_of(ptr as usize) {
            Some(slot) => {
                // SAFETY: `realloc`'s caller gives a non-zero `new_size` that, rounded up to
                // `layout.align()`, fits `isize`: a valid layout.
                let new = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
                if !new.is_null() {
                    // SAFETY: `ptr` is a `Vec`'s block of `layout.size()` bytes inside the
                    // mapping (alive: the Vec owns a share), `new` a fresh block of `new_size`
                    // bytes; they cannot overlap. Only then is the share given back; on
                    // failure the old block stays the caller's, as `realloc` promises.
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    release(slot);
                }
                new
            }
            None => System.realloc(ptr, layout, new_size),
        }
    }
}

/// Whether tensors can live in mapped files in this program: whether [`MappedAlloc`] is the
/// global allocator (or the global allocator hands its allocations to it, frees included).
///
/// Asked once, by allocating through `std::alloc` (the global allocator, whatever it is) on
/// this thread and seeing whether that reached [`MappedAlloc::alloc`]. Calling `MappedAlloc`'s
/// methods directly, without installing it, does not make it answer yes: only a `Vec` freed
/// through the global allocator can give a mapped block back.
pub fn in_place_available() -> bool {
    match INSTALLED.load(Ordering::Acquire) {
        YES => true,
        NO => false,
        _ => {
            let yes = global_allocator_is_ours();
            INSTALLED.store(if yes { YES } else { NO }, Ordering::Release);
            yes
        }
    }
}

/// One allocation through the global allocator, asked whether it reached [`MappedAlloc`].
fn global_allocator_is_ours() -> bool {
    let Ok(()) = PROBE.try_with(|p| p.set(ASKED)) else {
        return false;
    };
    PROBING.fetch_add(1, Ordering::Relaxed);
    let layout = Layout::new::<u64>();
    // SAFETY: a non-zero-sized layout; the block is freed below with the same layout. The
    // `black_box` keeps the pair from being optimised away (then nothing would answer: no).
    let block = std::hint::black_box(unsafe { std::alloc::alloc(layout) });
    PROBING.fetch_sub(1, Ordering::Relaxed);
    let seen = PROBE.try_with(|p| p.replace(IDLE)).ok() == Some(SEEN);
    if !block.is_null() {
        // SAFETY: allocated just above by the global allocator with `layout`.
        unsafe { std::alloc::dealloc(block, layout) };
    }
    seen
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type a `Vec` over file bytes may hold: `Copy`, without padding, every bit pattern
/// of its size a value (so any bytes of a file are a valid `T`). Sealed: the weight dtypes.
pub trait Plain: Copy + sealed::Sealed {}
impl Plain for f32 {}
impl Plain for half::f16 {}
impl Plain for half::bf16 {}

/// A whole file mapped copy-on-write.
pub struct Mapping {
    slot: Option<&'static Slot>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; `bytes` hands out shared reads only.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `path` (a regular, non-empty file) and asks the kernel to start reading it ahead.
    ///
    /// # Safety
    ///
    /// The file must not be truncated (or rewritten in place) by anyone while the mapping or a
    /// tensor living in it is alive: a read past the new end raises SIGBUS and kills the
    /// process, as with any memory map (candle marks `MmapedSafetensors::new` unsafe for the
    /// same reason). Files this tool writes are replaced by rename, never rewritten in place,
    /// so they keep their old content for as long as they stay mapped.
    pub unsafe fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::other("file too large to map"))?;
        if len == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file is empty",
            ));
        }
        // SAFETY: a fresh private mapping of an open file; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: advice on the range just mapped; failure only loses the read-ahead.
        unsafe { libc::madvise(ptr, len, libc::MADV_WILLNEED) };
        let slot = Self::register(ptr as usize, len);
        Ok(Self {
            slot,
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// Takes a free slot for the range when the global allocator is ours (none free, or not
    /// ours: the mapping is only read, never handed out as `Vec`s).
    fn register(start: usize, len: usize) -> Option<&'static Slot> {
        if !in_place_available() {
            return None;
        }
        let _guard = SLOT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let i = SLOT
            .iter()
            .position(|s| s.start.load(Ordering::Acquire) == 0)?;
        let slot = &SLOT[i];
        HIGH.fetch_max(i + 1, Ordering::AcqRel);
        slot.owners.store(1, Ordering::Release);
        slot.len.store(len, Ordering::Release);
        slot.start.store(start, Ordering::Release);
        ACTIVE.fetch_add(1, Ordering::AcqRel);
        Some(slot)
    }

    /// The whole file. While a `Vec` from [`Mapping::vec`] may be written, its bytes must not
    /// be read through this slice (see there).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` initialised, readable bytes for as long as `self` owns
        // a share of it (it is unmapped only after `self` and every `Vec` over it are gone).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes `range` as a `Vec<T>` that lives in the mapping, when this program can keep
    /// tensors there ([`in_place_available`]) and the bytes are aligned for `T`; `None`
    /// otherwise (copy them instead). The `Vec` keeps the mapping alive; freeing it (or
    /// growing it, which copies it out) gives its share back.
    ///
    /// # Safety
    ///
    /// The `Vec` owns its bytes as far as Rust knows, but the same bytes stay readable through
    /// [`Mapping::bytes`] and through another `Vec` over an overlapping range. So while anyone
    /// may write through this `Vec` (or the tensor it becomes), nobody may hold a slice of
    /// [`Mapping::bytes`] over `range` or another `Vec` over bytes of it; only reading
    /// everywhere is fine. (Candle writes a tensor's storage in place only through its
    /// `*_set` methods, `inplace_op*` and `Var::set`; a `Var` made from a tensor is a copy.)
    pub unsafe fn vec<T: Plain>(&self, range: std::ops::Range<usize>) -> Option<Vec<T>> {
        let slot = self.slot?;
        let size = std::mem::size_of::<T>();
        if range.end > self.len || range.is_empty() || !range.len().is_multiple_of(size) {
            return None;
        }
        // SAFETY: `range.start < range.end <= len`: inside the mapping (checked above).
        let ptr = unsafe { self.ptr.add(range.start) };
        if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        slot.owners.fetch_add(1, Ordering::AcqRel);
        let n = range.len() / size;
        // SAFETY: `Vec::from_raw_parts` asks for a block of the global allocator with `T`'s
        // alignment, `n * size_of::<T>()` bytes and `n` initialised values:
        // - a slot exists only when `in_place_available` found the global allocator to be
        //   `MappedAlloc`, which takes every block inside a registered mapping as its own,
        //   whatever its layout: its free or reallocation never reaches the system allocator
        //   (see `MappedAlloc`), and it drops the share taken just above;
        // - `ptr` is aligned for `T` (checked), and the `n * size` bytes from it lie inside
        //   the mapping (checked), which stays mapped (`PROT_READ | PROT_WRITE`, private)
        //   while this `Vec` owns its share;
        // - every bit pattern is a `T` (`Plain`), so the file's bytes are `n` valid values;
        // - the caller keeps other views of these bytes from meeting writes (above).
        Some(unsafe { Vec::from_raw_parts(ptr as *mut T, n, n) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        match self.slot {
            Some(slot) => release(slot),
            // SAFETY: never registered, so no `Vec` was made over it, and `bytes` borrows of
            // `self` ended: nothing points into it.
            None => unsafe {
                libc::munmap(self.ptr as *mut libc::c_void, self.len);
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_the_file_and_writes_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        let values: Vec<f32> = (0..1024).map(|i| i as f32 * 0.5).collect();
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, &raw).unwrap();
        // SAFETY: a file of this test's own, not changed while mapped.
        let m = unsafe { Mapping::open(&path) }.unwrap();
        assert_eq!(m.bytes(), raw.as_slice());
        // The unit-test binary keeps the system allocator: no tensors in place here (the
        // integration tests install MappedAlloc and check that path).
        assert!(!in_place_available());
        // SAFETY: no other view of the bytes is written.
        assert!(unsafe { m.vec::<f32>(0..16) }.is_none());
        drop(m);
        assert_eq!(std::fs::read(&path).unwrap(), raw);
        // SAFETY: nothing is mapped (the file does not exist).
        let e = unsafe { Mapping::open(&dir.path().join("missing")) }
            .err()
            .unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }

    /// Calling `MappedAlloc` by hand, where it is not the global allocator, does not make the
    /// library hand out `Vec`s over mappings: the system allocator would free them.
    #[test]
    fn only_the_global_allocator_makes_tensors_in_place() {
        let layout = Layout::new::<[u64; 4]>();
        // SAFETY: a non-zero-sized layout, freed with the same layout by the same allocator.
        unsafe {
            let p = MappedAlloc.alloc(layout);
            assert!(!p.is_null());
            MappedAlloc.dealloc(p, layout);
        }
        assert!(!in_place_available());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        std::fs::write(&path, [0u8; 64]).unwrap();
        // SAFETY: a file of this test's own, not changed while mapped.
        let m = unsafe { Mapping::open(&path) }.unwrap();
        assert!(m.slot.is_none());
        // SAFETY: no other view of the bytes is written.
        assert!(unsafe { m.vec::<f32>(0..64) }.is_none());
    }
}
