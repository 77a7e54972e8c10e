"""Execute every chapter and render the Jupyter Book; fail loudly if any chapter fails.

    python tools/build_book.py            # full budget -> book/_build/html   (make book)
    python tools/build_book.py --fast     # STCORE_FAST=1 -> build/book-fast/_build/html   (part of make test)

Jupyter Book exits 0 when a notebook fails to execute, so besides building with ``-W --keep-going`` this script
reads the execution reports and the log, and exits 1 on any failure. The execution cache (jupyter-cache keys on a
notebook's own code only) is cleared whenever ``stcore`` or the pinned environment changes, so a changed library
never serves stale outputs. MathJax is copied from the installed ``django-static-mathjax`` package so that the
site renders equations offline.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cache_key(fast: bool) -> str:
    h = hashlib.sha256(b"fast" if fast else b"full")
    for path in sorted([*ROOT.glob("stcore/**/*.py"), *ROOT.glob("stcore/**/*.yaml"), ROOT / "requirements-lock.txt"]):
        if path.exists():
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def install_mathjax() -> None:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("MathJax is missing: install the book extra (make setup) to get django-static-mathjax.")
    source = Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax" / "es5" / "tex-svg-full.js"
    target = ROOT / "book" / "_static" / "mathjax" / "tex-svg-full.js"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        shutil.copyfile(source, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="execute chapters with STCORE_FAST=1")
    parser.add_argument("--out", default=None, help="output folder (default: book/ or build/book-fast/)")
    args = parser.parse_args()

    out = Path(args.out) if args.out else ROOT / ("build/book-fast" if args.fast else "book")
    out.mkdir(parents=True, exist_ok=True)
    key_file = out / ".stcore-cache-key"
    key = cache_key(args.fast)
    if not key_file.exists() or key_file.read_text() != key:
        shutil.rmtree(out / "_build" / ".jupyter_cache", ignore_errors=True)
        shutil.rmtree(out / "_build" / "html" / "reports", ignore_errors=True)
    install_mathjax()

    env = {**os.environ, "STCORE_FAST": "1" if args.fast else "0", "OMP_WAIT_POLICY": "PASSIVE",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(ROOT), "--config", str(ROOT / "book/_config.yml"), "--toc",
           str(ROOT / "book/_toc.yml"), "--path-output", str(out), "-W", "-n", "--keep-going"]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(proc.stdout)
    reports = sorted((out / "_build" / "html" / "reports").glob("**/*.err.log"))
    failed_log = [ln for ln in proc.stdout.splitlines() if "Execution Failed" in ln or "failed to execute" in ln.lower()]
    problems = []
    if proc.returncode != 0:
        problems.append(f"jupyter-book exited with {proc.returncode}")
    problems += [f"execution report: {r.relative_to(out)}" for r in reports]
    problems += failed_log
    if problems:
        print("\nBOOK BUILD FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        for report in reports:
            print(f"\n--- {report.name} ---\n" + report.read_text()[-3000:], file=sys.stderr)
        return 1
    key_file.write_text(key)
    print(f"\nBook built: {out / '_build' / 'html' / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
