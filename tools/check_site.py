"""Open the rendered book in headless Chromium and check that pages really load.

    python tools/check_site.py build/book-fast/_build/html [--screenshot DIR]

The site is served on localhost by a server that records every request. For the index and one chapter page
the check asserts that the page's title is right, that it shows at least one figure that was actually served, and
that no request for a page asset (CSS, JavaScript, image, font) failed. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

PAGES = [
    ("index.html", "Deep learning for spatial transcriptomics integration", False),
    ("chapters/p0_foundations/c00_modalities_and_tasks.html", "Modalities and tasks", True),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--virtual-time-budget=8000"]


class _Recorder(SimpleHTTPRequestHandler):
    requests: ClassVar[list] = []

    def log_message(self, fmt, *args):  # keep the output quiet; record instead
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the browser closed early; nothing to report
            pass

    def send_response(self, code, message=None):
        type(self).requests.append((self.path, code))
        super().send_response(code, message)


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.title, self.images, self._in_title, self._titles = "", [], False, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "title":
            self._titles += 1
            self._in_title = self._titles == 1  # the page's own <title>; icons carry <title>s of their own
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("Chromium is not installed: `apt-get install chromium` (Debian) — .ci/run does this.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None, help="also save a PNG of each page here")
    args = parser.parse_args()
    if not (args.site / "index.html").exists():
        sys.exit(f"{args.site}/index.html does not exist: build the book first.")
    handler = functools.partial(_Recorder, directory=str(args.site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    browser = chromium()
    failures = []
    for page, expected_title, needs_figure in PAGES:
        _Recorder.requests.clear()
        with tempfile.TemporaryDirectory() as profile:
            cmd = [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", base + page]
            dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
            if args.screenshot:
                args.screenshot.mkdir(parents=True, exist_ok=True)
                shot = args.screenshot / (Path(page).stem + ".png")
                subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1600",
                                f"--screenshot={shot.resolve()}", base + page], capture_output=True, timeout=120)
        parsed = _PageParser()
        parsed.feed(dom)
        served = {path.split("?")[0] for path, code in _Recorder.requests if code == 200}
        missing = sorted({path for path, code in _Recorder.requests if code >= 400})
        figures = [src for src in parsed.images if "_images/" in src or src.startswith("data:image")]
        figures_served = [s for s in figures if s.startswith("data:") or any(p.endswith(s.split("/")[-1]) for p in served)]
        status = []
        if expected_title not in parsed.title:
            status.append(f"title {parsed.title.strip()!r} lacks {expected_title!r}")
        if needs_figure and not figures_served:
            status.append("no figure was rendered and served")
        if missing:
            status.append(f"missing assets: {missing[:5]}")
        print(f"{page}: title={parsed.title.strip()!r}, figures={len(figures_served)}, requests={len(served)}"
              + (f"  FAIL: {'; '.join(status)}" if status else "  ok"))
        failures += status
    server.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
