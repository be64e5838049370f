"""Outcomes of one suite run ({test id: Outcome}), read from pytest's junit XML or from
Django's runner output, and the comparison of a target's outcomes with direct's."""

import fnmatch
import os
import re
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

PASSED, FAILED, ERROR, SKIPPED = "passed", "failed", "error", "skipped"
BAD = (FAILED, ERROR)
RANK = {PASSED: 0, SKIPPED: 1, FAILED: 2, ERROR: 3}

# The id of the pseudo-test that stands for the run as a whole: it fails when the
# runner crashed, timed out or never got to run tests (Django's setup, say).
RUN_ID = "(suite run)"


@dataclass
class Outcome:
    status: str
    message: str = ""
    marks: str = ""   # the suite's own markers of interest (timing, slow, flakey)


@dataclass
class RunResult:
    suite: str
    target: str
    outcomes: dict = field(default_factory=dict)
    seconds: float = 0.0
    exit_code: int = 0
    log: str = ""

    def counts(self):
        c = {PASSED: 0, FAILED: 0, ERROR: 0, SKIPPED: 0}
        for tid, o in self.outcomes.items():
            if tid != RUN_ID:
                c[o.status] += 1
        return c

    def add(self, tid, status, message="", marks=""):
        old = self.outcomes.get(tid)
        if old is None or RANK[status] > RANK[old.status]:
            self.outcomes[tid] = Outcome(status, first_line(message), marks)


def first_line(text):
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line[:400]
    return ""


# ---- pytest ---------------------------------------------------------------------------

def read_junit(path, result):
    """Fill `result` from a pytest junit XML (junit_family=xunit1: testcases carry `file`).
    Test ids are pytest node ids relative to the suite's root: file::Class::name."""
    tree = ET.parse(path)
    for tc in tree.iter("testcase"):
        name = tc.get("name", "")
        classname = tc.get("classname", "")
        file = tc.get("file")
        if file:
            module = file[:-3].replace("/", ".") if file.endswith(".py") else file
            cls = classname[len(module) + 1:] if classname.startswith(module + ".") else ""
            tid = "::".join(p for p in (file, cls, name) if p)
        else:
            tid = f"{classname}::{name}"
        status, message = PASSED, ""
        for child in tc:
            tag = child.tag
            if tag == "failure":
                st = FAILED
            elif tag == "error":
                st = ERROR
            elif tag == "skipped":
                st = SKIPPED
            else:
                continue
            msg = child.get("message") or child.text or ""
            if tag in ("failure", "error"):
                msg = exception_line(child.text or "", msg)
            if RANK[st] > RANK[status]:
                status, message = st, msg
        marks = ",".join(p.get("value", "") for p in tc.iter("property") if p.get("name") == "markers")
        result.add(tid, status, message, marks)


EXC_RE = re.compile(r"^(E\s+)?([A-Za-z_][\w.]*(Error|Exception|Violation|Failure|Aborted|Warning|Timeout|Exit|Interrupt|Failed)|AssertionError|Failed|assert)\b")


def exception_line(text, fallback):
    """The most telling line of a traceback: the first `E   SomeError: ...` line pytest
    prints, else the last exception-looking line, else pytest's message."""
    lines = text.splitlines()
    for line in lines:
        if line.startswith("E   "):
            return line[1:].strip()
    for line in reversed(lines):
        s = line.strip()
        if EXC_RE.match(s):
            return s
    return first_line(fallback) or first_line(text)


# ---- Django's runner (unittest, --verbosity 2) ---------------------------------------

# "test_x (basic.tests.ModelTest.test_x) ... ok" (the description may wrap to the next line)
DJ_HEAD = re.compile(r"^(\w+) \(([\w.]+)\)")
DJ_TAIL = re.compile(r"\.\.\. (ok|FAIL|ERROR|skipped.*|expected failure|unexpected success)\s*$")
DJ_BLOCK = re.compile(r"^(ERROR|FAIL): (\w+) \(([\w.]+)\)")
DJ_SEP = re.compile(r"^(=+|-+)$")


def read_django(text, result):
    current = None
    for line in text.splitlines():
        m = DJ_HEAD.match(line)
        if m:
            current = m.group(2)
        t = DJ_TAIL.search(line)
        if t and current:
            word = t.group(1)
            if word in ("ok", "unexpected success"):
                result.add(current, PASSED)
            elif word.startswith("skipped") or word == "expected failure":
                result.add(current, SKIPPED)
            current = None
    # Failure blocks: ERROR: name (id)\n----\ntraceback...\n<exception line>
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = DJ_BLOCK.match(lines[i])
        if not m:
            i += 1
            continue
        tid = m.group(3)
        if m.group(2) in ("setUpClass", "tearDownClass", "setUpModule", "tearDownModule"):
            tid = f"{m.group(3)}.{m.group(2)}"
        j = i + 1
        body = []
        while j < len(lines) and not lines[j].startswith(("ERROR: ", "FAIL: ")) \
                and not lines[j].startswith("Ran ") and not (lines[j].startswith("=====") and body):
            body.append(lines[j])
            j += 1
        exc = ""
        for line in reversed(body):
            if line.strip() and not DJ_SEP.match(line.strip()) and not line.startswith(" "):
                exc = line.strip()
                break
        result.add(tid, ERROR if m.group(1) == "ERROR" else FAILED, exc)
        i = j


# ---- allowlist and comparison ---------------------------------------------------------

@dataclass
class Allow:
    suite: str
    tests: list
    targets: list
    reason: str

    def matches(self, suite, tid, target):
        return (self.suite == suite and target in self.targets
                and any(tid == t or fnmatch.fnmatchcase(tid, t) for t in self.tests))


def load_allowlist(path):
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = tomllib.load(f)
    out = []
    for i, e in enumerate(data.get("allow", [])):
        missing = [k for k in ("suite", "test", "targets", "reason") if not e.get(k)]
        if missing:
            raise ValueError(f"{path}: entry {i + 1} lacks {', '.join(missing)}")
        tests = [e["test"]] if isinstance(e["test"], str) else list(e["test"])
        out.append(Allow(e["suite"], tests, list(e["targets"]), e["reason"]))
    return out


@dataclass
class Regression:
    tid: str
    status: str          # failed / error / missing (ran direct, not through the target)
    message: str
    allowed: Allow = None
    marks: str = ""


def compare(direct, through, allowlist):
    """Tests that pass direct and fail, error or did not run through the target."""
    out = []
    run_failed = through.outcomes.get(RUN_ID, Outcome(PASSED)).status in BAD
    for tid, d in sorted(direct.outcomes.items()):
        if d.status != PASSED:
            continue
        t = through.outcomes.get(tid)
        if t is None:
            if run_failed:
                continue  # the run as a whole failed: reported once, as RUN_ID
            status, message = "missing", "ran direct, not through the target"
        elif t.status in BAD:
            status, message = t.status, t.message
        else:
            continue
        allowed = next((a for a in allowlist if a.matches(direct.suite, tid, through.target)), None)
        out.append(Regression(tid, status, message, allowed, d.marks))
    return out


def improvements(direct, through):
    """Tests that fail direct but pass through the target (flaky, usually)."""
    return sorted(tid for tid, d in direct.outcomes.items()
                  if d.status in BAD and through.outcomes.get(tid, Outcome(SKIPPED)).status == PASSED)


def normalize(message):
    """A message with its numbers, quoted names and addresses blanked, to group alike."""
    m = re.sub(r"0x[0-9a-f]+", "0x…", message)
    m = re.sub(r"\d+", "N", m)
    m = re.sub(r"'[^']*'", "'…'", m)
    m = re.sub(r'"[^"]*"', '"…"', m)
    return m[:160]
