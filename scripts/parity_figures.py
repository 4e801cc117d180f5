"""pytest plugin: how close each parity test comes to its own bound (changes no assertion).

    cd <checkout> && OMP_NUM_THREADS=1 TRITON_INTERPRET=1 PYTHONPATH=<checkout>:/work/main/scripts \
        python3 -m pytest -q -p no:cacheprovider -p parity_figures --parity-json OUT.json <test files>

For every comparison a test makes it records the measured error as a fraction of the bound the test allows
(1.0 = exactly at the bound; > 1 = the comparison failed), per test id:

  * torch.testing.assert_close / numpy.testing.assert_allclose / torch.allclose (called from a tests/ file):
        max over elements of |a − b| / (atol + rtol·|b|), with the call's rtol/atol or the function's defaults
        (assert_close: torch's per-dtype defaults). torch.allclose calls that return False are not counted (a
        passing test used them as a "must differ" check or a branch); assert_* calls that raise inside a passing
        test (pytest.raises) are not counted either.
  * tests/_tol.py: assert_close_per_element (max |g − w| / (rtol·(|w| + floor))) and assert_err_within
        (err / (2·err(base) + atol·scale)); their internal asserts are not rewritten by pytest, so they are wrapped.
  * every other `assert <error> <= <bound>` (or <) in a rewritten test module, e.g. `assert rel(a, b) <= TOL`,
        `assert err <= 1e-4`, `assert abs(x - y).max() < 1e-4`: through pytest's assertion-pass hook (the plugin
        turns `enable_assertion_pass_hook` on and caches its rewritten test modules under a separate pyc name, so it
        neither reads nor leaves pycs that other pytest runs use) and pytest_assertrepr_compare, which sees both
        operands of each comparison. Counted: `<`/`<=` between real scalars (Python/NumPy floats, 0-d tensors), at
        least one a float, left >= 0, right > 0; `>`/`>=` only where the right side came from an error helper.
        Integer comparisons (counts, lengths) and `==` are not errors and are skipped.
  * error helpers defined in test modules (HELPERS below: rel, _rel, rel_err, max_err) are wrapped so that their
        result carries the raw max abs / rel error of their two arguments; the comparison that uses the result
        (`rel(a, b) <= TOL`) then reports those raw figures too.

Output: a JSON (--parity-json, default parity_figures.json) with, per test: outcome, worst fraction, the comparison
that gave it (kind and file:line), number of comparisons, and the raw max abs error, max elementwise rel error
|a−b|/|b| and max|a−b|/max|b| over its measured comparisons; plus every comparison site (file:line) with its count and
worst fraction, for auditing what was counted. The terminal summary prints the median and the worst of the per-test
worst fractions and the worst 5 tests.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest

HELPERS = ("rel", "_rel", "rel_err", "max_err")  # test-module error helpers: f(got, want) -> float

_current: str | None = None
_records: dict[str, list[dict]] = {}
_outcomes: dict[str, str] = {}
_tests_root: list[str] = []  # absolute "…/tests/" prefixes whose callers count
_wrapped_helpers: dict[str, list[str]] = {}
_meta: dict = {}


# ---------------------------------------------------------------------------------------------------------------------
# measuring

def _f64(x):
    import torch
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(x)
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError("not a real tensor")
    return t.to("cpu", torch.float64)


def _raw(a, b) -> dict | None:
    """max |a − b|, max |a − b|/|b| (elements with b != 0) and max|a − b| / max|b|, in float64."""
    try:
        import torch
        x, y = _f64(a), _f64(b)
        x, y = torch.broadcast_tensors(x, y)
        if x.numel() == 0:
            return {"max_abs": 0.0, "max_rel": 0.0, "max_rel_to_max": 0.0}
        both_nan = torch.isnan(x) & torch.isnan(y)
        d = (x - y).abs().masked_fill(both_nan, 0.0).nan_to_num(nan=math.inf)
        ay = y.abs().nan_to_num(nan=0.0)
        nz = ay > 0
        max_rel = (d[nz] / ay[nz]).max().item() if nz.any() else (0.0 if d.max().item() == 0 else math.inf)
        m = ay.max().item()
        return {"max_abs": d.max().item(), "max_rel": max_rel,
                "max_rel_to_max": d.max().item() / m if m > 0 else (0.0 if d.max().item() == 0 else math.inf)}
    except Exception:
        return None


def _frac(a, b, rtol, atol, floor=0.0, equal_nan=False) -> float | None:
    """max over elements of |a − b| / (atol + rtol·(|b| + floor)); 0 where they are equal (also for a zero bound)."""
    try:
        import torch
        x, y = _f64(a), _f64(b)
        x, y = torch.broadcast_tensors(x, y)
        if x.numel() == 0:
            return 0.0
        d = (x - y).abs()
        eq = x == y
        if equal_nan:
            eq |= torch.isnan(x) & torch.isnan(y)
        d = d.masked_fill(eq, 0.0).nan_to_num(nan=math.inf)
        bound = atol + rtol * (y.abs().nan_to_num(nan=0.0) + floor)
        r = torch.where(d == 0, torch.zeros_like(d), d / bound)  # d > 0, bound 0 -> inf
        return r.max().item()
    except Exception:
        return None


def _from_tests(depth: int = 2) -> str | None:
    """file:line of the calling frame if it lies in a tests/ tree, else None."""
    f = sys._getframe(depth)
    fn = f.f_code.co_filename
    if any(fn.startswith(p) for p in _tests_root):
        return f"{_rel_path(fn)}:{f.f_lineno}"
    return None


def _test_frame_where() -> str:
    """file:line of the innermost frame in a tests/ tree (the assert being evaluated)."""
    f = sys._getframe(1)
    while f is not None:
        fn = f.f_code.co_filename
        if any(fn.startswith(p) for p in _tests_root):
            return f"{_rel_path(fn)}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _rel_path(fn: str) -> str:
    for p in _tests_root:
        if fn.startswith(p):
            return "tests/" + fn[len(p):]
    return fn


def _record(kind: str, where: str, frac: float | None, raw: dict | None = None, raised: bool = False, **extra):
    if _current is None:
        return
    rec = {"kind": kind, "where": where, "frac": frac, "raised": raised}
    if raw:
        rec.update(raw)
    rec.update(extra)
    _records.setdefault(_current, []).append(rec)


class _Err(float):
    """A helper's error value that remembers the raw errors of the tensors it came from.

    `err <= bound` / `err < bound` (and `bound >= err`, `bound > err`) against a plain number record the comparison
    when it holds, wherever it is written: an assert, or an `if err <= BOUND: return` that is the test's pass
    criterion. A comparison that fails inside an assert is recorded by pytest_assertrepr_compare (the test fails); one
    that fails in an `if` is the test choosing another criterion, not counted."""
    raw: dict | None = None
    helper: str = ""

    def _cmp(self, other, op, res):
        if res is True and not isinstance(other, _Err):
            bound = _scalar(other)
            if bound is not None and bound > 0 and float(self) >= 0:
                _record(f"{self.helper}(…) {op} bound", _test_frame_where(), float(self) / bound, self.raw,
                        value=float(self), bound=bound)
        return res

    def __le__(self, other):
        return self._cmp(other, "<=", float.__le__(self, other))

    def __lt__(self, other):
        return self._cmp(other, "<", float.__lt__(self, other))

    def __hash__(self):
        return float.__hash__(self)


# ---------------------------------------------------------------------------------------------------------------------
# wrappers

def _wrap_assert_close(orig):
    @functools.wraps(orig)
    def assert_close(actual, expected, *args, **kwargs):
        where = _from_tests()
        if where is None:
            return orig(actual, expected, *args, **kwargs)
        try:
            ba = inspect.signature(orig).bind(actual, expected, *args, **kwargs)
            rtol, atol = ba.arguments.get("rtol"), ba.arguments.get("atol")
            equal_nan = ba.arguments.get("equal_nan", False)
        except TypeError:
            rtol = atol = None
            equal_nan = False
        if rtol is None or atol is None:
            try:
                from torch.testing._comparison import default_tolerances
                import torch
                rtol, atol = default_tolerances(torch.as_tensor(actual), torch.as_tensor(expected))
            except Exception:
                rtol, atol = 1.3e-6, 1e-5
        frac, raw = _frac(actual, expected, rtol, atol, equal_nan=equal_nan), _raw(actual, expected)
        try:
            out = orig(actual, expected, *args, **kwargs)
        except BaseException:
            _record("torch.testing.assert_close", where, frac, raw, raised=True, rtol=rtol, atol=atol)
            raise
        _record("torch.testing.assert_close", where, frac, raw, rtol=rtol, atol=atol)
        return out
    return assert_close


def _wrap_assert_allclose(orig):
    @functools.wraps(orig)
    def assert_allclose(actual, desired, *args, **kwargs):
        where = _from_tests()
        if where is None:
            return orig(actual, desired, *args, **kwargs)
        ba = inspect.signature(orig).bind(actual, desired, *args, **kwargs)
        ba.apply_defaults()
        rtol, atol, equal_nan = ba.arguments["rtol"], ba.arguments["atol"], ba.arguments.get("equal_nan", True)
        frac, raw = _frac(actual, desired, rtol, atol, equal_nan=equal_nan), _raw(actual, desired)
        try:
            out = orig(actual, desired, *args, **kwargs)
        except BaseException:
            _record("numpy.testing.assert_allclose", where, frac, raw, raised=True, rtol=rtol, atol=atol)
            raise
        _record("numpy.testing.assert_allclose", where, frac, raw, rtol=rtol, atol=atol)
        return out
    return assert_allclose


def _wrap_allclose(orig):
    @functools.wraps(orig)
    def allclose(input, other, rtol=1e-05, atol=1e-08, equal_nan=False):
        out = orig(input, other, rtol=rtol, atol=atol, equal_nan=equal_nan)
        where = _from_tests()
        if where is not None:
            if out:
                _record("torch.allclose", where, _frac(input, other, rtol, atol, equal_nan=equal_nan),
                        _raw(input, other), rtol=rtol, atol=atol)
            else:
                _record("torch.allclose", where, None, negative=True)  # False: a "must differ" check, not counted
        return out
    return allclose


def _wrap_tol_per_element(orig):
    @functools.wraps(orig)
    def assert_close_per_element(got, want, *args, **kwargs):
        ba = inspect.signature(orig).bind(got, want, *args, **kwargs)
        ba.apply_defaults()
        rtol, floor = ba.arguments["rtol"], ba.arguments["floor"]
        where = _test_frame_where()
        frac, raw = _frac(got, want, rtol, 0.0, floor=floor), _raw(got, want)
        try:
            out = orig(got, want, *args, **kwargs)
        except BaseException:
            _record("_tol.assert_close_per_element", where, frac, raw, raised=True, rtol=rtol, floor=floor)
            raise
        _record("_tol.assert_close_per_element", where, frac, raw, rtol=rtol, floor=floor)
        return out
    return assert_close_per_element


def _wrap_tol_err_within(orig, max_err):
    @functools.wraps(orig)
    def assert_err_within(got, want64, *args, **kwargs):
        ba = inspect.signature(orig).bind(got, want64, *args, **kwargs)
        ba.apply_defaults()
        base, atol, scale = ba.arguments["base"], ba.arguments["atol"], ba.arguments["scale"]
        where = _test_frame_where()
        try:
            err = float(max_err(got, want64))
            bound = 2 * (float(max_err(base, want64)) if base is not None else 0.0) + atol * scale
            frac = 0.0 if err == 0 else (err / bound if bound > 0 else math.inf)
        except Exception:
            frac = None
        raw = _raw(got, want64)
        try:
            out = orig(got, want64, *args, **kwargs)
        except BaseException:
            _record("_tol.assert_err_within", where, frac, raw, raised=True)
            raise
        _record("_tol.assert_err_within", where, frac, raw)
        return out
    return assert_err_within


def _wrap_helper(orig, name):
    if getattr(orig, "_parity_figures_wrapped", False):
        return orig

    @functools.wraps(orig)
    def helper(*args, **kwargs):
        out = orig(*args, **kwargs)
        try:
            e = _Err(float(out))
        except Exception:
            return out
        e.helper = name
        e.raw = _raw(args[0], args[1]) if len(args) >= 2 else None
        return e
    helper._parity_figures_wrapped = True
    return helper


# ---------------------------------------------------------------------------------------------------------------------
# pytest hooks

def pytest_addoption(parser):
    parser.addoption("--parity-json", default=os.environ.get("PARITY_JSON", "parity_figures.json"),
                     help="where parity_figures writes its JSON (default: parity_figures.json)")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    _enable_pass_hook(early_config)


def _enable_pass_hook(config):
    # The assertion-pass hook makes pytest evaluate each passing assert's explanation, which calls
    # pytest_assertrepr_compare with both operands. Rewritten modules are cached under their own pyc name.
    config._inicache["enable_assertion_pass_hook"] = True
    from _pytest.assertion import rewrite
    if not rewrite.PYC_TAIL.endswith("-parityfig.pyc"):
        rewrite.PYC_TAIL = rewrite.PYC_TAIL[:-len(".pyc")] + "-parityfig.pyc"


def pytest_configure(config):
    _enable_pass_hook(config)
    root = str(config.rootpath)
    _tests_root[:] = [os.path.join(root, "tests") + os.sep]
    try:
        load = open("/proc/loadavg").read().strip()
    except OSError:
        load = None
    _meta.update(rootdir=root, started=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:], loadavg_at_start=load)


def _patch_globals():
    import numpy
    import torch
    import torch.testing

    def swap(holder, name, make):
        orig = getattr(holder, name)
        if getattr(orig, "_parity_figures_wrapped", False):
            return orig, orig
        new = make(orig)
        new._parity_figures_wrapped = True
        new._parity_figures_orig = orig
        setattr(holder, name, new)
        return orig, new

    pairs = [swap(torch.testing, "assert_close", _wrap_assert_close),
             swap(numpy.testing, "assert_allclose", _wrap_assert_allclose),
             swap(torch, "allclose", _wrap_allclose)]
    tol = None
    for modname in ("tests._tol", "_tol"):
        tol = sys.modules.get(modname)
        if tol is not None:
            break
    if tol is not None:
        if hasattr(tol, "assert_close_per_element"):
            pairs.append(swap(tol, "assert_close_per_element", _wrap_tol_per_element))
        if hasattr(tol, "assert_err_within") and hasattr(tol, "max_err"):
            max_err = getattr(tol.max_err, "_parity_figures_orig", tol.max_err)
            pairs.append(swap(tol, "assert_err_within", lambda o: _wrap_tol_err_within(o, max_err)))
    return {id(o): n for o, n in pairs if o is not n}


def pytest_collection_modifyitems(session, config, items):
    """All test modules are imported now: swap in the wrappers, in the libraries and in the test modules' globals."""
    repl = _patch_globals()
    for modname, mod in list(sys.modules.items()):
        fn = getattr(mod, "__file__", None) or ""
        if not any(fn.startswith(p) for p in _tests_root):
            continue
        for name, obj in list(vars(mod).items()):
            if id(obj) in repl:
                setattr(mod, name, repl[id(obj)])
            elif name in HELPERS and inspect.isfunction(obj) and not getattr(obj, "_parity_figures_wrapped", False):
                setattr(mod, name, _wrap_helper(obj, name))
                _wrapped_helpers.setdefault(_rel_path(fn), []).append(name)


def _scalar(v):
    """A real scalar as float (Python/NumPy number or 0-d/1-element tensor/array), else None; bools are not."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        import numpy
        if isinstance(v, numpy.generic) and numpy.issubdtype(type(v), numpy.number) and not isinstance(v, numpy.bool_):
            return float(v)
        if isinstance(v, numpy.ndarray) and v.size == 1 and v.dtype.kind in "fiu":
            return float(v.reshape(()))
    except Exception:
        pass
    try:
        import torch
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool:
            return float(v.item())
    except Exception:
        pass
    return None


def _is_float(v):
    if isinstance(v, bool):
        return False
    if isinstance(v, float):
        return True
    try:
        import numpy
        if isinstance(v, (numpy.floating, numpy.ndarray)) and getattr(v, "dtype", numpy.dtype("f8")).kind == "f":
            return True
    except Exception:
        pass
    try:
        import torch
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return True
    except Exception:
        pass
    return False


def pytest_assertrepr_compare(config, op, left, right):
    if _current is None:
        return None
    if op in (">", ">=") and isinstance(right, _Err):
        left, right, op = right, left, {">": "<", ">=": "<="}[op]
    if op not in ("<", "<="):
        return None
    if isinstance(left, _Err) and not isinstance(right, _Err):
        # a comparison that held was recorded by _Err itself; here only the one that failed (the assert fails)
        try:
            if (float(left) <= float(right)) if op == "<=" else (float(left) < float(right)):
                return None
        except Exception:
            pass
    lv, rv = _scalar(left), _scalar(right)
    if lv is None or rv is None or not (_is_float(left) or _is_float(right)):
        return None
    if not (lv >= 0 and rv > 0) and not math.isnan(lv):
        return None
    frac = math.inf if math.isnan(lv) else lv / rv
    raw = left.raw if isinstance(left, _Err) else None
    kind = f"{left.helper}(…) {op} bound (failed)" if isinstance(left, _Err) else f"assert err {op} bound"
    _record(kind, _test_frame_where(), frac, raw, value=lv, bound=rv)
    return None


def pytest_assertion_pass(item, lineno, orig, expl):
    """Present so that pytest evaluates passing asserts' explanations (the comparisons are taken above)."""


def pytest_runtest_logstart(nodeid, location):
    global _current
    _current = nodeid


def pytest_runtest_logreport(report):
    prev = _outcomes.get(report.nodeid)
    if report.when == "call" or report.outcome != "passed":
        if prev in (None, "passed") or report.outcome == "failed":
            _outcomes[report.nodeid] = report.outcome
    elif prev is None:
        _outcomes[report.nodeid] = report.outcome


def pytest_runtest_logfinish(nodeid, location):
    global _current
    _current = None


def _git(root, *args):
    try:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return None


def _summary():
    tests, sites = {}, {}
    for nodeid in sorted(set(_outcomes) | set(_records)):
        outcome = _outcomes.get(nodeid, "?")
        recs = _records.get(nodeid, [])
        counted = [r for r in recs if r["frac"] is not None and not (r["raised"] and outcome == "passed")]
        counted_ids = {id(r) for r in counted}
        for r in recs:
            s = sites.setdefault(r["where"], {"kinds": set(), "n": 0, "n_counted": 0, "worst_frac": None})
            s["kinds"].add(r["kind"])
            s["n"] += 1
            if id(r) in counted_ids:
                s["n_counted"] += 1
                s["worst_frac"] = r["frac"] if s["worst_frac"] is None else max(s["worst_frac"], r["frac"])
        entry = {"outcome": outcome, "n_comparisons": len(counted), "n_not_counted": len(recs) - len(counted)}
        if counted:
            worst = max(counted, key=lambda r: r["frac"])
            entry.update(worst_frac=worst["frac"], worst_kind=worst["kind"], worst_where=worst["where"])
            for k in ("max_abs", "max_rel", "max_rel_to_max"):
                vals = [r[k] for r in counted if r.get(k) is not None]
                entry[k] = max(vals) if vals else None
        tests[nodeid] = entry
    for s in sites.values():
        s["kinds"] = sorted(s["kinds"])
    measured = {k: v for k, v in tests.items() if v.get("worst_frac") is not None}
    fracs = sorted(v["worst_frac"] for v in measured.values())
    worst5 = sorted(measured.items(), key=lambda kv: -kv[1]["worst_frac"])[:5]
    summary = {
        "n_tests": len(tests),
        "n_tests_measured": len(measured),
        "n_tests_without_comparison": sorted(k for k, v in tests.items() if v.get("worst_frac") is None
                                             and v["outcome"] == "passed"),
        "outcomes": {o: sum(1 for v in tests.values() if v["outcome"] == o) for o in sorted({v["outcome"] for v in
                                                                                             tests.values()})},
        "median_worst_frac": statistics.median(fracs) if fracs else None,
        "worst_frac": fracs[-1] if fracs else None,
        "worst_test": worst5[0][0] if worst5 else None,
        "worst5": [{"test": k, **{f: v.get(f) for f in ("worst_frac", "worst_kind", "worst_where", "max_abs",
                                                         "max_rel", "max_rel_to_max")}} for k, v in worst5],
    }
    summary["n_tests_without_comparison"] = len(summary["n_tests_without_comparison"])
    return summary, tests, sites


def pytest_sessionfinish(session, exitstatus):
    import torch
    summary, tests, sites = _summary()
    root = str(session.config.rootpath)
    try:
        import fastdiff
        fd = fastdiff.__file__
    except Exception as e:
        fd = f"not importable: {e}"
    try:
        load = open("/proc/loadavg").read().strip()
    except OSError:
        load = None
    _meta.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), commit=_git(root, "rev-parse", "HEAD"),
                 dirty=bool(_git(root, "status", "--porcelain", "--untracked-files=no")), fastdiff=fd,
                 torch=torch.__version__, torch_threads=torch.get_num_threads(),
                 env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TRITON_INTERPRET")},
                 loadavg_at_end=load, wrapped_helpers=_wrapped_helpers, exitstatus=int(exitstatus),
                 fraction="max over elements of |a-b| / (atol + rtol*|b|) (the bound each test allows; "
                          "1.0 = at the bound); per test the worst of its comparisons")
    out = {"meta": _meta, "summary": summary, "tests": tests,
           "sites": {k: sites[k] for k in sorted(sites)}}
    path = session.config.getoption("--parity-json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    session.config._parity_figures = (path, summary)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    path, s = getattr(config, "_parity_figures", (None, None))
    if s is None:
        return
    tr = terminalreporter
    tr.section("parity figures (error / the test's own bound)")
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    tr.write_line(f"{s['n_tests_measured']} of {s['n_tests']} tests measured "
                  f"({s['n_tests_without_comparison']} passed with no counted comparison); outcomes {s['outcomes']}")
    tr.write_line(f"median of per-test worst fraction: {fmt(s['median_worst_frac'])}   worst: "
                  f"{fmt(s['worst_frac'])} ({s['worst_test']})")
    for w in s["worst5"]:
        tr.write_line(f"  {fmt(w['worst_frac']):>9}  {w['test']}  [{w['worst_kind']} at {w['worst_where']}; "
                      f"max abs {fmt(w['max_abs'])}, max rel {fmt(w['max_rel'])}]")
    tr.write_line(f"written: {path}")
