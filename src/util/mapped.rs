//! Files used in place: a tensor whose bytes lie in a weight file with the dtype the model wants
//! becomes a CPU tensor over the file's pages, as PyTorch's memory-mapped loading does. Nothing
//! is zero-filled or copied at load time; the pages come from the page cache when first used.
//!
//! A file is mapped copy-on-write (`MAP_PRIVATE`): a write to a weight (none is expected) stays
//! private to the process and never reaches the file. A tensor over the mapping is a `Vec` that
//! must never reach the system allocator: [`MappedAlloc`], the binary's global allocator,
//! recognises pointers into a registered mapping, and the mapping is unmapped when the last
//! tensor in it and the [`Mapping`] itself are dropped. A program that links the library but
//! keeps another global allocator gets copies: [`in_place_available`] is false there.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Whether [`MappedAlloc`] is the global allocator (it says so on its first allocation).
static INSTALLED: AtomicBool = AtomicBool::new(false);
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
        // SAFETY: the range was mapped by `Mapping::open` and nothing points into it any more.
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
    }
}

/// The system allocator, plus the release of tensors that live in a mapped file. Install it in
/// a binary with `#[global_allocator]` to load weights in place.
pub struct MappedAlloc;

// SAFETY: every call is forwarded to `System`, except frees of pointers into a mapping, which
// drop an owner of that mapping instead (the memory was never the system allocator's).
unsafe impl GlobalAlloc for MappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
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
                let new = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    release(slot);
                }
                new
            }
            None => System.realloc(ptr, layout, new_size),
        }
    }
}

/// Whether tensors can live in mapped files in this program.
pub fn in_place_available() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

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

    /// Takes a free slot for the range (none free: the mapping is only read, never shared).
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

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes for as long as `self` owns it.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes `range` as a `Vec<T>` that lives in the mapping, when this program can keep
    /// tensors there and the bytes are aligned for `T`; `None` otherwise (copy them instead).
    pub fn vec<T: Copy>(&self, range: std::ops::Range<usize>) -> Option<Vec<T>> {
        let slot = self.slot?;
        let size = std::mem::size_of::<T>();
        if range.end > self.len || range.is_empty() || !range.len().is_multiple_of(size) {
            return None;
        }
        // SAFETY: `range` lies inside the mapping (checked above).
        let ptr = unsafe { self.ptr.add(range.start) };
        if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        slot.owners.fetch_add(1, Ordering::AcqRel);
        let n = range.len() / size;
        // SAFETY: `n` aligned, initialised `T`s inside a writable private mapping that stays
        // mapped while this Vec is alive (it owns a share of the slot); its free goes to
        // `release` through `MappedAlloc`, never to the system allocator.
        Some(unsafe { Vec::from_raw_parts(ptr as *mut T, n, n) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        match self.slot {
            Some(slot) => release(slot),
            // SAFETY: never registered, so nothing else points into it.
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
        assert!(m.vec::<f32>(0..16).is_none());
        drop(m);
        assert_eq!(std::fs::read(&path).unwrap(), raw);
        // SAFETY: nothing is mapped (the file does not exist).
        let e = unsafe { Mapping::open(&dir.path().join("missing")) }
            .err()
            .unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
