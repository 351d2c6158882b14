//! Files written whole or not at all, as a plain write would leave them otherwise.
//!
//! Every write goes through a temporary file beside the target and a rename, so a crash never
//! leaves half a file. The temporary file is named `.TARGET.infusion-tmp.PID.XXXXXX`: a run that
//! was killed mid-write leaves one behind, and the next write to the same target removes it once
//! its process is gone (never a file of another name, never one of a live process). The target
//! gets the permissions a plain create would give (a new file 0666 less the umask, a replaced
//! file its old mode); a file the user could not write is refused, not replaced; a symbolic link
//! is written through to its target.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Reads a whole file, refusing anything that is not a regular file (after following links): a
/// FIFO or a device would block or never end.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    check_regular(path)?;
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn io_error(path: &Path, kind: std::io::ErrorKind, msg: &str) -> Error {
    Error::io(path, std::io::Error::new(kind, msg.to_string()))
}

/// `Ok` when `path` is a regular file (after following links).
pub fn check_regular(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        Ok(())
    } else if meta.is_dir() {
        Err(io_error(
            path,
            std::io::ErrorKind::InvalidInput,
            "a folder, not a file",
        ))
    } else {
        Err(io_error(
            path,
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    }
}

/// Where a write to `path` lands: the target of a symbolic link (followed to the end), else
/// `path` itself.
fn resolve(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..32 {
        match std::fs::read_link(&p) {
            Ok(target) => {
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                }
            }
            Err(_) => break,
        }
    }
    p
}

fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Checks, before any work, that `path` can be written: its folder exists and takes new files
/// (with room for some data), and it is not a folder nor a file the user could not write.
pub fn check_writable(path: &Path) -> Result<()> {
    let target = resolve(path);
    let dir = folder_of(&target);
    if !dir.is_dir() {
        return Err(io_error(
            path,
            std::io::ErrorKind::NotFound,
            &format!("the folder {} does not exist", dir.display()),
        ));
    }
    check_replaceable(path, &target)?;
    // The folder takes a new file, and room for data (a full disk fails here, not after the
    // work): the temporary file a write would create, with a probe written and flushed.
    let mut probe = temp_file(&target).map_err(|e| match e {
        Error::Io { source, .. } => Error::io(path, source),
        e => e,
    })?;
    probe
        .write_all(&[0u8; 64 * 1024])
        .and_then(|()| probe.as_file().sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Checks that `path`, if it exists, may be replaced (see [`check_writable`], which also
/// checks its folder by writing a probe: once per folder is enough).
pub fn check_output(path: &Path) -> Result<()> {
    check_replaceable(path, &resolve(path))
}

/// A target that exists must be a file the user may write, and not one marked read-only (no
/// write permission for anyone: kept even from root, who could write it).
fn check_replaceable(path: &Path, target: &Path) -> Result<()> {
    let Ok(meta) = std::fs::metadata(target) else {
        return Ok(());
    };
    if meta.is_dir() {
        return Err(io_error(
            path,
            std::io::ErrorKind::InvalidInput,
            "a folder, not a file",
        ));
    }
    // A FIFO or device would block the open below, and a rename would replace it by a file.
    if !meta.is_file() {
        return Err(io_error(
            path,
            std::io::ErrorKind::InvalidInput,
            &format!(
                "{}, not a regular file: outputs are regular files (write elsewhere)",
                special_kind(&meta)
            ),
        ));
    }
    let writable = std::fs::OpenOptions::new().write(true).open(target).is_ok();
    if meta.is_file() && (meta.permissions().readonly() || !writable) {
        return Err(io_error(
            path,
            std::io::ErrorKind::PermissionDenied,
            "read-only: not replaced (make it writable, or write elsewhere)",
        ));
    }
    Ok(())
}

/// What a file that is neither a regular file nor a folder is.
fn special_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    let _ = meta;
    "a special file"
}

/// Refuses, before any work, an output that is one of the inputs or lies inside an input
/// folder (a model, an image folder) where a file of that name already exists: writing it
/// would destroy what the work reads. `inputs` may name files or folders that do not exist.
pub fn check_not_an_input(outputs: &[&Path], inputs: &[&Path]) -> Result<()> {
    let inputs: Vec<(PathBuf, &Path)> = inputs
        .iter()
        .filter_map(|p| Some((p.canonicalize().ok()?, *p)))
        .collect();
    for out in outputs {
        let Ok(target) = resolve(out).canonicalize() else {
            continue; // not there: it can be no input
        };
        if let Some((_, input)) = inputs
            .iter()
            .find(|(full, _)| target == *full || (full.is_dir() && target.starts_with(full)))
        {
            let what = if target == resolve(input).canonicalize().unwrap_or_default() {
                format!("it is the input {}", input.display())
            } else {
                format!("it is a file of the input folder {}", input.display())
            };
            return Err(io_error(
                out,
                std::io::ErrorKind::AlreadyExists,
                &format!("not replaced: {what} (write elsewhere)"),
            ));
        }
    }
    Ok(())
}

/// The prefix of `target`'s temporary files, and that of this process's.
fn temp_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.infusion-tmp.")
}

/// Removes temporary files of `target` left by processes that are gone.
fn remove_stale(target: &Path) {
    let prefix = temp_prefix(target);
    let Ok(entries) = std::fs::read_dir(folder_of(target)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !process_alive(p)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    // Signal 0 checks that the process exists (EPERM: it does, owned by another user).
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_alive(_: u32) -> bool {
    true
}

fn temp_file(target: &Path) -> Result<tempfile::NamedTempFile> {
    let prefix = format!("{}{}.", temp_prefix(target), std::process::id());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Created with this mode less the umask, as `File::create` would.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
        .tempfile_in(folder_of(target))
        .map_err(|e| Error::io(target, e))
}

/// A file being written: its temporary file, renamed onto the target by [`Staged::commit`].
struct Staged {
    path: PathBuf,
    target: PathBuf,
    tmp: tempfile::NamedTempFile,
}

fn stage(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<Staged> {
    let target = resolve(path);
    check_replaceable(path, &target)?;
    remove_stale(&target);
    let mut tmp = temp_file(&target).map_err(|e| match e {
        Error::Io { source, .. } => Error::io(path, source),
        e => e,
    })?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut w)?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    if let Ok(old) = std::fs::metadata(&target) {
        tmp.as_file()
            .set_permissions(old.permissions())
            .map_err(|e| Error::io(path, e))?;
        keep_owner(path, tmp.as_file(), &old)?;
    }
    Ok(Staged {
        path: path.to_path_buf(),
        target,
        tmp,
    })
}

/// A replaced file keeps its owner and group (a file written by root in another user's folder
/// stays theirs); where they cannot be kept, it is not replaced.
#[cfg(unix)]
fn keep_owner(path: &Path, tmp: &std::fs::File, old: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let new = tmp.metadata().map_err(|e| Error::io(path, e))?;
    if (new.uid(), new.gid()) == (old.uid(), old.gid()) {
        return Ok(());
    }
    std::os::unix::fs::fchown(tmp, Some(old.uid()), Some(old.gid())).map_err(|e| {
        io_error(
            path,
            e.kind(),
            &format!(
                "not replaced: it belongs to user {} group {}, which a new file cannot keep \
                 ({e})",
                old.uid(),
                old.gid()
            ),
        )
    })
}

#[cfg(not(unix))]
fn keep_owner(_: &Path, _: &std::fs::File, _: &std::fs::Metadata) -> Result<()> {
    Ok(())
}

impl Staged {
    fn commit(self) -> Result<()> {
        let path = self.path;
        self.tmp
            .persist(&self.target)
            .map_err(|e| Error::io(&path, e.error))?;
        Ok(())
    }
}

/// Writes `path` whole or not at all (see the module documentation).
/// Writes `rows` as a CSV file (a header from the first row's fields) at `path`, atomically.
pub fn write_csv<R: serde::Serialize>(path: &Path, rows: &[R]) -> Result<()> {
    let mut w = csv::Writer::from_writer(vec![]);
    for r in rows {
        w.serialize(r).map_err(|e| Error::config(path, e))?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::config(path, e.to_string()))?;
    write_atomic(path, |out| {
        out.write_all(&bytes).map_err(|e| Error::io(path, e))
    })
}

pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    stage(path, write)?.commit()
}

/// Writes several files as one: every one is written to its temporary file first, and only when
/// all are complete are they renamed into place. A failure before that leaves none of them; the
/// renames themselves do not fail for want of space.
pub fn write_all_atomic(files: &[(PathBuf, Vec<u8>)]) -> Result<()> {
    let staged = files
        .iter()
        .map(|(path, bytes)| stage(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e))))
        .collect::<Result<Vec<_>>>()?;
    for s in staged {
        s.commit()?;
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn write(p: &Path, bytes: &'static [u8]) -> Result<()> {
        write_atomic(p, |w| w.write_all(bytes).map_err(|e| Error::io("x", e)))
    }

    /// A new file gets what `File::create` gives under the process's umask (not tempfile's
    /// 0600); a replaced file keeps its mode. (tests/integration/cli.rs checks 0644 under umask
    /// 022 end to end.)
    #[test]
    fn permissions_are_those_of_a_plain_create() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let new = dir.path().join("new.png");
        write(&new, b"x").unwrap();
        assert_eq!(mode(&new), mode(&plain));

        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o640)).unwrap();
        write(&new, b"y").unwrap();
        assert_eq!(mode(&new), 0o640);
        assert_eq!(std::fs::read(&new).unwrap(), b"y");
    }

    /// A read-only file is refused (even as root), a link is written through to its target, a
    /// folder is not a file.
    #[test]
    fn read_only_targets_are_refused_and_links_followed() {
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro.png");
        std::fs::write(&ro, b"mine").unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = write(&ro, b"new").unwrap_err().to_string();
        assert!(e.contains("read-only: not replaced"), "{e}");
        assert_eq!(std::fs::read(&ro).unwrap(), b"mine");
        assert!(check_writable(&ro).is_err());
        let target = dir.path().join("real.png");
        std::fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink("real.png", &link).unwrap();
        write(&link, b"through").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"through");
        let e = write(dir.path(), b"x").unwrap_err().to_string();
        assert!(e.contains("a folder"), "{e}");
        assert!(check_writable(&dir.path().join("nope/x.png")).is_err());
        assert!(check_writable(&dir.path().join("fine.png")).is_ok());
        assert!(
            !dir.path().join("fine.png").exists(),
            "the check leaves nothing"
        );
    }

    /// Issue 21, item 15: a FIFO or a device given as an output is refused (before it can block
    /// the open or be replaced by a file), and stays what it was.
    #[test]
    fn special_files_are_not_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.png");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        for target in [fifo.as_path(), Path::new("/dev/null")] {
            let e = check_writable(target).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
            let e = write(target, b"x").unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    }

    /// Issue 21, item 18: outputs that are inputs, or existing files inside an input folder,
    /// are refused; new files beside them are not.
    #[test]
    fn an_input_is_not_an_output() {
        let dir = tempfile::tempdir().unwrap();
        let concept = dir.path().join("pot.safetensors");
        std::fs::write(&concept, b"c").unwrap();
        let images = dir.path().join("imgs");
        std::fs::create_dir(&images).unwrap();
        std::fs::write(images.join("a.png"), b"i").unwrap();
        let link = dir.path().join("alias.safetensors");
        std::os::unix::fs::symlink("pot.safetensors", &link).unwrap();
        let inputs = [concept.as_path(), images.as_path()];
        for out in [&concept, &images.join("a.png"), &link] {
            let e = check_not_an_input(&[out], &inputs).unwrap_err().to_string();
            assert!(e.contains("not replaced: it is"), "{e}");
        }
        let fine = [dir.path().join("new.png"), images.join("new.png")];
        for out in &fine {
            check_not_an_input(&[out.as_path()], &inputs).unwrap();
        }
    }

    /// Issue 21, item 18: a replaced file keeps its owner and group (run as root, a write over
    /// another user's file made it root's). Only root can make a file of another owner, so the
    /// test needs root (it is in this project's CI and sandbox) and says so otherwise.
    #[test]
    fn a_replaced_file_keeps_its_owner() {
        use std::os::unix::fs::MetadataExt;
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: cannot make a file of another owner; skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("theirs.png");
        std::fs::write(&theirs, b"old").unwrap();
        std::os::unix::fs::chown(&theirs, Some(1234), Some(5678)).unwrap();
        write(&theirs, b"new").unwrap();
        let meta = std::fs::metadata(&theirs).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
        assert_eq!(std::fs::read(&theirs).unwrap(), b"new");
    }

    /// Temporary files of a dead process are recognised by name and removed by the next write
    /// to the same target; a user's file and a live process's temporary file are kept.
    #[test]
    fn stale_temporary_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("c.safetensors");
        // A pid that cannot be alive (above the kernel's pid_max of 2^22).
        let stale = dir
            .path()
            .join(".c.safetensors.infusion-tmp.99999999.AbC123");
        let live = dir.path().join(format!(
            ".c.safetensors.infusion-tmp.{}.XyZ",
            std::process::id()
        ));
        let users = dir.path().join(".c.safetensors.notes");
        for f in [&stale, &live, &users] {
            std::fs::write(f, b"x").unwrap();
        }
        write(&target, b"data").unwrap();
        assert!(!stale.exists());
        assert!(live.exists() && users.exists());
    }

    /// A set of files is written whole: when one cannot be written, none of them appears.
    #[test]
    fn a_set_of_files_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.png");
        let b = dir.path().join("missing/b.png");
        let e = write_all_atomic(&[(a.clone(), b"a".to_vec()), (b, b"b".to_vec())]);
        assert!(e.is_err());
        assert!(!a.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temporary file left"
        );
        let c = dir.path().join("c.png");
        write_all_atomic(&[(a.clone(), b"a".to_vec()), (c.clone(), b"c".to_vec())]).unwrap();
        assert_eq!(
            (std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap()),
            (b"a".to_vec(), b"c".to_vec())
        );
    }
}
