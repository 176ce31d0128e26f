//! Directory handles that never follow a symlink.
//!
//! Every lookup is relative to an open directory descriptor and resolves one name (or a relative
//! path with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, else one `openat(O_NOFOLLOW)` per
//! component); metadata comes from `fstat` of an opened descriptor or `fstatat` of one name with
//! `AT_SYMLINK_NOFOLLOW`. A tree that changes while it is walked (an application swapping a
//! directory for a symlink to `/etc`) can make a walk miss entries, never leave the tree.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

const DIR_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// False once `openat2` turned out to be missing (old kernel) or filtered (seccomp).
static OPENAT2: AtomicBool = AtomicBool::new(true);

/// An open directory.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name contains a NUL byte"))
}

/// `name` as a single path component (no `/`, not `.` or `..`, not empty).
fn name_c(name: &OsStr) -> io::Result<CString> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a single path component",
        ));
    }
    cstring(name)
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: libc::c_int) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `fstat` of an open descriptor.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is a valid out pointer.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// True if `err` means the entry vanished or changed type under us (removed, or swapped for a
/// symlink or a file while we looked): a live tree in use.
pub(crate) fn vanished(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
    )
}

impl Dir {
    /// Opens the directory `path`; its last component must not be a symlink. The components
    /// before it are flockd's own directories.
    pub(crate) fn open(path: &Path) -> io::Result<Dir> {
        let c = cstring(path.as_os_str())?;
        // SAFETY: `c` is a valid NUL-terminated path.
        let fd = check(unsafe { libc::open(c.as_ptr(), DIR_FLAGS) })?;
        Ok(Dir { fd: owned(fd) })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    /// The subdirectory `name`, not followed if it is a symlink (`ENOTDIR` or `ELOOP`).
    pub(crate) fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
        let c = name_c(name)?;
        // SAFETY: valid descriptor and NUL-terminated name.
        let fd = check(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), DIR_FLAGS) })?;
        Ok(Dir { fd: owned(fd) })
    }

    /// The directory `rel` below this one (`""` is a copy of this one), no component followed
    /// if it is a symlink, none leaving this directory.
    pub(crate) fn open_rel(&self, rel: &Path) -> io::Result<Dir> {
        let mut names = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => names.push(n),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not a relative path of plain names",
                    ))
                }
            }
        }
        if names.is_empty() {
            return self.try_clone();
        }
        if OPENAT2.load(Ordering::Relaxed) {
            match self.openat2(rel) {
                Ok(d) => return Ok(d),
                // Missing (ENOSYS), filtered (EPERM), an older struct (E2BIG, EINVAL), or a
                // concurrent rename it would rather not judge (EAGAIN): fall back.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOSYS)
                            | Some(libc::EPERM)
                            | Some(libc::E2BIG)
                            | Some(libc::EINVAL)
                    ) =>
                {
                    OPENAT2.store(false, Ordering::Relaxed);
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return Err(e),
            }
        }
        let mut cur = self.open_dir(names[0])?;
        for n in &names[1..] {
            cur = cur.open_dir(n)?;
        }
        Ok(cur)
    }

    fn openat2(&self, rel: &Path) -> io::Result<Dir> {
        let c = cstring(rel.as_os_str())?;
        // SAFETY: `open_how` is plain integers; all-zero is its documented default.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = DIR_FLAGS as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: valid descriptor, NUL-terminated path, and `how` of the size we pass.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::c_int::try_from(rc)
            .map_err(|_| io::Error::other("openat2 returned an impossible descriptor"))?;
        Ok(Dir { fd: owned(fd) })
    }

    /// `fstat` of this directory.
    pub(crate) fn fstat(&self) -> io::Result<libc::stat> {
        fstat(self.fd())
    }

    /// The metadata of `name` itself (a symlink is not followed).
    pub(crate) fn stat_at(&self, name: &OsStr) -> io::Result<libc::stat> {
        let c = name_c(name)?;
        // SAFETY: an all-zero `stat` is a valid value; fstatat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, NUL-terminated name, valid out pointer.
        check(unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(st)
    }

    /// The names in this directory (without `.` and `..`), sorted.
    pub(crate) fn names(&self) -> io::Result<Vec<OsString>> {
        // SAFETY: valid descriptor; F_DUPFD_CLOEXEC returns a new descriptor we then own.
        let dup = check(unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
        // SAFETY: `dup` is ours; on success fdopendir owns it (closedir closes it).
        let dirp = unsafe { libc::fdopendir(dup) };
        if dirp.is_null() {
            let e = io::Error::last_os_error();
            drop(owned(dup));
            return Err(e);
        }
        let mut out = Vec::new();
        // The duplicate shares the file offset: start from the beginning.
        // SAFETY: `dirp` is a valid open directory stream.
        unsafe { libc::rewinddir(dirp) };
        let result = loop {
            // SAFETY: errno is thread-local; resetting it tells end of stream from an error.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: `dirp` is a valid open directory stream.
            let ent = unsafe { libc::readdir(dirp) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                break match e.raw_os_error() {
                    Some(0) | None => Ok(()),
                    Some(_) => Err(e),
                };
            }
            // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated; it stays
            // valid until the next readdir on this stream, and we copy it before that.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
            if name != b"." && name != b".." {
                out.push(OsString::from_vec(name.to_vec()));
            }
        };
        // SAFETY: `dirp` is valid and not used after this.
        unsafe { libc::closedir(dirp) };
        result?;
        out.sort();
        Ok(out)
    }

    /// The target text of the symlink `name` (`EINVAL` if it is not a symlink).
    pub(crate) fn read_link(&self, name: &OsStr) -> io::Result<OsString> {
        let c = name_c(name)?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: valid descriptor and name; `buf` has `buf.len()` writable bytes.
            let n = unsafe {
                libc::readlinkat(
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Ok(OsString::from_vec(buf));
            }
            if buf.len() >= 1 << 16 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "symlink target longer than 64 KiB",
                ));
            }
            buf.resize(buf.len() * 4, 0);
        }
    }

    /// Opens `name` for reading, not following a symlink; `None` if it is not a regular file
    /// (a FIFO swapped in does not block the open: O_NONBLOCK).
    pub(crate) fn open_file(&self, name: &OsStr) -> io::Result<Option<(File, libc::stat)>> {
        let c = name_c(name)?;
        let flags =
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and NUL-terminated name.
        let fd = check(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) })?;
        let file = File::from(owned(fd));
        let st = fstat(file.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(None);
        }
        Ok(Some((file, st)))
    }

    /// Creates the new regular file `name` (0600 until its metadata is applied).
    pub(crate) fn create_file(&self, name: &OsStr) -> io::Result<File> {
        let c = name_c(name)?;
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and NUL-terminated name.
        let fd = check(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags,
                0o600 as libc::c_uint,
            )
        })?;
        Ok(File::from(owned(fd)))
    }

    /// Creates the directory `name` (0700 until its metadata is applied).
    pub(crate) fn mkdir(&self, name: &OsStr) -> io::Result<()> {
        let c = name_c(name)?;
        // SAFETY: valid descriptor and NUL-terminated name.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o700) })?;
        Ok(())
    }

    /// Creates the symlink `name` with the target text `target`.
    pub(crate) fn symlink(&self, target: &OsStr, name: &OsStr) -> io::Result<()> {
        let (t, c) = (cstring(target)?, name_c(name)?);
        // SAFETY: valid descriptor and NUL-terminated strings.
        check(unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), c.as_ptr()) })?;
        Ok(())
    }

    /// Hard-links `name` here (itself, never a symlink's target) as `to_name` in `to`.
    pub(crate) fn link_to(&self, name: &OsStr, to: &Dir, to_name: &OsStr) -> io::Result<()> {
        let (a, b) = (name_c(name)?, name_c(to_name)?);
        // SAFETY: valid descriptors and NUL-terminated names; flags 0 does not follow symlinks.
        check(unsafe {
            libc::linkat(
                self.fd.as_raw_fd(),
                a.as_ptr(),
                to.fd.as_raw_fd(),
                b.as_ptr(),
                0,
            )
        })?;
        Ok(())
    }

    fn unlink(&self, name: &OsStr, dir: bool) -> io::Result<()> {
        let c = name_c(name)?;
        let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: valid descriptor and NUL-terminated name.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), flags) })?;
        Ok(())
    }

    /// Removes `name` (a directory with its contents, a symlink itself); a missing name is fine.
    pub(crate) fn remove_all(&self, name: &OsStr) -> io::Result<()> {
        let res = match self.open_dir(name) {
            Ok(sub) => {
                for n in sub.names()? {
                    sub.remove_all(&n)?;
                }
                self.unlink(name, true)
            }
            // Not a directory (or a symlink to one): unlink the name itself.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
                self.unlink(name, false)
            }
            Err(e) => Err(e),
        };
        match res {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    /// Sets owner and mtime of `name` itself (for symlinks, whose mode means nothing). An
    /// unprivileged process keeps its own owner rather than fail.
    pub(crate) fn set_link_meta(
        &self,
        name: &OsStr,
        uid: u32,
        gid: u32,
        mtime: libc::timespec,
    ) -> io::Result<()> {
        let c = name_c(name)?;
        // SAFETY: valid descriptor and NUL-terminated name.
        let rc = unsafe {
            libc::fchownat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EPERM) {
                return Err(e);
            }
        }
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            mtime,
        ];
        // SAFETY: valid descriptor and name; `times` points at two timespecs.
        check(unsafe {
            libc::utimensat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }
}

/// Sets owner, mode and mtime of an open file or directory (owner first: chown clears setuid
/// bits). An unprivileged process keeps its own owner rather than fail.
pub(crate) fn set_fd_meta(
    fd: BorrowedFd<'_>,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: libc::timespec,
) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: `raw` is an open descriptor for the duration of these calls.
    if unsafe { libc::fchown(raw, uid, gid) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
    }
    // SAFETY: as above.
    check(unsafe { libc::fchmod(raw, mode as libc::mode_t) })?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        mtime,
    ];
    // SAFETY: as above; `times` points at two timespecs.
    check(unsafe { libc::futimens(raw, times.as_ptr()) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a/b` is a real directory, `a/link` a symlink to a directory outside holding `secret`.
    fn tree() -> (tempfile::TempDir, Dir) {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(tmp.path().join("root/a/b")).expect("mkdir");
        std::fs::create_dir_all(tmp.path().join("outside")).expect("mkdir");
        std::fs::write(tmp.path().join("outside/secret"), b"s").expect("write");
        std::os::unix::fs::symlink(tmp.path().join("outside"), tmp.path().join("root/a/link"))
            .expect("symlink");
        std::os::unix::fs::symlink(
            tmp.path().join("outside/secret"),
            tmp.path().join("root/a/file-link"),
        )
        .expect("symlink");
        let root = Dir::open(&tmp.path().join("root")).expect("open");
        (tmp, root)
    }

    fn lookups(root: &Dir) {
        assert!(root.open_rel(Path::new("a/b")).is_ok());
        for through in ["a/link", "a/link/x", "a/../a/b", "/a"] {
            let err = root.open_rel(Path::new(through)).expect_err(through);
            assert!(
                vanished(&err) || err.kind() == io::ErrorKind::InvalidInput,
                "{through}: {err}"
            );
        }
        let a = root.open_rel(Path::new("a")).expect("a");
        let err = a.open_dir(OsStr::new("link")).expect_err("a symlink");
        assert!(
            matches!(err.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)),
            "{err}"
        );
        let err = a.open_file(OsStr::new("file-link")).expect_err("a symlink");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        assert_eq!(
            a.read_link(OsStr::new("link"))
                .expect("readlink")
                .as_bytes(),
            root.open_rel(Path::new("a"))
                .and_then(|d| d.read_link(OsStr::new("link")))
                .expect("readlink")
                .as_bytes()
        );
        assert_eq!(a.names().expect("names"), ["b", "file-link", "link"]);
    }

    #[test]
    fn no_lookup_follows_a_symlink_with_openat2_or_without() {
        let (_tmp, root) = tree();
        lookups(&root);
        // The per-component fallback (kernels before 5.6, or a seccomp filter).
        OPENAT2.store(false, Ordering::Relaxed);
        lookups(&root);
        OPENAT2.store(true, Ordering::Relaxed);
    }

    #[test]
    fn remove_all_removes_a_symlink_not_what_it_points_to() {
        let (tmp, root) = tree();
        let a = root.open_rel(Path::new("a")).expect("a");
        a.remove_all(OsStr::new("link")).expect("remove");
        a.remove_all(OsStr::new("missing"))
            .expect("a missing name is fine");
        assert!(tmp.path().join("outside/secret").exists());
        root.remove_all(OsStr::new("a")).expect("remove");
        assert!(tmp.path().join("outside/secret").exists());
        assert!(!tmp.path().join("root/a").exists());
    }
}
