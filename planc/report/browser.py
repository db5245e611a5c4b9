"""The inspect page in headless Chromium: the README's screenshot, and what the browser tests drive.

Uses the machine's Chromium (Debian's `chromium` package, or CHROMIUM=PATH) through Playwright
(`pip install playwright`; its own browser download is never used). The page is loaded from a
file, with background networking off, so every request it makes is its own, and the tests can
require that there are none.

    python3 -m planc.report.browser ARTIFACT OUT.png [--width 1280] [--height 900]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps")


def find_chromium() -> str | None:
    """$CHROMIUM, or the first Chromium on PATH."""
    given = os.environ.get("CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


def unavailable() -> str | None:
    """Why a browser cannot be driven here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright)"
    if find_chromium() is None:
        return "no Chromium found (install Debian's chromium package, or set CHROMIUM=PATH)"
    return None


@dataclass
class Opened:
    """A loaded page and everything it said or asked for while loading and afterwards."""
    page: object
    console: list[str] = field(default_factory=list)  # "type: text" of every console message and page error
    requests: list[str] = field(default_factory=list)  # every URL requested after the page itself


@contextmanager
def open_page(html: Path, *, width: int = 1280, height: int = 900) -> Iterator[Opened]:
    """HTML loaded in headless Chromium at a viewport of width × height."""
    from playwright.sync_api import sync_playwright

    why = unavailable()
    if why:
        raise RuntimeError(why)
    url = Path(html).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="planc-chromium-") as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=find_chromium(), args=list(FLAGS), headless=True,
            viewport={"width": width, "height": height})
        try:
            page = browser.new_page()
            opened = Opened(page)
            page.on("console", lambda m: opened.console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: opened.console.append(f"pageerror: {e}"))
            page.on("request", lambda r: opened.requests.append(r.url) if r.url != url else None)
            page.goto(url, wait_until="load")
            yield opened
        finally:
            browser.close()


def screenshot(artifact: Path, out: Path, *, width: int = 1280, height: int = 900) -> Path:
    """The inspect page of ARTIFACT as a PNG of its first width × height pixels, written atomically."""
    from planc.codegen.replace import replace_file
    from planc.report.inspect import write

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="planc-shot-") as tmp:
        html = write(artifact, Path(tmp) / "inspect.html")
        with open_page(html, width=width, height=height) as opened:
            shot = Path(tmp) / "shot.png"
            opened.page.screenshot(path=str(shot))
        return replace_file(out, shot.read_bytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m planc.report.browser",
                                     description="screenshot an artifact's inspect page in headless Chromium")
    parser.add_argument("artifact", type=Path, help="a directory `planc compile` wrote")
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in px (default: %(default)s)")
    parser.add_argument("--height", type=int, default=900, help="viewport height in px (default: %(default)s)")
    args = parser.parse_args(argv)
    why = unavailable()
    if why:
        print(f"planc: cannot take a screenshot: {why}", file=sys.stderr)
        return 2
    print(f"wrote {screenshot(args.artifact, args.out, width=args.width, height=args.height)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
