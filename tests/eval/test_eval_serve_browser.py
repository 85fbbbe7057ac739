"""The rating app end to end in headless Chromium (Debian's chromium + chromedriver,
driven by selenium): a rater starts, answers, the server is killed mid-session and
restarted, the page carries on and a reload resumes; a second, careless rater is
screened out; the CLI report says so."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing

import pytest
from support.eval_helpers import make_samples


def _find(*names):
    for n in names:
        if n and (os.path.isfile(n) or shutil.which(n)):
            return n if os.path.isfile(n) else shutil.which(n)
    return None


CHROMIUM = _find(os.environ.get("CHROMIUM_BIN"), "chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = _find(os.environ.get("CHROMEDRIVER_BIN"), "chromedriver",
                     "/usr/lib/chromium/chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason=f"headless browser test needs chromium and chromedriver on PATH (found chromium="
           f"{CHROMIUM}, chromedriver={CHROMEDRIVER}); Debian: apt-get install chromium "
           f"chromium-driver (.ci/run does)")

SERVE = [sys.executable, "-m", "imagen_fast.cli", "eval", "serve"]


class Server:
    """`imagen-fast eval serve` as a child process."""

    def __init__(self, args, port=0):
        self.proc = subprocess.Popen(SERVE + args + ["--port", str(port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.url, lines = None, []
        timer = threading.Timer(60, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                lines.append(line)
                if line.startswith("serving the rating app on "):
                    self.url = line.split(" on ", 1)[1].strip()
                    break
        finally:
            timer.cancel()
        if self.url is None:
            raise RuntimeError("server did not start:\n" + "".join(lines))
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])

    def kill(self):
        self.proc.kill()           # SIGKILL: no chance to flush anything
        self.proc.wait(10)


def right_answer(db_path, trial_id, right=True):
    """The button a rater should press (or, with right=False, a wrong one for controls)."""
    with closing(sqlite3.connect(db_path)) as db:
        kind, control, expected, swapped = db.execute(
            "SELECT q.kind, q.control, q.expected, t.swapped FROM trials t JOIN questions q "
            "ON q.id = t.question WHERE t.id = ?", (trial_id,)).fetchone()
    if kind == "alignment":
        return ("no" if right else "yes") if control else "somewhat"
    if not control:
        return "left"
    left_is_expected = (expected == "a") != bool(swapped)
    return "left" if left_is_expected == right else "right"


def stored_value(db_path, trial_id, choice):
    """What the store keeps for a button: A/B in the question's own order."""
    with closing(sqlite3.connect(db_path)) as db:
        kind, swapped = db.execute("SELECT q.kind, t.swapped FROM trials t JOIN questions q ON "
                                   "q.id = t.question WHERE t.id = ?", (trial_id,)).fetchone()
    if kind == "alignment" or choice == "indifferent":
        return choice
    return "a" if (choice == "left") != bool(swapped) else "b"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1000", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, cond, timeout=30, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: cond(d), message=f"timed out waiting for {what}")


def _visible(driver, element_id):
    return driver.execute_script(f"return !document.getElementById('{element_id}').hidden")


def _current_trial(driver, previous):
    def ready(d):
        if _visible(d, "done"):
            return "done"
        if _visible(d, "trial"):
            t = d.execute_script("return document.getElementById('trial').dataset.trial")
            buttons = d.find_elements("css selector", "#choices button:not([disabled])")
            if t and t != previous and buttons:
                return t
        return False
    return _wait(driver, ready, what="the next trial")


def _click(driver, value):
    driver.find_element("css selector", f'#choices button[data-answer="{value}"]').click()


def _start(driver, url, name):
    driver.get(url)
    driver.execute_script("localStorage.clear()")
    driver.get(url)
    _wait(driver, lambda d: _visible(d, "start"), what="the start form")
    driver.find_element("id", "rater-name").send_keys(name)
    driver.find_element("id", "start-button").click()


def test_rating_session_survives_a_server_restart(tmp_path, browser):
    samples = make_samples(tmp_path / "samples", 12)
    db = str(tmp_path / "ratings.sqlite")
    study = ["--db", db, "--samples", samples, "--batch-size", "10", "--control-every", "5"]
    server = Server(study)
    try:
        _start(browser, server.url, "alice")
        seen, trial = [], None
        for _ in range(4):
            trial = _current_trial(browser, trial)
            seen.append(int(trial))
            _click(browser, right_answer(db, int(trial)))
        trial = _current_trial(browser, trial)
        # the server dies with a trial on screen; the rater answers it while it is down
        server.kill()
        during_outage = int(trial)
        choice = right_answer(db, during_outage)
        _click(browser, choice)
        _wait(browser, lambda d: _visible(d, "status") and "lost" in
              d.find_element("id", "status").text, what="the connection-lost banner")
        server = Server(study, port=server.port)     # same database, same port
        trial = _current_trial(browser, trial)        # the page's retry went through
        seen.append(during_outage)
        assert not _visible(browser, "status")
        # a reload resumes the batch from the stored token
        browser.refresh()
        trial = _current_trial(browser, None)
        assert int(trial) not in seen
        while trial != "done":
            seen.append(int(trial))
            _click(browser, right_answer(db, int(trial)))
            trial = _current_trial(browser, trial)
        code = browser.find_element("id", "code").text
        assert len(code) == 10
        with closing(sqlite3.connect(db)) as con:
            rows = con.execute("SELECT t.id, t.position, t.answer FROM trials t JOIN raters r ON "
                               "r.id = t.rater WHERE r.name = 'alice' ORDER BY t.position").fetchall()
        assert [r[0] for r in rows] == seen                  # in order, each exactly once
        assert len(rows) == 12 and all(r[2] is not None for r in rows)
        stored = dict((r[0], r[2]) for r in rows)[during_outage]
        assert stored == stored_value(db, during_outage, choice)

        # a careless second rater in the same browser
        _start(browser, server.url, "careless")
        trial = None
        while True:
            trial = _current_trial(browser, trial)
            if trial == "done":
                break
            _click(browser, right_answer(db, int(trial), right=False))
    finally:
        server.kill()
    out = subprocess.run(SERVE + ["--db", db, "--report", "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["raters"]["total"] == 2 and rep["raters"]["kept"] == 1
    kept = [d for d in rep["raters"]["details"] if d["kept"]]
    assert kept[0]["name"] == "alice" and kept[0]["control_accuracy"] == 1.0
    # only alice's 10 real answers count
    assert sum(x["n"] for x in rep["ab"]) + sum(x["n"] for x in rep["alignment"]) == 10
