//! Output files, written so that a failed run loses nothing.
//!
//! [`PendingOutput::create`] checks the destination before any work (not an input, not a
//! directory or device, not read-only) and creates a temporary file beside it;
//! [`PendingOutput::commit`] flushes it to disk and renames it over the destination, which is the
//! one moment the destination changes. A pending output that is dropped uncommitted (any error
//! on the way) removes its temporary file and nothing else. Several outputs go through
//! [`commit_all`]: every file is flushed before the first rename, so that a full disk replaces
//! none of them. A signal that ends the run (Ctrl-C) removes the temporary files too
//! ([`interrupt`]).

use super::interrupt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Identity of a file: device and inode where the platform has them (so that two paths
/// through symbolic or hard links compare equal), else the canonical path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileId(#[cfg(unix)] (u64, u64), #[cfg(not(unix))] PathBuf);

/// The identity of the file at `path` (links followed), `None` if there is none.
fn file_id(path: &Path) -> Option<FileId> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).ok().map(|m| FileId((m.dev(), m.ino())))
    }
    #[cfg(not(unix))]
    {
        fs::canonicalize(path).ok().map(FileId)
    }
}

/// An output file being written: a temporary file in the destination's directory.
pub struct PendingOutput {
    /// The flag and path as given, for messages.
    label: String,
    /// The file the output replaces or creates (symbolic links resolved).
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    /// `tmp` registered for removal on an interrupting signal (see [`interrupt`]).
    tracked: interrupt::Tracked,
}

impl PendingOutput {
    /// Checks that `path` can take the output and is none of `inputs` (flag, path), then creates
    /// the temporary file. `flag` names the output in messages.
    pub fn create(flag: &str, path: &Path, inputs: &[(&str, &Path)]) -> Result<PendingOutput, String> {
        let label = format!("{flag} {}", path.display());
        let say = |msg: &dyn std::fmt::Display| format!("{label}: {msg}");
        let existing = match fs::symlink_metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(say(&e)),
        };
        // write through a symbolic link: the file it names is replaced, the link stays
        let dest = match &existing {
            Some(m) if m.file_type().is_symlink() => {
                fs::canonicalize(path).map_err(|e| say(&format!("cannot follow the symbolic link ({e})")))?
            }
            _ => path.to_path_buf(),
        };
        if let Ok(m) = fs::metadata(&dest) {
            if m.is_dir() {
                return Err(say(&"is a directory"));
            }
            if !m.is_file() {
                return Err(say(&"exists and is not a regular file"));
            }
            let id = file_id(&dest);
            for (input_flag, input) in inputs {
                if id.is_some() && file_id(input) == id {
                    return Err(say(&format!("is the same file as {input_flag} {}", input.display())));
                }
            }
            if m.permissions().readonly() {
                return Err(say(&"exists and is read-only"));
            }
            // a file this user could not write is not replaced either (opening it for writing,
            // without truncating, changes nothing)
            OpenOptions::new().write(true).open(&dest).map_err(|e| say(&format!("cannot be written ({e})")))?;
        }
        // `new/` names a directory, which the file would not become: refused now, not after the
        // computation (Path::file_name drops the trailing separator)
        let raw = path.as_os_str().to_string_lossy();
        if raw.ends_with(std::path::is_separator) {
            return Err(say(&"names a directory (ends with a path separator)"));
        }
        // `x/.` and `x/..` name directories too, but Path drops a trailing `.` (file_name of
        // `nodir/.` is `nodir`, whose temporary file would go in `.` and fail only at the rename)
        if matches!(raw.rsplit(std::path::is_separator).next(), Some("." | "..")) {
            return Err(say(&"names a directory (ends with . or ..)"));
        }
        let name = dest.file_name().ok_or_else(|| say(&"not a file name"))?.to_string_lossy().into_owned();
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (tmp, file, tracked) = create_temp(&dir, &name).map_err(|e| say(&e))?;
        if let Ok(m) = fs::metadata(&dest) {
            keep_owner_and_mode(&file, &m);
        }
        Ok(PendingOutput { label, dest, tmp, file: Some(file), tracked })
    }

    /// Whether two outputs would replace the same file: the destinations are one existing file
    /// (by identity), or their directories are one and their names are equal, or equal but for
    /// case where that directory ignores case ([`folds_case`]: macOS and Windows usually, FAT or
    /// ext4 with `casefold` on Linux).
    pub fn same_destination(&self, other: &PendingOutput) -> bool {
        let dir = |p: &Path| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if let (Some(a), Some(b)) = (file_id(&self.dest), file_id(&other.dest)) {
            if a == b {
                return true;
            }
        }
        if file_id(&dir(&self.dest)) != file_id(&dir(&other.dest)) {
            return false;
        }
        match (self.dest.file_name(), other.dest.file_name()) {
            (Some(a), Some(b)) if a == b => true,
            // only then the probe: it looks a file up, the names' comparison does not
            (Some(a), Some(b)) => names_fold_equal(a, b) && folds_case(&self.tmp),
            _ => false,
        }
    }

    /// A message naming this output.
    pub fn error(&self, e: impl std::fmt::Display) -> String {
        format!("{}: {e}", self.label)
    }

    /// A buffered writer into the temporary file.
    pub fn writer(&mut self) -> BufWriter<&File> {
        BufWriter::new(self.file.as_ref().expect("the file is open until commit"))
    }

    /// Flushes the temporary file to disk (its data and size), once.
    fn sync(&mut self) -> Result<(), String> {
        if let Some(file) = self.file.take() {
            file.sync_all().map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    /// Flushes the temporary file to disk and renames it over the destination.
    pub fn commit(mut self) -> Result<(), String> {
        self.sync()?;
        fs::rename(&self.tmp, &self.dest).map_err(|e| self.error(e))?;
        // make the rename itself durable (best effort: the data is in place either way)
        #[cfg(unix)]
        {
            // a bare file name's parent is the empty path: the current directory
            let dir = self.dest.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        interrupt::untrack(&mut self.tracked);
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        // uncommitted: remove the temporary file (never the destination)
        if !self.tmp.as_os_str().is_empty() {
            self.file = None;
            let _ = fs::remove_file(&self.tmp);
            interrupt::untrack(&mut self.tracked);
        }
    }
}

/// Commits `outputs` in order, each flushed to disk before the first is renamed, with `last`
/// run between the two (the report on stdout): where the flushes or `last` fail, no destination
/// has changed. A failed rename (the destination's directory changed under the run) leaves the
/// outputs before it replaced: the message names them.
pub fn commit_all(mut outputs: Vec<PendingOutput>, last: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    for o in &mut outputs {
        o.sync()?;
    }
    last()?;
    let mut done: Vec<String> = Vec::new();
    for o in outputs {
        let label = o.label.clone();
        o.commit().map_err(|e| match done.is_empty() {
            true => e,
            false => format!("{e} (already replaced: {})", done.join(", ")),
        })?;
        done.push(label);
    }
    Ok(())
}

/// Gives the replacement the owner, group and permissions of the file it replaces, as far as
/// this user may: the owner only where the user may change it (root), the group where the user
/// belongs to it, the permission bits always (after the owner, which would clear set-id bits).
/// Access control lists and extended attributes are not copied.
fn keep_owner_and_mode(file: &File, old: &fs::Metadata) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(new) = file.metadata() {
            if new.uid() != old.uid() || new.gid() != old.gid() {
                // both, else the group alone (a user may give a file to any group they are in)
                if std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid())).is_err() {
                    let _ = std::os::unix::fs::fchown(file, None, Some(old.gid()));
                }
            }
        }
    }
    let _ = file.set_permissions(old.permissions());
}

/// Whether the directory of `file` (a file that exists) ignores case in names: the name with
/// the case of its ASCII letters swapped finds the same file. A temporary file's name always has
/// letters (`.tmp`). A probe, not a guess from the platform: macOS and Windows volumes can be
/// case-sensitive, and Linux mounts FAT, SMB shares and ext4 directories with `casefold` that
/// are not.
fn folds_case(file: &Path) -> bool {
    let Some(name) = file.file_name().and_then(|n| n.to_str()) else { return false };
    let swapped: String = name
        .chars()
        .map(|c| if c.is_ascii_lowercase() { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
        .collect();
    if swapped == name {
        return false;
    }
    matches!((file_id(file), file_id(&file.with_file_name(swapped))), (Some(a), Some(b)) if a == b)
}

/// Whether two names are one in a directory that ignores case: equal once lowercased (Unicode's
/// simple lowercase mapping; file systems fold a little differently in rare letters, and a
/// pair this calls equal that the directory keeps apart is refused, never overwritten).
fn names_fold_equal(a: &std::ffi::OsStr, b: &std::ffi::OsStr) -> bool {
    a.to_string_lossy().to_lowercase() == b.to_string_lossy().to_lowercase()
}

/// The most bytes of the destination's name a temporary file's name keeps: with the dot, the
/// pid, the counter and `.tmp` (at most 27 bytes) it stays within the 255 bytes file systems
/// allow a name, as the destination's own name does (a name of 243 bytes and more was refused
/// for its temporary file's).
const TEMP_STEM: usize = 200;

/// `name`, cut to at most [`TEMP_STEM`] bytes at a character boundary.
fn temp_stem(name: &str) -> &str {
    let mut end = name.len().min(TEMP_STEM);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// A new file `.<name>.<pid>.<n>.tmp` in `dir` (the name cut to [`TEMP_STEM`] bytes), never one that exists, and its registration
/// for removal on a signal ([`interrupt::track`]). The path is registered before the file is
/// created: registered after, a signal between the two left the file behind. (A signal while
/// a name is tried that already exists, a leftover of an earlier process of the same pid,
/// removes that leftover.)
fn create_temp(dir: &Path, name: &str) -> io::Result<(PathBuf, File, interrupt::Tracked)> {
    let name = temp_stem(name);
    let mut last = None;
    for n in 0..100u32 {
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        let mut tracked = interrupt::track(&tmp);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f, tracked)),
            Err(e) => {
                interrupt::untrack(&mut tracked);
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(e);
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary file name left")))
}

/// Writes `data` as a float32 .npy array of shape `dims`.
pub fn write_f32_npy(w: impl Write, dims: &[usize], data: &[f32]) -> io::Result<()> {
    use npyz::WriterBuilder;
    let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(w).begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary one.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fwl-output-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn pending(flag: &str, path: &Path, text: &str) -> PendingOutput {
        let mut o = PendingOutput::create(flag, path, &[]).unwrap();
        o.writer().write_all(text.as_bytes()).unwrap();
        o
    }

    #[test]
    fn commit_all_replaces_every_output() {
        let dir = scratch("all");
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::write(&a, "old a").unwrap();
        commit_all(vec![pending("--a", &a, "new a"), pending("--b", &b, "new b")], || Ok(())).unwrap();
        assert_eq!(fs::read_to_string(&a).unwrap(), "new a");
        assert_eq!(fs::read_to_string(&b).unwrap(), "new b");
        // no temporary file left beside them
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A failure after the outputs are flushed and before they are renamed (the report that
    /// cannot be written) leaves every destination as it was, and no temporary file.
    #[test]
    fn a_failure_before_the_renames_replaces_nothing() {
        let dir = scratch("after");
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::write(&a, "old a").unwrap();
        let e =
            commit_all(
                vec![pending("--a", &a, "new a"), pending("--b", &b, "new b")],
                || Err("the report".to_string()),
            );
        assert_eq!(e, Err("the report".to_string()));
        assert_eq!(fs::read_to_string(&a).unwrap(), "old a");
        assert!(!b.exists());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A destination whose name is as long as names get still takes an output: its temporary
    /// file's name keeps the first 200 bytes (at a character boundary).
    #[test]
    fn a_long_destination_name_takes_an_output() {
        let dir = scratch("long");
        let long = dir.join(format!("{}.npy", "é".repeat(125)));
        assert_eq!(long.file_name().unwrap().len(), 254);
        fs::write(&long, "old").unwrap();
        commit_all(vec![pending("--a", &long, "new")], || Ok(())).unwrap();
        assert_eq!(fs::read_to_string(&long).unwrap(), "new");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        assert_eq!(temp_stem("aé"), "aé");
        assert_eq!(temp_stem(&"é".repeat(125)).len(), 200);
        assert_eq!(temp_stem(&format!("a{}", "é".repeat(125))).len(), 199);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn the_replacement_keeps_the_owner_group_and_mode() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = scratch("owner");
        let a = dir.join("a");
        fs::write(&a, "old a").unwrap();
        fs::set_permissions(&a, fs::Permissions::from_mode(0o640)).unwrap();
        // another owner and group, where this user may give them (root); else only the mode
        let other = std::os::unix::fs::chown(&a, Some(4321), Some(4322)).is_ok();
        if !other {
            eprintln!("not root: the owner half of this test skipped, the mode checked");
        }
        let before = fs::metadata(&a).unwrap();
        commit_all(vec![pending("--a", &a, "new a")], || Ok(())).unwrap();
        let after = fs::metadata(&a).unwrap();
        assert_eq!(fs::read_to_string(&a).unwrap(), "new a");
        assert_ne!(before.ino(), after.ino(), "replaced by rename, not rewritten");
        assert_eq!(after.permissions().mode() & 0o7777, 0o640);
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        if other {
            assert_eq!((after.uid(), after.gid()), (4321, 4322));
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_rename_names_the_outputs_already_replaced() {
        let dir = scratch("partial");
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::write(&a, "old a").unwrap();
        fs::write(&b, "old b").unwrap();
        let second = pending("--b", &b, "new b");
        // the second's temporary file vanishes under the run: its rename fails
        fs::remove_file(&second.tmp).unwrap();
        let e = commit_all(vec![pending("--a", &a, "new a"), second], || Ok(())).unwrap_err();
        assert!(e.starts_with(&format!("--b {}", b.display())), "{e}");
        assert!(e.ends_with(&format!("(already replaced: --a {})", a.display())), "{e}");
        assert_eq!(fs::read_to_string(&a).unwrap(), "new a");
        assert_eq!(fs::read_to_string(&b).unwrap(), "old b");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Two new outputs whose names differ only in case are one where the directory ignores case,
    /// two where it does not, whatever the platform: the CLI asks the directory. A case-folding
    /// file system cannot be mounted here, so a hard link under the swapped name of the first
    /// output's temporary file makes the probe find one file, as such a directory would.
    #[test]
    fn names_differing_in_case_are_one_destination_where_the_directory_ignores_case() {
        let dir = scratch("fold");
        let first = pending("--a", &dir.join("G.npy"), "a");
        let upper = pending("--b", &dir.join("g.NPY"), "b");
        let other = pending("--c", &dir.join("h.npy"), "c");
        let same = pending("--d", &dir.join("G.npy"), "d");
        assert!(first.same_destination(&same), "equal names are one destination anywhere");
        assert!(!first.same_destination(&other), "other names are other destinations anywhere");
        if folds_case(&first.tmp) {
            // the scratch directory itself ignores case (macOS, Windows): the probe's answer
            // is all there is to check
            assert!(first.same_destination(&upper), "G.npy and g.NPY in a case-folding directory");
            drop((first, upper, other, same));
            fs::remove_dir_all(&dir).unwrap();
            return;
        }
        assert!(!first.same_destination(&upper), "this directory tells case apart");
        let name = first.tmp.file_name().unwrap().to_str().unwrap();
        let swapped: String = name
            .chars()
            .map(|c| if c.is_ascii_lowercase() { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
            .collect();
        fs::hard_link(&first.tmp, dir.join(&swapped)).unwrap();
        assert!(folds_case(&first.tmp));
        assert!(first.same_destination(&upper), "G.npy and g.NPY in a case-folding directory");
        assert!(!first.same_destination(&other), "folding case does not make other names equal");
        // Unicode letters fold too
        assert!(names_fold_equal("É.npy".as_ref(), "é.NPY".as_ref()));
        assert!(!names_fold_equal("e.npy".as_ref(), "é.npy".as_ref()));
        // a file that does not exist is no evidence
        assert!(!folds_case(&dir.join("missing.tmp")));
        fs::remove_file(dir.join(&swapped)).unwrap();
        drop((first, upper, other, same));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "no temporary file left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
