"""Open the built book (``_build/html``) in headless Chromium, as a reader would, and fail on what a reader would see.

Per page: raw TeX left in the text after MathJax ran (``\\(``, ``$$``, ``\\frac`` ...) or a formula MathJax could not
typeset; a console error or uncaught script error; a request that failed or got an HTTP error; any request to a
host other than this machine (the book must work offline: no CDN; such requests are blocked and reported); an image
that did not load; a chapter (a page built from a notebook) with fewer figures than ``--min-figures`` or than its
executed notebook made. Run by ``make check-html`` after ``make html``; not a pytest module. Usage:

    python tests/check_book_html.py                                   # every page of _build/html
    python tests/check_book_html.py --pages 03_lora 09 --screenshots _build/screenshots   # + full-page PNGs

Needs Chromium (Debian: ``apt-get install chromium``; elsewhere ``--chromium PATH``) and the ``playwright`` Python
package; ``playwright install`` is not needed (the system's Chromium is used). The pages are served by Python's
http.server on 127.0.0.1; every wait is bounded (``--timeout`` per page).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

# Chromium's own traffic (updates, sync, field trials) would otherwise reach Google hosts; it never passes the
# page's request routing, but turning it off keeps an offline machine quiet
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-default-apps"]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
REPOSITORY = Path(__file__).resolve().parents[1]  # where the book was built: no page may name it
# TeX that survived rendering: math delimiters, `$$`, a control word, or $...$ holding a sub/superscript or a
# backslash (plain braces are not enough: chapter 08 shows MILE's templates, "{$question}Option:{$options}")
RAW_TEX = re.compile(r"\\[()\[\]]|\$\$|\\[A-Za-z]{2,}|\$[^$\s][^$\n]*?[\\^_][^$\n]*?\$")
# Jupyter Book's index.html only sends the reader on to the root page
REDIRECT = re.compile(r'<meta http-equiv="refresh" content="\d+; ?url=([^"]+)"', re.IGNORECASE)
# cells whose outputs myst-nb leaves out of the page
REMOVED_TAGS = {"remove-cell", "remove-output"}

# Runs in the page: waits (at most `ms`) for MathJax's first typeset and for every image, then reports what a
# reader sees. Text inside code, scripts and typeset math is not prose, so it is not searched for raw TeX.
PAGE_REPORT_JS = """
async (ms) => {
  const timeout = (t) => new Promise((r) => setTimeout(() => r("timeout"), t));
  const deadline = Date.now() + ms;
  let mathjax = "absent";
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    mathjax = await Promise.race([MathJax.startup.promise.then(() => "done", (e) => "failed: " + e),
                                  timeout(deadline - Date.now())]);
  } else if (document.querySelector('script[src*="mathjax" i]')) {
    mathjax = "not started";  // the script tag is there but it did not load (deferred scripts ran before `load`)
  }
  const images = Array.from(document.images);
  images.forEach((img) => { img.loading = "eager"; });
  const settled = images.map((img) => img.complete ? null
    : new Promise((r) => { img.addEventListener("load", r); img.addEventListener("error", r); }));
  await Promise.race([Promise.all(settled), timeout(Math.max(0, deadline - Date.now()))]);
  const text = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const skip = "pre, code, script, style, textarea, noscript, template, mjx-container, .highlight";
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.textContent.trim() && !node.parentElement.closest(skip)) text.push(node.textContent);
  }
  return {
    mathjax,
    formulas: document.querySelectorAll("mjx-container").length,
    mathErrors: Array.from(document.querySelectorAll("mjx-merror"),
                           (e) => e.getAttribute("data-mjx-error") || e.textContent),
    images: images.map((img) => ({src: img.currentSrc || img.src, loaded: img.complete && img.naturalWidth > 0,
                                  figure: !!img.closest("article")})),
    text: text.join("\\n"),
    // tables wider than the text column are cut at its right edge (or need a sideways scroll)
    wideTables: Array.from(document.querySelectorAll("article table"), (t) => {
      const column = t.closest("article").getBoundingClientRect().width;
      const width = t.getBoundingClientRect().width;
      return width > column + 1 ? `${Math.round(width)} px in a ${Math.round(column)} px column: `
        + t.innerText.slice(0, 60).replace(/\\s+/g, " ") : null;
    }).filter(Boolean),
  };
}
"""


def serve(root: Path) -> ThreadingHTTPServer:
    """Serve ``root`` on 127.0.0.1 at a free port, from a daemon thread (stopped by ``shutdown()``)."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # failed requests are reported by the browser side
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def book_pages(root: Path, names: list[str]) -> list[Path]:
    """The HTML pages of the build (paths relative to ``root``), all or those ``names`` name (stem or its prefix)."""
    pages = sorted(p.relative_to(root) for p in root.rglob("*.html")
                   if not any(part.startswith("_") for part in p.relative_to(root).parts))
    if not pages:
        raise SystemExit(f"{root}: no HTML pages (run `make html` first, or pass the build folder)")
    if not names:
        return pages
    chosen = []
    for name in names:
        name = name.removesuffix(".html")
        hits = [p for p in pages if name in (p.stem, p.with_suffix("").as_posix()) or p.stem.startswith(name + "_")]
        if len(hits) != 1:
            known = ", ".join(p.with_suffix("").as_posix() for p in pages)
            raise SystemExit(f"--pages {name}: matches {len(hits)} pages, expected 1 (pages: {known})")
        chosen += hits
    return chosen


def notebook_figures(root: Path, page: Path) -> int | None:
    """How many images the page's executed notebook shows (from the build's copy of the source), or None."""
    source = root / "_sources" / page.with_suffix(".ipynb")
    if not source.is_file():
        return None
    cells = json.loads(source.read_text(encoding="utf-8"))["cells"]
    return sum(key.startswith("image/") for cell in cells if not REMOVED_TAGS & set(cell["metadata"].get("tags", []))
               for output in cell.get("outputs", []) for key in output.get("data", {}))


def check_page(context, base: str, root: Path, page: Path, timeout: float, min_figures: int,
               shot: Path | None) -> list[str]:
    """Load one page and return its problems (empty when the page is fine)."""
    problems: list[str] = []
    reported: set[str] = set()  # URLs already named (blocked or HTTP error): their console echo adds nothing

    def route(r) -> None:
        url = r.request.url
        if urlsplit(url).scheme in ("http", "https", "ws", "wss") and urlsplit(url).hostname not in LOCAL_HOSTS:
            reported.add(url)
            problems.append(f"requests a non-local resource (the book must work offline): {url}")
            r.abort()
        else:
            r.continue_()

    def console(msg) -> None:
        where = msg.location.get("url", "")
        if msg.type == "error" and where not in reported:
            problems.append(f"console error: {msg.text} ({where})")

    def failed(request) -> None:
        if request.url not in reported:
            problems.append(f"request failed: {request.url} ({request.failure})")

    def response(resp) -> None:
        if resp.status >= 400:
            reported.add(resp.url)
            problems.append(f"HTTP {resp.status} for {resp.url}")

    tab = context.new_page()
    tab.route("**/*", route)
    tab.on("console", console)
    tab.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    tab.on("requestfailed", failed)
    tab.on("response", response)
    start = time.monotonic()
    try:
        tab.goto(f"{base}/{page.as_posix()}", wait_until="load", timeout=timeout * 1000)
        report = tab.evaluate(PAGE_REPORT_JS, max(1.0, timeout - (time.monotonic() - start)) * 1000)
        if shot is not None:
            shot.parent.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(shot), full_page=True, timeout=timeout * 1000)
    except Exception as error:  # a playwright TimeoutError or a crashed page: name it and go on with the others
        report = None
        problems.append(f"did not finish loading within {timeout:.0f} s: {str(error).splitlines()[0]}")
    finally:
        tab.close()
    if report is not None:
        problems += _report_problems(report, root, page, timeout, min_figures)
        print(f"  {page.as_posix()}: {report['figures']} figure(s), {report['formulas']} formula(s), "
              f"{time.monotonic() - start:.1f} s{', screenshot ' + str(shot) if shot else ''}", flush=True)
    # a resource used twice fails twice: once is enough; local URLs are named by their path in the build
    return list(dict.fromkeys(problem.replace(base + "/", "") for problem in problems))


def _report_problems(report: dict, root: Path, page: Path, timeout: float, min_figures: int) -> list[str]:
    """What the in-page report (PAGE_REPORT_JS) shows wrong: math, raw TeX, images, missing figures."""
    problems = []
    if report["mathjax"] == "not started":
        problems.append("MathJax did not start: its script is on the page but did not load")
    elif report["mathjax"] == "timeout":
        problems.append(f"MathJax's typeset promise did not settle within {timeout:.0f} s")
    elif report["mathjax"] not in ("done", "absent"):
        problems.append(f"MathJax {report['mathjax']}")
    problems += [f"MathJax could not typeset: {error}" for error in report["mathErrors"]]
    raw = list(RAW_TEX.finditer(report["text"]))
    for match in raw[:3]:  # one formula left raw shows several matches (`\(`, `\frac`, ...): a few tell enough
        context_text = report["text"][max(0, match.start() - 40):match.end() + 40].replace("\n", " ")
        problems.append(f"raw TeX `{match.group(0)}` in the text ({len(raw)} in all): ...{context_text}...")
    problems += [f"image did not load: {img['src']}" for img in report["images"] if not img["loaded"]]
    problems += [f"table wider than the page: {table}" for table in report.get("wideTables", [])]
    source = (root / page).read_text(encoding="utf-8", errors="replace")  # code and outputs included
    markers = {str(REPOSITORY): "the build machine's path of the repository", "NBVAL": "a test marker"}
    problems += [f"{what} ({marker!r}) in the page" for marker, what in markers.items() if marker in source]
    report["figures"] = shown = sum(img["loaded"] and img["figure"] for img in report["images"])
    made = notebook_figures(root, page)
    if made is not None and shown < max(made, min_figures):
        problems.append(f"shows {shown} figure(s); its notebook made {made} (a chapter needs at least {min_figures})")
    return problems


def find_chromium(given: str | None) -> str:
    path = given or os.environ.get("CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if not path or not Path(path).exists():
        raise SystemExit(f"Chromium not found ({given or 'chromium on PATH'}): install it (Debian: "
                         "`apt-get install chromium`) or pass --chromium PATH")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", nargs="?", default="_build/html", type=Path, help="the built book (_build/html)")
    parser.add_argument("--pages", nargs="+", default=[], help="pages to check (stem or prefix: 03_lora, 09); all")
    parser.add_argument("--screenshots", type=Path, help="save a full-page PNG of each checked page here")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one page may take (default 30)")
    parser.add_argument("--min-figures", type=int, default=1,
                        help="figures every chapter (a page built from a notebook) shows (default 1)")
    parser.add_argument("--chromium", help="the Chromium executable (default: $CHROMIUM or chromium on PATH)")
    args = parser.parse_args(argv)
    if not (args.build / "index.html").is_file():
        raise SystemExit(f"{args.build}: no index.html (run `make html` first, or pass the build folder)")
    pages = book_pages(args.build, args.pages)
    chromium = find_chromium(args.chromium)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("the browser check needs the playwright package: pip install playwright "
                         "(not `playwright install`: the system's Chromium is used)") from None
    server = serve(args.build)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    # a page's script can hang the browser itself, where no playwright timeout reaches: end the check, naming it
    watchdog = threading.Timer(0, lambda: None)
    found: dict[str, list[str]] = {}
    start = time.monotonic()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
                                         timeout=args.timeout * 1000)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            for page in pages:
                watchdog.cancel()
                watchdog = threading.Timer(3 * args.timeout, _give_up, (page, 3 * args.timeout, found))
                watchdog.daemon = True
                watchdog.start()
                if target := REDIRECT.search((args.build / page).read_text(encoding="utf-8", errors="replace")):
                    if not (args.build / page.parent / target.group(1).split("#")[0]).is_file():
                        found[page.as_posix()] = [f"redirects to a missing page: {target.group(1)}"]
                    continue  # its target is checked as a page of its own
                shot = args.screenshots / f"{page.stem}.png" if args.screenshots else None
                if problems := check_page(context, base, args.build, page, args.timeout, args.min_figures, shot):
                    found[page.as_posix()] = problems
            watchdog.cancel()
            browser.close()
    finally:
        server.shutdown()
    print(f"checked {len(pages)} page(s) of {args.build} in {time.monotonic() - start:.1f} s")
    _print_problems(found)
    return 1 if found else 0


def _print_problems(found: dict[str, list[str]]) -> None:
    for page, problems in found.items():
        for problem in problems:
            print(f"{page}: {problem}", file=sys.stderr)
    if found:
        print(f"{len(found)} page(s) with problems", file=sys.stderr, flush=True)


def _give_up(page: Path, seconds: float, found: dict[str, list[str]]) -> None:
    _print_problems(found)
    print(f"{page.as_posix()}: the browser did not answer for {seconds:.0f} s (a hung page?); check stopped",
          file=sys.stderr, flush=True)
    os._exit(1)  # the playwright driver ends with its parent and takes Chromium with it


if __name__ == "__main__":
    sys.exit(main())
