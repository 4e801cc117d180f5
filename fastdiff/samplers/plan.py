"""Solver plans: every solver update written once, symbolically, and compiled to rows of one fused op.

A solver (DPM-Solver++, UniPC, Euler, Heun, PLMS, ...) is traced, one model call at a time, on `Lin` values: linear
combinations of the tensors the fused op can see at that call (docs/math.md, "One fused update"):

    x   the sample the model was evaluated at (fastdiff keeps it in the variance-preserving scale, the model's input)
    o   the model output (after classifier-free guidance)
    d   the converted output d = p·x + q·o (x̂0 or ε̂), clipped or dynamically thresholded when the solver says so
    h   history slots written by earlier calls (previous d's, a stored sample, a partial sum)
    z   fresh N(0, I) noise

The tracer works in float64 with the solver's own formulas (each module cites its paper), so the coefficients are
those formulas evaluated once on the host. `Call.next(value)` is the sample handed to the next model call, and
`Call.put(name, value)` keeps a value for later calls: a value that is already a combination of slots costs nothing,
`d` is written by the op's d output, and anything else (it involves x or o) by its second output `y2`. `PlanBuilder`
assigns physical history slots so that a call never writes a slot it reads (the op forbids aliasing), and the result,
a `SolverPlan`, is what the loop runs: per call one coefficient row of `fastdiff.ops.multistep` (NUM_COEF float64), the
slots read as h0..h3, the slots written by d and y2, whether noise is drawn, and the timestep the model sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastdiff.ops.multistep import COEF, MAX_HIST, NUM_COEF  # the fused op's coefficient layout: one table


class Lin:
    """A linear combination Σ c_k·e_k of symbolic tensors e_k (keys: "x", "o", "d", "z", or ("h", slot))."""

    __slots__ = ("c",)

    def __init__(self, c=None):
        self.c = {k: float(v) for k, v in (c or {}).items() if v != 0.0}

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:
            return self
        out = dict(self.c)
        for k, v in other.c.items():
            out[k] = out.get(k, 0.0) + v
        return Lin(out)

    __radd__ = __add__

    def __neg__(self):
        return Lin({k: -v for k, v in self.c.items()})

    def __sub__(self, other):
        return self + (-other)

    def __mul__(self, s):
        s = float(s)
        return Lin({k: v * s for k, v in self.c.items()})

    __rmul__ = __mul__

    def __truediv__(self, s):
        return self * (1.0 / float(s))

    def keys(self):
        return set(self.c)

    def __repr__(self):
        return " + ".join(f"{v:.6g}·{k}" for k, v in self.c.items()) or "0"


X, O, D, Z = Lin({"x": 1.0}), Lin({"o": 1.0}), Lin({"d": 1.0}), Lin({"z": 1.0})


@dataclass
class CallRow:
    """One model call of a plan (what the loop needs, all host-side Python numbers)."""

    t: float  # the timestep the model sees
    coef: list  # NUM_COEF float64 scalars of fastdiff.ops.multistep
    reads: list  # physical slots read as h0, h1, ... (at most MAX_HIST)
    d_slot: int | None  # slot the op's d output writes (None: not kept)
    y2_slot: int | None  # slot the op's y2 output writes (None: no second output)
    noise: bool  # draw z for this call
    clip: bool = False  # clamp d to ±coef[clip]
    threshold: bool = False  # dynamic thresholding of d (a per-sample scale computed before the op)
    scale_in: float = 1.0  # diffusers' sample = scale_in · x at this call (σ-scaled solvers: √(σ²+1))
    scale_out: float = 1.0  # diffusers' prev_sample = scale_out · next state
    var_mode: str = "scalar"  # the noise's scale: yz, or per element from the model's variance channels v
    # ("learned": √v; "learned_range": exp(½(f·logmax + (1−f)·logmin)), f = (v+1)/2)


@dataclass
class SolverPlan:
    """A sampler compiled to per-call rows. `t_dtype`: the timestep dtype diffusers hands the model (int64 for the
    discrete-time solvers, float32 for the σ-grid ones); `init_noise_sigma`: x_T = randn · init_noise_sigma in
    diffusers' scale, and the loop's state starts at x_T / calls[0].scale_in."""

    sampler: str
    calls: list
    num_slots: int
    t_dtype: torch.dtype
    init_noise_sigma: float
    options: dict = field(default_factory=dict)
    sigmas: list | None = None  # the solver's σ grid (float64), for reference and the diffusers adapters
    timesteps: list | None = None  # one entry per inference step (diffusers' scheduler.timesteps)
    noise_dtype: torch.dtype | None = None  # the dtype diffusers draws the step noise in (None: the sample's)
    d_is_x0: bool = True  # d is x̂0 (reported to callbacks as "x0"); False when the solver keeps ε̂

    @property
    def steps(self) -> int:
        return len(self.calls)

    @property
    def noise(self) -> list:
        return [c.noise for c in self.calls]

    def coef_table(self, guidance_scale: float | None = None) -> torch.Tensor:
        """(calls, NUM_COEF) float64 on the CPU; guidance_scale fills the `w` column (1 without guidance)."""
        t = torch.tensor([c.coef for c in self.calls], dtype=torch.float64).reshape(len(self.calls), NUM_COEF)
        t[:, COEF["w"]] = 1.0 if guidance_scale is None else float(guidance_scale)
        return t

    def diffusers_rows(self) -> torch.Tensor:
        """The coefficient table for a caller whose sample is in diffusers' scale (scheduler.step's `sample` and
        `prev_sample`): every coefficient on x divided by scale_in, the next-sample row multiplied by scale_out."""
        t = self.coef_table()
        for i, c in enumerate(self.calls):
            for k in ("p", "yx", "y2x"):
                t[i, COEF[k]] /= c.scale_in
            for k in ("yx", "yo", "yd", "yh0", "yh1", "yh2", "yh3", "yz"):
                t[i, COEF[k]] *= c.scale_out
        return t


class PlanError(ValueError):
    pass


class _Call:
    def __init__(self, builder: "PlanBuilder", t: float, scale_in: float):
        self.b, self.t, self.scale_in = builder, float(t), float(scale_in)
        self.p = self.q = None
        self.clip = None
        self.threshold = False
        self.puts: list = []
        self.nxt: Lin | None = None
        self.scale_out = 1.0
        self.force_noise = False  # draw z even where its coefficient is 0 (keeps diffusers' draw order)
        self.var_mode, self.log_var = "scalar", (0.0, 0.0)

    # the symbolic tensors of this call
    x, o, z = X, O, Z

    def convert(self, value: Lin, *, clip: float | None = None, threshold: bool = False) -> Lin:
        """d = value (a combination of x and o), clipped to ±clip or thresholded; returns the symbol d."""
        if value.keys() - {"x", "o"}:
            raise PlanError(f"convert: d must combine x and o only, got {value}")
        self.p, self.q = value.c.get("x", 0.0), value.c.get("o", 0.0)
        self.clip, self.threshold = clip, bool(threshold)
        return D

    def get(self, name: str) -> Lin:
        """A value kept by an earlier call, as a combination of history slots."""
        if name not in self.b.store:
            raise PlanError(f"no stored value {name!r}")
        return Lin({("h", s): v for s, v in self.b.store[name].items()})

    def has(self, name: str) -> bool:
        return name in self.b.store

    def put(self, name: str, value: Lin, materialize: bool = False):
        """Keep `value` for later calls. materialize=True writes it to one slot (the op's y2) even when it is a
        combination of slots and d, so that later calls read one tensor instead of several."""
        self.puts.append((name, value, materialize))

    def drop(self, name: str):
        self.puts.append((name, None, False))

    def shift(self, names: list):
        """Age a history kept under `names` (newest first): names[j] takes names[j − 1]'s value, oldest dropped off
        the end; the caller then puts the newest under names[0]."""
        for j in range(len(names) - 1, 0, -1):
            if self.has(names[j - 1]):
                self.put(names[j], self.get(names[j - 1]))

    def learned_noise(self, mode: str, log_max: float, log_min: float):
        """The noise of this call scaled per element by the model's variance channels v (DDPM's learned variances,
        Nichol & Dhariwal 2021): mode "learned" (σ = √v) or "learned_range" (σ² = exp(f·log_max + (1−f)·log_min),
        f = (v+1)/2); z is drawn and the next sample gets σ·z on top of `next`'s value."""
        if mode not in ("learned", "learned_range"):
            raise PlanError(f"learned_noise: mode must be 'learned' or 'learned_range', got {mode!r}")
        self.var_mode, self.log_var, self.force_noise = mode, (float(log_max), float(log_min)), True

    def next(self, value: Lin, scale_out: float = 1.0):
        """The sample of the next model call (in the solver's own scale; divided by scale_out here)."""
        self.nxt = value / scale_out
        self.scale_out = float(scale_out)


class PlanBuilder:
    """Traces a solver call by call (see the module docstring) and assigns history slots."""

    def __init__(self, sampler: str):
        self.sampler = sampler
        self.store: dict[str, dict[int, float]] = {}  # name -> {slot: coefficient}
        self.refs: dict[int, int] = {}  # slot -> number of stored names using it
        self.num_slots = 0
        self.rows: list[CallRow] = []
        self._cur: _Call | None = None

    def call(self, t: float, scale_in: float = 1.0) -> _Call:
        if self._cur is not None:
            self._finish()
        self._cur = _Call(self, t, scale_in)
        return self._cur

    def build(self, **kw) -> SolverPlan:
        if self._cur is not None:
            self._finish()
        return SolverPlan(self.sampler, self.rows, max(self.num_slots, 1), **kw)

    # ---- slot bookkeeping ----
    def _incref(self, slots):
        for s in slots:
            self.refs[s] = self.refs.get(s, 0) + 1

    def _decref(self, slots):
        for s in slots:
            self.refs[s] -= 1
            if self.refs[s] == 0:
                del self.refs[s]

    def _free_slot(self, exclude) -> int:
        for s in range(self.num_slots):
            if s not in self.refs and s not in exclude:
                return s
        self.num_slots += 1
        return self.num_slots - 1

    def _finish(self):
        c, self._cur = self._cur, None
        if c.nxt is None:
            raise PlanError("a call must set the next sample (Call.next)")
        if c.p is None:
            raise PlanError("a call must convert the model output (Call.convert)")
        reads: list[int] = []

        def read(v: Lin):
            for k in v.c:
                if isinstance(k, tuple) and k[1] not in reads:
                    reads.append(k[1])

        if c.nxt.keys() - {"x", "o", "d", "z"} - {k for k in c.nxt.c if isinstance(k, tuple)}:
            raise PlanError(f"next sample has unknown terms: {c.nxt}")
        read(c.nxt)
        want_d = False
        y2: Lin | None = None
        plans = []  # (name, kind, value): kind "slots" (already slots), "d" (k·d + slots), "y2", None (drop)
        for name, v, force in c.puts:
            if v is None:
                plans.append((name, None, None))
                continue
            if "z" in v.c:
                raise PlanError(f"{name}: a kept value cannot hold noise")
            if not force and not v.keys() & {"x", "o", "d"}:
                plans.append((name, "slots", v))
            elif not force and not v.keys() & {"x", "o"}:
                want_d = True
                plans.append((name, "d", v))
            else:
                if y2 is not None and (y2.c != v.c):
                    raise PlanError(f"{self.sampler}: a call can keep only one new combination of x and o "
                                    f"(the op's y2 output); {name} would be a second")
                y2 = v
                read(v)
                plans.append((name, "y2", v))
        if len(reads) > MAX_HIST:
            raise PlanError(f"{self.sampler}: a call reads {len(reads)} history tensors, the op takes {MAX_HIST}")
        d_slot = self._free_slot(set(reads)) if want_d else None
        if d_slot is not None:
            self.refs[d_slot] = self.refs.get(d_slot, 0) + 1  # reserve while choosing y2's slot
        y2_slot = self._free_slot(set(reads) | ({d_slot} if d_slot is not None else set())) if y2 is not None \
            else None
        if d_slot is not None:
            self._decref([d_slot])
        # the new stored values (as slots), then release what they replace
        new_store = {}
        for name, kind, v in plans:
            if kind is None:
                new_store[name] = None
            elif kind == "slots":
                new_store[name] = {k[1]: val for k, val in v.c.items()}
            elif kind == "d":
                m = {k[1]: val for k, val in v.c.items() if isinstance(k, tuple)}
                m[d_slot] = m.get(d_slot, 0.0) + v.c["d"]
                new_store[name] = m
            else:
                new_store[name] = {y2_slot: 1.0}
        for name, m in new_store.items():
            if m is not None:
                self._incref(m)
        for name, m in new_store.items():
            if name in self.store:
                self._decref(self.store.pop(name))
            if m is not None:
                self.store[name] = m
        pos = {s: i for i, s in enumerate(reads)}
        row = [0.0] * NUM_COEF
        row[COEF["p"]], row[COEF["q"]], row[COEF["w"]] = c.p, c.q, 1.0
        row[COEF["clip"]] = c.clip if c.clip is not None else 0.0
        if c.var_mode != "scalar":
            if "z" in c.nxt.c:
                raise PlanError(f"{self.sampler}: a call with learned noise cannot also scale z itself")
            row[COEF["logmax"]], row[COEF["logmin"]] = c.log_var
        for pre, v in (("y", c.nxt), ("y2", y2)):
            if v is None:
                continue
            for k, val in v.c.items():
                key = f"{pre}h{pos[k[1]]}" if isinstance(k, tuple) else f"{pre}{k}"
                row[COEF[key]] += val
        for k, v in enumerate(row):
            if not math.isfinite(v):
                name = [n for n, i in COEF.items() if i == k]
                raise PlanError(f"{self.sampler}: call {len(self.rows)} (t={c.t}) has a non-finite coefficient "
                                f"{name[0] if name else k} = {v}")
        self.rows.append(CallRow(c.t, row, reads, d_slot, y2_slot, "z" in c.nxt.c or c.force_noise,
                                 c.clip is not None,
                                 c.threshold, c.scale_in, c.scale_out, c.var_mode))
