#!/usr/bin/env python
"""Open a `pipeline compare --html` report in headless Chromium and check that it really renders.

    python scripts/render_report.py REPORT.html [--screenshot report.png] [--chromium /usr/bin/chromium]

Chromium loads a copy of the report with a probe script appended (the report itself has no
script); after the load event the probe records every <img>'s decoded size and source scheme and
the number of image rows, and `--dump-dom` hands that back. Exit 0 only if every image decoded
(naturalWidth > 0) from an embedded data: URI (a report is self-contained: nothing is read from
disk or the network) and every pair row has its thumbnail. Chromium gets no file access beyond
the page itself. `--screenshot` also saves a PNG of the page for a human look.
Install Chromium with `apt-get install -y chromium` (Debian) if it is missing.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("render_report")

DEFAULT_CHROMIUM = "/usr/bin/chromium"

_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight, ok: i.complete,
                                               scheme: i.src.split(':')[0]}));
  const pre = document.createElement('pre');
  pre.id = 'render-probe';
  pre.textContent = JSON.stringify({title: document.title, rows: document.querySelectorAll('tr.pair').length,
                                    verdict: (document.querySelector('.verdict') || {}).textContent || '', imgs});
  document.body.appendChild(pre);
});
</script>"""


def find_chromium(explicit: str | None = None) -> str | None:
    for cand in (explicit, DEFAULT_CHROMIUM, shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome")):
        if cand and Path(cand).is_file():
            return cand
    return None


def _chromium(chromium: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    # --no-sandbox: containers usually run as root, where Chromium's sandbox refuses to start.
    # No --allow-file-access-from-files: the report embeds its images, and a page that needed to
    # read other local files would be a report to refuse, not to render.
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def probe_report(report: str | Path, chromium: str, timeout: float = 60.0) -> dict:
    """What Chromium rendered: {title, rows, verdict, imgs: [{alt, w, h, ok}]}."""
    text = Path(report).read_text(encoding="utf-8")
    if "</body>" not in text:
        raise ValueError(f"{report}: no </body>; not a report")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(text.replace("</body>", _PROBE + "</body>", 1), encoding="utf-8")
        res = _chromium(chromium, "--dump-dom", "--virtual-time-budget=10000", probe.as_uri(), timeout=timeout)
    m = re.search(r'<pre id="render-probe">(.*?)</pre>', res.stdout, re.S)
    if m is None:
        raise RuntimeError(f"chromium rendered no probe (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    return json.loads(html.unescape(m.group(1)))


def screenshot(report: str | Path, out: str | Path, chromium: str, timeout: float = 60.0) -> Path:
    out = Path(out).resolve()
    _chromium(chromium, f"--screenshot={out}", "--window-size=1400,2400", "--hide-scrollbars",
              Path(report).resolve().as_uri(), timeout=timeout)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {out}")
    return out


def problems(info: dict) -> list[str]:
    """Empty when every image decoded from an embedded data: URI and every pair row has one."""
    bad = [f"image {i['alt']!r} did not render ({i['w']}x{i['h']})" for i in info["imgs"] if not (i["ok"] and i["w"] > 0)]
    bad += [f"image {i['alt']!r} is not embedded (a {i.get('scheme')!r} URL)" for i in info["imgs"]
            if i.get("scheme") != "data"]
    if len(info["imgs"]) != info["rows"]:
        bad.append(f"{info['rows']} image rows but {len(info['imgs'])} images")
    return bad


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--chromium", default=None, help=f"browser binary [default: {DEFAULT_CHROMIUM} or on PATH]")
    ap.add_argument("--screenshot", type=Path, default=None, help="also save a PNG of the rendered page")
    args = ap.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        log.error("no Chromium found; install it (apt-get install -y chromium) or pass --chromium")
        return 2
    info = probe_report(args.report, chromium)
    log.info("%s: %d image rows, %d images; %s", info["title"], info["rows"], len(info["imgs"]), info["verdict"])
    if args.screenshot:
        log.info("screenshot: %s", screenshot(args.report, args.screenshot, chromium))
    bad = problems(info)
    for b in bad:
        log.error(b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
