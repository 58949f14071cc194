"""Tests of safeio.py, the output guard of the Python tools: which declarations are
refused (and that nothing is touched then), that a commit writes exactly the given
bytes, and that a commit failing half-way puts the disk back as it was.

    cd examples/pytorch && python3 -m unittest -v test_safeio
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import safeio  # noqa: E402


def snapshot(root: Path) -> dict:
    """Every path under root with its kind and content (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            elif p.is_file():
                out[rel] = ("file", p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            else:
                out[rel] = ("other",)
    return out


class Guard(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.d = Path(self.tmp.name)
        (self.d / "in.bin").write_bytes(b"input")
        (self.d / "old.txt").write_bytes(b"old contents")
        (self.d / "sub").mkdir()

    def tearDown(self):
        self.tmp.cleanup()

    def refused(self, outputs: dict, pattern: str, inputs=None):
        before = snapshot(self.d)
        with self.assertRaises(safeio.OutputError) as cm:
            safeio.Outputs(outputs, inputs=inputs if inputs is not None else {"IN": self.d / "in.bin"})
        self.assertRegex(str(cm.exception), pattern)
        self.assertNotIn("\n", str(cm.exception))
        self.assertEqual(snapshot(self.d), before)

    def test_refused_declarations(self):
        d = self.d
        os.symlink(d / "old.txt", d / "link")
        os.symlink(d / "nowhere", d / "dangling")
        os.link(d / "in.bin", d / "hard")
        os.symlink(d / "sub", d / "sublink")
        (d / "sub" / "x").write_bytes(b"x")
        os.mkfifo(d / "fifo")
        cases = [
            ({"-o": f"{d}/new.npy/"}, r"-o .*names a directory"),
            ({"-o": d / "sub"}, r"-o .*is a directory"),
            ({"-o": d / "link"}, r"-o .*symlink"),
            ({"-o": d / "dangling"}, r"-o .*symlink"),
            ({"-o": d / "fifo"}, r"-o .*not a regular file"),
            ({"-o": d / "in.bin"}, r"-o .*same file as IN"),
            ({"-o": d / "sub" / ".." / "in.bin"}, r"-o .*same file as IN"),
            ({"-o": d / "hard"}, r"-o .*same file as IN"),
            ({"-a": d / "out", "-b": d / "sub" / ".." / "out"}, r"-b .*same file as -a"),
            ({"-a": d / "sub" / "x", "-b": d / "sublink" / "x"}, r"-b .*same file as -a"),
            ({"-o": d / "old.txt" / "deeper"}, r"-o .*old\.txt is not a directory"),
        ]
        for outputs, pattern in cases:
            with self.subTest(outputs=outputs):
                self.refused(outputs, pattern)

    def test_commit_writes_and_creates_parents(self):
        a, b = self.d / "old.txt", self.d / "new" / "deep" / "b.bin"
        outs = safeio.Outputs({"-a": a, "-b": b}, inputs={"IN": self.d / "in.bin"})
        outs.commit({a: b"AAA", b: bytes(range(256))})
        self.assertEqual(a.read_bytes(), b"AAA")
        self.assertEqual(b.read_bytes(), bytes(range(256)))
        umask = os.umask(0)
        os.umask(umask)
        self.assertEqual(stat.S_IMODE(b.stat().st_mode), 0o666 & ~umask)
        self.assertEqual(sorted(p.name for p in b.parent.iterdir()), ["b.bin"])  # no temporaries left
        with self.assertRaises(ValueError):
            outs.commit({a: b"only one"})

    def test_second_output_failing_restores_the_first(self):
        existing, new = self.d / "old.txt", self.d / "fresh" / "n.bin"
        before = snapshot(self.d)
        outs = safeio.Outputs({"-a": existing, "-b": new})
        real_replace = os.replace
        calls = []

        def failing_replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            return real_replace(src, dst)

        for order in ((existing, new), (new, existing)):
            calls.clear()
            with self.subTest(first=order[0].name), mock.patch("os.replace", failing_replace):
                with self.assertRaises(OSError):
                    outs.commit({order[0]: b"first", order[1]: b"second"})
            self.assertGreaterEqual(len(calls), 2)
            self.assertEqual(snapshot(self.d), before)

    def test_write_failing_leaves_nothing(self):
        a, b = self.d / "a" / "x.bin", self.d / "old.txt"
        before = snapshot(self.d)
        outs = safeio.Outputs({"-a": a, "-b": b})
        with self.assertRaises(TypeError):
            outs.commit({a: b"fine", b: "not bytes"})
        self.assertEqual(snapshot(self.d), before)

    def test_declare_exits_with_one_line(self):
        with mock.patch("sys.stderr") as err, self.assertRaises(SystemExit) as cm:
            safeio.declare("tool.py", {"--json": f"{self.d}/sub/"})
        self.assertEqual(cm.exception.code, 2)
        text = "".join(c.args[0] for c in err.write.call_args_list)
        self.assertEqual(text.count("\n"), 1, text)
        self.assertRegex(text, r"^tool\.py: error: --json '.*/sub/': names a directory")
        self.assertIsInstance(safeio.declare("tool.py", {"--json": self.d / "new.json"}), safeio.Outputs)

    def test_argparser_error_is_one_line(self):
        ap = safeio.ArgParser(prog="tool.py")
        ap.add_argument("--n", type=int, required=True)
        with mock.patch("sys.stderr") as err, self.assertRaises(SystemExit) as cm:
            ap.parse_args(["--n", "x"])
        self.assertEqual(cm.exception.code, 2)
        text = "".join(c.args[0] for c in err.write.call_args_list)
        self.assertEqual(text.count("\n"), 1, text)
        self.assertRegex(text, r"^tool\.py: error: argument --n: invalid int value: 'x'")


if __name__ == "__main__":
    unittest.main()
