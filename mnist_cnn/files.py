"""Files the stages write and read: atomic outputs, strict JSON, manifests of what a stage wrote, .npz headers."""

import hashlib
import json
import mmap
import os
import resource
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mnist_cnn.errors import FILE_SIZE_LIMIT, Damaged, UserError, out_of_space
from mnist_cnn.stage import signals_held, wrote


TMP_PREFIX = ".tmp-"  # .gitignore and .dvcignore name it: git never offers it, DVC never hashes it


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder):
    """Remove the temporaries in `folder` whose process is gone (killed with SIGKILL, say)."""
    for path in Path(folder).glob(f"{TMP_PREFIX}*"):
        pid = path.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def staging_dir(folder):
    """Where an output of `folder` is written before it is renamed into place: the project's .dvc/tmp/staging
    when on the same disk, else `folder` itself. Never inside an output folder, where a temporary left by a
    SIGKILL would survive DVC restoring that folder from its run cache (no code of ours runs then)."""
    folder = Path(folder).resolve()
    for parent in (folder, *folder.parents):
        if (parent / ".dvc").is_dir():
            staging = parent / ".dvc" / "tmp" / "staging"
            existing = next(p for p in (folder, *folder.parents) if p.exists())
            try:
                staging.mkdir(parents=True, exist_ok=True)
                if staging.stat().st_dev == existing.stat().st_dev:  # a rename cannot cross disks
                    return staging
            except OSError:
                pass
            break
    return folder


@contextmanager
def atomic_path(final):
    """Yield a temporary path; rename it into `final` on success.

    Works for files and folders. The temporary folder is `.tmp-<pid>-...` in
    staging_dir (ignored by git and DVC), removed on any error or signal, and,
    after a SIGKILL, by the next write there (its pid is gone). The temporary
    name keeps the final suffix (Keras insists on `.keras` and
    `.weights.h5`). An old folder is first renamed out of the way, so that
    `final` is at every moment either the old output, the new one, or absent:
    never half of either. A full disk or a file-size limit while writing is
    one line naming `final` (a UserError). What was renamed into place is
    noted (stage.wrote): a stage that fails later removes it, so that a
    stage's outputs are all of one run or none.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(final.parent)
    remove_stale(final.parent)  # temporaries of older versions, written beside their outputs
    remove_stale(staging)
    tmp_dir = None
    try:
        with signals_held():  # a signal between mkdtemp and this try would leave the folder behind
            tmp_dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=f".{final.name}",
                                            dir=staging))
        tmp = tmp_dir / final.name
        try:
            yield tmp
        except OSError as err:
            if out_of_space(err):
                raise UserError(out_of_space_message(err, final, tmp)) from None
            raise
        with signals_held():  # the two renames go together: between them there would be no output at all
            if final.is_dir() and not final.is_symlink():
                os.replace(final, tmp_dir / "old")
            os.replace(tmp, final)
            wrote(final)
    except OSError as err:
        if out_of_space(err):  # mkdtemp on a full disk
            raise UserError(out_of_space_message(err, final, None)) from None
        raise
    finally:
        if tmp_dir is not None:
            with signals_held():  # a signal mid-rmtree would leave half of it
                shutil.rmtree(tmp_dir, ignore_errors=True)


def copy_in_place(source, folder, pattern="**/*.tsv"):
    """Copy the files of `source` matching `pattern` into `folder`, each written beside its final name and renamed
    over it: a reader sees a file's last copy or the one before, never half of one. For what readers follow
    while a stage runs (train's curves so far), outside its outputs."""
    source, folder = Path(source), Path(folder)
    for path in source.glob(pattern):
        target = folder / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{TMP_PREFIX}{os.getpid()}-{target.name}")
        try:
            shutil.copyfile(path, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)  # a copy cut short (a signal, a full disk) leaves no partial file


def clear_copies(folder, pattern="*.tsv"):
    """Remove the files matching `pattern` (and partial copies) under `folder`, and the folders they leave
    empty: what copy_in_place wrote there, and nothing else, whatever folder it is given."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in [*folder.rglob(pattern), *folder.rglob(f"{TMP_PREFIX}*")]:
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()  # only if empty
        except OSError:
            pass


def release_pages(array):
    """Drop a read-only memory-mapped array's pages from this process's resident memory (they stay in the
    kernel's page cache, and are mapped again if the array is touched). Train calls it after the fit, before
    the ONNX export, the process's peak. Anything else (an array in memory, a copy-on-write mapping, whose
    changes live in those pages) is left as it is; a kernel that refuses the advice changes nothing."""
    mapping = getattr(array, "_mmap", None)  # NumPy's memmap keeps its mmap.mmap here
    if mapping is None or getattr(array, "mode", None) != "r":
        return
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError, AttributeError):  # advice only: the run's results do not depend on it
        pass


def tree_size(path):
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def megabytes(n):
    return f"{n / 1e6:,.1f} MB"


def out_of_space_message(err, final, tmp):
    """One line: which output, why, and what it needed so far (the size written when the write failed)."""
    written, why = tree_size(tmp), out_of_space(err)
    if why == FILE_SIZE_LIMIT:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        where = (f"the limit is {megabytes(limit)} a file (ulimit -f)" if limit != resource.RLIM_INFINITY
                 else "the file system's largest file")
        fix = "raise `ulimit -f`, or write to another file system"
    else:
        try:
            where = f"{megabytes(shutil.disk_usage(final.parent).free)} free there"
        except OSError:
            where = "its free space unknown"
        fix = "free some space and run again"
    return (f"cannot write {final}: {why} after {megabytes(written)} of it ({where}); it needs more than "
            f"that: {fix}; nothing of this run was kept")


def to_json(data, **kwargs):
    """Strict JSON: a NaN or infinity is an error here, never `NaN` in a file that JSON readers refuse."""
    return json.dumps(data, allow_nan=False, **kwargs)


def write_json(path, data):
    text = to_json(data, indent=2) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: run `dvc repro` to make it") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is damaged (not JSON: {err}); run `dvc repro --single-item -f <stage>` with "
                        f"the stage of dvc.yaml that writes it") from None


def npz_headers(path, prefix=""):
    """{name: (shape, dtype)} of an .npz's arrays, from its zip directory and .npy headers only.

    A few KB are read whatever the file declares, so a hostile or damaged file
    is refused (a UserError, `prefix` before its path) in bounded memory and
    time: a member whose size does not match its header, Python objects, or a
    file that is not a zip of .npy arrays.
    """
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive:
            headers = {}
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f"array {name!r} has .npy format version {version}, not 1.0 or 2.0")
                    shape, _, dtype = read_header(member)
                    header_size = member.tell()
                if dtype.hasobject:
                    raise UserError(f"{prefix}{path}: array {name!r} holds Python objects; refusing to load it")
                if info.file_size != header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                    raise UserError(f"{prefix}{path}: array {name!r}'s size does not match its header "
                                    f"{shape} {dtype}; the file is damaged")
                headers[name] = (tuple(shape), dtype)
            return headers
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as err:
        raise UserError(f"{prefix}cannot read {path} as .npz ({type(err).__name__}: "
                        f"{' '.join(str(err).split())}); the file is damaged or not an .npz") from None


MANIFEST = "manifest.json"


def file_md5(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def manifest(folder, stage):
    """The manifest of every file in `folder` (not in subfolders), as written by `stage`."""
    files = {f.name: {"md5": file_md5(f), "bytes": f.stat().st_size}
             for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name != MANIFEST}
    return {"stage": stage, "files": files}


def write_manifest(folder, stage):
    """Record `folder`'s files; call it last, on the temporary folder, before it is renamed into place."""
    (Path(folder) / MANIFEST).write_text(to_json(manifest(folder, stage), indent=2) + "\n")


def check_files(folder, names):
    """Check that `folder`'s files `names` are the ones its stage wrote; a UserError naming the damaged one.

    The error gives the recovery: remove DVC's cached copy and run the stage again. Returns {name: md5}
    of the files checked, for a caller that records them (no need to hash them again).
    """
    folder = Path(folder)
    record = read_json(folder / MANIFEST)
    stage = record.get("stage", "?")
    for name in names:
        path, want = folder / name, record.get("files", {}).get(name)
        if want is None:
            raise UserError(f"{path} is not in {folder / MANIFEST}: run `dvc repro --single-item -f {stage}`")
        if not path.is_file():
            raise UserError(f"{path} not found: run `dvc repro` to make it")
        size = path.stat().st_size
        got = file_md5(path) if size == want["bytes"] else None
        if got != want["md5"]:
            found = f"{size} bytes" if got is None else f"md5 {got}"
            md5 = want["md5"]
            repair = f"rm -f .dvc/cache/files/md5/{md5[:2]}/{md5[2:]} && dvc repro --single-item -f {stage}"
            raise Damaged(f"{path} is damaged ({found}; {stage} wrote {want['bytes']} bytes, md5 {want['md5']}); "
                            f"DVC's cache may hold the damaged copy: `{repair}`")
    return {name: record["files"][name]["md5"] for name in names}


class NpyWriter:
    """An .npy file of a known dtype and shape, written a chunk at a time (its whole array never in memory).

    Plain writes, not a writable memory map: the pages written go to the page cache, not the process's memory.
    `close()` refuses a file given fewer or more rows than its header says.
    """

    def __init__(self, path, dtype, shape):
        import numpy as np

        self.path, self.dtype, self.shape, self.rows = Path(path), np.dtype(dtype), tuple(shape), 0
        self.file = open(self.path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": self.shape})

    def write(self, chunk):
        import numpy as np

        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.shape[1:] or self.rows + len(chunk) > self.shape[0]:
            raise ValueError(f"{self.path.name}: a chunk of {chunk.shape} does not fit {self.shape} after "
                             f"{self.rows} rows")
        self.file.write(chunk.data)
        self.rows += len(chunk)

    def close(self):
        self.file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.rows} rows written of {self.shape[0]}")
