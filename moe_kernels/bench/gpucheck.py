"""The summary that bench/gpu_check.sh prints last: each step's exit code and time,
tests passed/failed per test file (from the ``pytest -v`` logs, so a run cut short by
its timeout still counts what finished), and the best fraction of the roofline per
shape and T from every ``*/results.csv`` of the run.

``python -m moe_kernels.bench.gpucheck OUTDIR`` prints it and writes OUTDIR/summary.txt.
"""

from __future__ import annotations

import glob
import math
import os
import re
import sys
from collections import Counter, defaultdict

from .report import read_csv

__all__ = ["parse_pytest_log", "summarize", "main"]

_RESULT = re.compile(r"^(tests/[^:\s]+\.py)::\S.*? (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_COLLECT_ERROR = re.compile(r"^ERROR (tests/\S+\.py)(?: - |$)")
# pytest exit codes that mean "nothing wrong": 0 all passed, 5 no test selected
_OK_RC = {"0", "5"}


def parse_pytest_log(text: str) -> dict[str, Counter]:
    """Per test file, how many tests PASSED / FAILED / ERROR / SKIPPED / XFAIL / XPASS,
    from ``pytest -v`` progress lines; a collection error counts as one ERROR."""
    out: dict[str, Counter] = defaultdict(Counter)
    for line in text.splitlines():
        m = _RESULT.match(line)
        if m:
            out[m.group(1)][m.group(2)] += 1
            continue
        m = _COLLECT_ERROR.match(line)
        if m:
            out[m.group(1)]["ERROR"] += 1
    return dict(out)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), *(fmt.format(*r) for r in rows)]


def _steps(outdir: str) -> tuple[list[str], bool]:
    lines, ok = [], True
    rows = []
    for line in _read(os.path.join(outdir, "steps.tsv")).splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, rc, secs = parts
        status = "ok" if rc in _OK_RC else ("skipped" if rc == "skipped" else
                                            ("TIMEOUT" if rc in ("124", "130", "137") else f"FAILED (rc {rc})"))
        ok &= status in ("ok", "skipped") or name in ("env", "info")
        rows.append([name, status, f"{secs}s"])
    if rows:
        lines += ["Steps:", *("  " + r for r in _table(["step", "status", "time"], rows))]
    return lines, ok


def _tests(outdir: str) -> tuple[list[str], bool]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for log in sorted(glob.glob(os.path.join(outdir, "tests*.log"))):
        for f, c in parse_pytest_log(_read(log)).items():
            counts[f].update(c)
    if not counts:
        return ["Tests: no test results found"], True
    rows, total = [], Counter()
    for f in sorted(counts):
        c = counts[f]
        total.update(c)
        rows.append([f, str(c["PASSED"] + c["XPASS"]), str(c["FAILED"]), str(c["ERROR"]), str(c["SKIPPED"] + c["XFAIL"])])
    rows.append(["total", str(total["PASSED"] + total["XPASS"]), str(total["FAILED"]), str(total["ERROR"]),
                 str(total["SKIPPED"] + total["XFAIL"])])
    return (["Tests by file:", *("  " + r for r in _table(["file", "passed", "failed", "errors", "skipped"], rows))],
            total["FAILED"] == 0 and total["ERROR"] == 0)


def _frac(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _bench(outdir: str) -> list[str]:
    rows = []
    for path in sorted(glob.glob(os.path.join(outdir, "*", "results.csv"))):
        rows += read_csv(path)
    if not rows:
        return ["Benchmark: no results.csv found"]
    status = Counter(r["status"] for r in rows)
    groups: dict[tuple, dict[int, tuple[float, str]]] = defaultdict(dict)
    tokens: set[int] = set()
    for r in rows:
        key = (r["mode"], r["shape"])
        groups.setdefault(key, {})
        f = _frac(r.get("frac_roofline"))
        if r["status"] != "ok" or math.isnan(f):
            continue
        t = int(r["T"])
        tokens.add(t)
        if t not in groups[key] or f > groups[key][t][0]:
            groups[key][t] = (f, r["provider"])
    ts = sorted(tokens)
    table = [[f"{shape} {mode}", *(f"{best[t][0] * 100:.0f}% {best[t][1]}" if t in best else "-" for t in ts)]
             for (mode, shape), best in groups.items()]
    meta = rows[0]
    return [f"Benchmark ({meta.get('device_name', '')}, {meta.get('dtype', '')}, {meta.get('size', '')} shapes; "
            f"{status['ok']} ok, {status['skipped']} skipped, {status['error']} errors): "
            "best fraction of the roofline (provider)",
            *("  " + r for r in _table(["shape mode", *(f"T={t}" for t in ts)], table))]


def summarize(outdir: str) -> tuple[str, bool]:
    """(summary text, whether every step, test and benchmark cell went right)."""
    steps, steps_ok = _steps(outdir)
    tests, tests_ok = _tests(outdir)
    bench = _bench(outdir)
    ok = steps_ok and tests_ok
    lines = [f"== gpu_check summary: {outdir}", *steps, "", *tests, "", *bench, "",
             "RESULT: " + ("all steps passed" if ok else "some steps or tests FAILED (see the logs above)")]
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m moe_kernels.bench.gpucheck OUTDIR", file=sys.stderr)
        return 2
    text, ok = summarize(argv[0])
    with open(os.path.join(argv[0], "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
