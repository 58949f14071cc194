"""The output guard and error conventions of the Python tools in examples/pytorch.

    outs = safeio.Outputs({"--out-weights": w, "--out-model": m}, inputs={"CHECKPOINT": ckpt})
    ...                                   # read, check, compute: nothing on disk yet
    outs.commit({w: weights_bytes, m: toml_bytes})

Every output is declared before any work, and checked then: it must not end in a
path separator or be an existing directory, a symlink (never written through) or
anything but a regular file; it must differ from every other output and from every
input, compared by resolved path and, for files that exist, by device and inode (a
hard link is the same file). `commit` creates missing parent directories, writes
each output to a temporary name beside it, and renames them into place only when
all were written; when any step fails it puts back what was there (earlier renames
are undone from hard-link backups, new files and created directories removed), so a
failed run leaves the disk as it found it.

`ArgParser` is argparse with a one-line usage error (exit 2); `fail` prints one line
and returns exit status 2; `declare` is `Outputs` exiting with that line on a refusal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path


class OutputError(Exception):
    """An output that may not be written; the message is one line naming the flag."""


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit status 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def fail(prog: str, message) -> int:
    """Prints `prog: error: message` as one line; returns exit status 2."""
    text = " ".join(str(message).split())
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 2


def declare(prog: str, outputs: dict, inputs: dict | None = None) -> "Outputs":
    """Outputs(outputs, inputs), or the refusal as one line and exit status 2."""
    try:
        return Outputs(outputs, inputs)
    except OutputError as e:
        sys.exit(fail(prog, e))


def _identity(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class Outputs:
    def __init__(self, outputs: dict, inputs: dict | None = None):
        """outputs, inputs: {label (the flag a user typed): path}. Raises OutputError."""
        self.labels: dict = {}
        seen_paths: dict = {}
        seen_ids: dict = {}
        for label, path in (inputs or {}).items():
            if path is None:
                continue
            path = Path(path)
            seen_paths[os.path.realpath(path)] = label
            ident = _identity(path)
            if ident is not None:
                seen_ids[ident] = label
        for label, raw in outputs.items():
            if raw is None:
                continue
            text = os.fspath(raw)
            if text == "" or text.endswith(("/", os.sep)) or (os.altsep and text.endswith(os.altsep)):
                raise OutputError(f"{label} {text!r}: names a directory, expected a file path")
            path = Path(text)
            if path.is_symlink():
                raise OutputError(f"{label} {text}: is a symlink; refusing to write through it")
            if path.is_dir():
                raise OutputError(f"{label} {text}: is a directory, expected a file path")
            if path.exists() and not path.is_file():
                raise OutputError(f"{label} {text}: exists and is not a regular file")
            parent = self._existing_ancestor(path.parent)
            if not parent.is_dir():
                raise OutputError(f"{label} {text}: {parent} is not a directory")
            real = os.path.join(os.path.realpath(path.parent), path.name)
            ident = _identity(path)
            other = seen_paths.get(real) or (seen_ids.get(ident) if ident is not None else None)
            if other is not None:
                raise OutputError(f"{label} {text}: is the same file as {other}")
            seen_paths[real] = label
            if ident is not None:
                seen_ids[ident] = label
            self.labels[path] = label

    @staticmethod
    def _existing_ancestor(path: Path) -> Path:
        while not path.exists() and not path.is_symlink() and path != path.parent:
            path = path.parent
        return path

    def commit(self, contents: dict) -> None:
        """Writes {path: bytes} for exactly the declared outputs, all or nothing."""
        contents = {Path(p): data for p, data in contents.items()}
        if set(contents) != set(self.labels):
            raise ValueError("commit must write exactly the declared outputs")
        created_dirs: list = []
        temps: dict = {}
        backups: dict = {}
        done: list = []
        umask = os.umask(0)
        os.umask(umask)
        try:
            for path in contents:
                missing = []
                d = path.parent
                while not d.exists() and d != d.parent:
                    missing.append(d)
                    d = d.parent
                for d in reversed(missing):
                    d.mkdir()
                    created_dirs.append(d)
            for path, data in contents.items():
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                temps[path] = tmp
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                # mkstemp makes 0600; give the file the mode a plain open() would.
                os.chmod(tmp, 0o666 & ~umask)
            for path in contents:
                # Checked again right before replacing: a symlink or directory that
                # appeared since the declaration is not written through.
                if path.is_symlink() or path.is_dir():
                    raise OutputError(f"{self.labels[path]} {path}: became a symlink or directory")
                if path.exists():
                    fd, bak = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".bak")
                    os.close(fd)
                    os.unlink(bak)
                    try:
                        os.link(path, bak)
                    except OSError:
                        shutil.copy2(path, bak)
                    backups[path] = bak
            for path in contents:
                os.replace(temps[path], path)
                del temps[path]
                done.append(path)
        except BaseException:
            for path in reversed(done):
                try:
                    if path in backups:
                        os.replace(backups.pop(path), path)
                    else:
                        os.unlink(path)
                except OSError:
                    pass
            for tmp in list(temps.values()) + list(backups.values()):
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            for d in reversed(created_dirs):
                try:
                    d.rmdir()
                except OSError:
                    pass
            raise
        for bak in backups.values():
            try:
                os.unlink(bak)
            except OSError:
                pass
