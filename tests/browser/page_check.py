#!/usr/bin/env python3
"""Check Switchyard's admin status page in a real headless Chromium.

    python3 page_check.py --url http://127.0.0.1:PORT/ --expect NODE=HEALTH \
        [--expect NODE=HEALTH ...] [--expect-query TEXT ...] [--timeout 20] [--screenshot out.png]

Loads the page and polls the DOM until every expectation holds: there is at least
one node card `[data-node=NODE]`, every such card has `data-health=HEALTH`, and the
page is live (`<body data-connection="live">`, i.e. its last fetch of /status
worked, so stale cards left on screen after a lost connection do not count).
NODE may be written CLUSTER/NODE to look only inside `[data-cluster=CLUSTER]`.
`--expect-query TEXT`: a row of the top statements (`[data-query]`) shows a statement
containing TEXT.

Exit 0 and print `ok: page shows ...` when they all hold (after saving the
screenshot, if asked); exit 1 on timeout, printing what the page showed; exit 2
if the browser cannot be started or the arguments are wrong.

Needs `pip install selenium` and Debian's `chromium` and `chromium-driver`; never
lets Selenium download a driver or a browser.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
]

# Everything the checks and the failure report need, read in one round trip.
SNAPSHOT_JS = """
const q = (el, sel) => Array.from(el.querySelectorAll(sel));
return {
  connection: document.body ? document.body.getAttribute('data-connection') : null,
  last_update: (document.getElementById('last-update') || {}).textContent || null,
  cards: q(document, '[data-node]').map(c => {
    const cl = c.closest('[data-cluster]');
    return {cluster: cl ? cl.getAttribute('data-cluster') : null, node: c.getAttribute('data-node'),
            health: c.getAttribute('data-health'), role: c.getAttribute('data-role')};
  }),
  route_errors: q(document, '[data-route-error]').map(e => e.textContent.trim()),
  queries: q(document, '[data-query]').map(e => e.getAttribute('data-query')),
  banner: (() => { const b = document.getElementById('banner');
                   return b && b.offsetParent !== null ? b.textContent.trim() : null; })(),
};
"""


def parse_expect(text):
    node, sep, health = text.partition("=")
    if not sep or not node or not health:
        raise argparse.ArgumentTypeError(f"expected NODE=HEALTH, got {text!r}")
    cluster, _, name = node.rpartition("/")
    return (cluster or None, name, health)


def unmet(snapshot, expects, queries=()):
    """The expectations that do not hold on this snapshot, each with why."""
    out = []
    for cluster, node, health in expects:
        label = f"{cluster + '/' if cluster else ''}{node}={health}"
        cards = [c for c in snapshot["cards"]
                 if c["node"] == node and (cluster is None or c["cluster"] == cluster)]
        if not cards:
            out.append(f"{label}: no node card")
        elif any(c["health"] != health for c in cards):
            out.append(f"{label}: shows {','.join(c['health'] or '?' for c in cards)}")
    for text in queries:
        if not any(text in shown for shown in snapshot["queries"]):
            out.append(f"no top statement containing {text!r}")
    if snapshot["connection"] != "live" and not out:
        out.append(f"page connection is {snapshot['connection']!r}, not 'live'")
    return out


def describe(snapshot):
    lines = [f"  connection: {snapshot['connection']}   last update: {snapshot['last_update']}"]
    if snapshot["banner"]:
        lines.append(f"  banner: {snapshot['banner']}")
    for e in snapshot["route_errors"]:
        lines.append(f"  route error: {e}")
    if not snapshot["cards"]:
        lines.append("  no node cards")
    for c in snapshot["cards"]:
        lines.append(f"  node {c['cluster']}/{c['node']}: health={c['health']} role={c['role']}")
    for text in snapshot.get("queries", []):
        lines.append(f"  top statement: {text}")
    return "\n".join(lines)


def make_driver(user_data_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(service=service, options=options)


def save_screenshot(driver, path):
    # Grow the window to the page's height so the whole page is in the picture.
    height, chrome = driver.execute_script(
        "return [Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),"
        " window.outerHeight - window.innerHeight]")
    driver.set_window_size(1400, min(max(int(height) + int(chrome), 600), 8000))
    time.sleep(0.2)
    if not driver.save_screenshot(path):
        raise RuntimeError(f"could not save screenshot to {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--expect", action="append", type=parse_expect, required=True,
                    metavar="NODE=HEALTH", help="repeatable; NODE may be CLUSTER/NODE")
    ap.add_argument("--expect-query", action="append", default=[], metavar="TEXT",
                    help="repeatable: a row of the top statements shows a statement containing TEXT")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds to wait (default 20)")
    ap.add_argument("--screenshot", metavar="PNG")
    args = ap.parse_args()

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            print(f"error: {binary} not found (apt-get install -y chromium chromium-driver)",
                  file=sys.stderr)
            return 2
    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager must not go online

    t0 = time.monotonic()
    user_data_dir = tempfile.mkdtemp(prefix="switchyard-page-check-")
    driver = None
    try:
        try:
            driver = make_driver(user_data_dir)
        except Exception as e:  # noqa: BLE001 - report any start-up failure plainly
            print(f"error: could not start headless chromium: {e}", file=sys.stderr)
            return 2
        driver.set_page_load_timeout(max(args.timeout, 5))
        deadline = time.monotonic() + args.timeout
        while True:  # the server may not be listening yet: retry the load until the deadline
            try:
                driver.get(args.url)
                break
            except Exception as e:  # noqa: BLE001
                if time.monotonic() >= deadline:
                    msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
                    print(f"timeout after {args.timeout:g}s: could not load {args.url}: {msg}",
                          file=sys.stderr)
                    return 1
                time.sleep(0.5)

        snapshot, missing = None, ["page not read yet"]
        while True:
            try:
                snapshot = driver.execute_script(SNAPSHOT_JS)
                missing = unmet(snapshot, args.expect, args.expect_query)
            except Exception as e:  # noqa: BLE001 - page mid-render or reloading: try again
                missing = [f"could not read page: {e}"]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.2)

        if args.screenshot:
            save_screenshot(driver, args.screenshot)
        elapsed = time.monotonic() - t0
        if not missing:
            shown = " ".join(f"{c + '/' if c else ''}{n}={h}" for c, n, h in args.expect)
            print(f"ok: page shows {shown} ({elapsed:.1f}s)")
            return 0

        print(f"timeout after {args.timeout:g}s waiting for {args.url}", file=sys.stderr)
        for m in missing:
            print(f"  not met: {m}", file=sys.stderr)
        print("page showed:", file=sys.stderr)
        print(describe(snapshot) if snapshot else "  (nothing readable)", file=sys.stderr)
        try:
            for entry in driver.get_log("browser")[-10:]:
                print(f"  console {entry.get('level')}: {entry.get('message')}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - console logs are a nicety
            pass
        if args.screenshot:
            print(f"screenshot: {args.screenshot}", file=sys.stderr)
        return 1
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(user_data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
