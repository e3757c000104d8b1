"""Hypothesis strategies for the wire format (``client_hooks.wire``): valid step batches and
mutations of them that the collector must refuse, and the rows a valid batch must become."""

from __future__ import annotations

import gzip
import math
import re
from fractions import Fraction
from typing import Any

import numpy as np
from hypothesis import strategies as st

from client_hooks import wire
from server.models import STEP_SERIES, WINDOW_STATS, WINDOW_STEPS
from server.schemas import StepIn

# Limits of the fuzzed collector (tests/fuzz/conftest.py).
MAX_STEPS = 100
MAX_BODY = 1_000_000

# Any double, NaN and ±Inf included, plus the edges st.floats() rarely picks by itself.
FLOATS = st.one_of(
    st.floats(),
    st.sampled_from([0.0, -0.0, 5e-324, -2.2e-308, 1.7976931348623157e308, -1e300, 3.5e38,
                     math.nan, math.inf, -math.inf]),
)
FINITE_POSITIVE = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)
BIG_COUNT = st.integers(0, 2**63 - 1)  # BIGINT columns
SMALL_COUNT = st.integers(0, 2**31 - 1)  # INTEGER columns (nonfinite, micro_batches)
LAYER_COUNT = st.integers(0, 2**24)  # stored as float32: exact up to 2**24

SCALAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}")
_SUFFIXES = tuple(f":{stat}" for stat in WINDOW_STATS)
_RESERVED = {*STEP_SERIES, "step_time", WINDOW_STEPS}


def _free_name(name: str) -> bool:
    return not (name in _RESERVED or name.startswith(("lr/group", "gns/"))
                or name.endswith(_SUFFIXES))


SCALAR_NAMES = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.:/-]{0,127}\Z").filter(_free_name)
# A window series X is stored as X:max ... X:nonfinite, within the 128 characters of a name.
WINDOW_NAMES = st.one_of(st.sampled_from(["loss", "grad_norm", "lr"]),
                         st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.:/-]{0,117}\Z").filter(_free_name))
# Module paths, unicode and all (layer names are free text).
# Any text but NUL, which the API refuses in every free-text field (tests/server/test_hardening.py).
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40)
LAYER_NAMES = st.lists(TEXT, min_size=0, max_size=5, unique=True)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


@st.composite
def window(draw: st.DrawFn, step: int, n_layers: int) -> dict[str, Any]:
    stats = st.fixed_dictionaries(
        {"count": SMALL_COUNT, "nonfinite": SMALL_COUNT},
        optional={"max": FLOATS, "min": FLOATS, "mean": FLOATS},
    )
    out: dict[str, Any] = {
        "steps": draw(st.integers(1, 10_000)),
        "first_step": draw(st.integers(0, step)),
        "series": draw(st.dictionaries(WINDOW_NAMES, stats, max_size=3)),
    }
    if draw(st.booleans()):
        vec = st.lists(FLOATS, min_size=n_layers, max_size=n_layers)
        out["layers"] = {"grad_norm": {
            "count": draw(SMALL_COUNT), "max": draw(vec), "min": draw(vec), "mean": draw(vec),
            "nonfinite": draw(st.lists(LAYER_COUNT, min_size=n_layers, max_size=n_layers))}}
    return out


@st.composite
def gns(draw: st.DrawFn, n_layers: int) -> dict[str, Any]:
    layers = draw(st.lists(st.integers(0, n_layers - 1), min_size=1, max_size=n_layers,
                           unique=True))
    b_small = draw(FINITE_POSITIVE)
    vec = st.lists(FLOATS, min_size=len(layers), max_size=len(layers))
    return {"mode": draw(st.sampled_from(["micro", "ddp", "per_example"])),
            "b_small": b_small, "b_big": b_small * draw(st.floats(1.5, 64)),
            "layers": layers, "small_sq": draw(vec), "big_sq": draw(vec)}


@st.composite
def step_record(draw: st.DrawFn, step: int, n_layers: int) -> dict[str, Any]:
    """One valid record: any subset of the optional fields, any float values."""
    rec: dict[str, Any] = {"step": step}
    vec = st.lists(FLOATS, min_size=n_layers, max_size=n_layers)
    fields: dict[str, st.SearchStrategy[Any]] = {
        **dict.fromkeys(wire.FLOAT_FIELDS, FLOATS),
        "batch_size": BIG_COUNT, "samples": BIG_COUNT, "tokens": BIG_COUNT,
        "nonfinite": SMALL_COUNT, "micro_batches": SMALL_COUNT,
        "overflow": st.booleans(),
        "layer_grad_norms": vec,
        "layer_nonfinite": st.lists(LAYER_COUNT, min_size=n_layers, max_size=n_layers),
        "lrs": st.lists(FLOATS, max_size=4),
        "scalars": st.dictionaries(SCALAR_NAMES, FLOATS, max_size=4),
    }
    for name, strategy in fields.items():
        value = draw(_maybe(strategy))
        if value is not None:
            rec[name] = value
    if draw(st.booleans()):  # these two come together
        rec["layer_param_norms"], rec["layer_update_norms"] = draw(vec), draw(vec)
    if draw(st.integers(0, 3)) == 0:
        rec["window"] = draw(window(step, n_layers))
    if n_layers and draw(st.integers(0, 3)) == 0:
        rec["gns"] = draw(gns(n_layers))
    return rec


@st.composite
def valid_batch(draw: st.DrawFn, n_layers: int) -> list[dict[str, Any]]:
    """Distinct steps near 0, in the middle, or at the top of the step range (2**62)."""
    base = draw(st.sampled_from([0, 123_456_789, 2**62 - 63]))
    offsets = draw(st.lists(st.integers(0, 63), min_size=1, max_size=12, unique=True))
    return [draw(step_record(base + o, n_layers)) for o in offsets]


def encode(steps: list[dict[str, Any]], compress: bool) -> tuple[bytes, dict[str, str]]:
    return wire.encode_batch(steps, compress=compress)


# -- invalid input ----------------------------------------------------------------------

# Values each kind of field must refuse. (Floats are read leniently, as pydantic does: numeric
# strings and booleans pass; only what is no number at all is wrong for them.)
_FLOAT_BAD: list[Any] = ["x", "", "1.5.2", "NaN!", [], {}, [1.0], {"a": 1}]
_COUNT_BAD: list[Any] = ["x", "1", 1.5, True, -1, [], {}, 2**64]
WRONG: dict[str, list[Any]] = {
    "step": [-1, 2**62 + 1, 2**64, 1.0, "0", True, None, []],
    **{f: _FLOAT_BAD for f in wire.FLOAT_FIELDS},
    **{f: _COUNT_BAD for f in wire.INT_FIELDS},
    "overflow": ["x", 1, 0, "true", [], 1.5],
    "layer_grad_norms": ["x", 1.0, {"a": 1}, ["x"], [[1.0]]],
    "layer_nonfinite": ["x", 1, [1.5], [-1], ["x"]],
    "lrs": ["x", 1.0, ["x"], {}],
    "scalars": [[], "x", 1, {"a": "x"}, {"a": [1.0]}],
    "window": ["x", [], 1, {}],
    "gns": ["x", [], 1, {}],
}


@st.composite
def invalid_batch(draw: st.DrawFn, n_layers: int, stored: list[int]
                  ) -> tuple[str, bytes, dict[str, str]]:
    """(what is wrong, body, headers): a valid batch mutated one way; its valid steps reuse
    stored step numbers and new ones, so a half-stored batch would show."""
    steps = draw(valid_batch(n_layers))
    if stored:
        steps[0]["step"] = draw(st.sampled_from(stored))
        steps = list({s["step"]: s for s in steps}.values())
    i = draw(st.integers(0, len(steps) - 1))
    bad = steps[i]
    kind = draw(st.sampled_from([
        "wrong type", "layer count", "duplicate step", "unknown field",
        "bad scalar name", "reserved scalar", "wire version", "window", "gns", "huge count",
        "not a batch", "gzip corrupt", "gzip truncated", "truncated", "content type",
        "content encoding", "not utf-8", "deep nesting", "empty", "too many steps",
        "gzip bomb", "too large",
    ]))
    compress = draw(st.booleans())
    body_override: bytes | None = None
    if kind == "wrong type":
        field = draw(st.sampled_from(sorted(WRONG)))
        bad[field] = draw(st.sampled_from(WRONG[field]))
    elif kind == "layer count":
        field = draw(st.sampled_from(["layer_grad_norms", "layer_nonfinite",
                                      "layer_param_norms", "layer_update_norms"]))
        n = draw(st.integers(0, n_layers + 3).filter(lambda k: k != n_layers))
        bad[field] = [1.0] * n if field != "layer_nonfinite" else [0] * n
    elif kind == "duplicate step":
        steps.append({**bad, "loss": 1.0})
    elif kind == "unknown field":
        bad[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in bad
                                                         and k not in wire_fields()))] = 1
    elif kind == "bad scalar name":
        name = draw(st.one_of(st.text(min_size=1, max_size=20).filter(
            lambda k: not SCALAR_RE.fullmatch(k)), st.just("x" * 129), st.just("")))
        bad["scalars"] = {name: 1.0}
    elif kind == "reserved scalar":
        bad["scalars"] = {draw(st.sampled_from(["loss", "step_time", "window:steps", "gns/x",
                                                "a:max", "b:nonfinite"])): 1.0}
        if draw(st.booleans()):
            bad["lrs"], bad["scalars"] = [0.1, 0.2], {"lr/group1": 1.0}
    elif kind == "wire version":
        body_override = wire.dumps({"wire_version": draw(st.sampled_from([0, 2, "1", None])),
                                    "steps": steps})
    elif kind == "window":
        w = draw(window(bad["step"], n_layers))
        how = draw(st.sampled_from(["first after step", "layer count", "reserved", "steps 0"]))
        if how == "first after step":
            w["first_step"] = bad["step"] + 1
        elif how == "layer count":
            w["layers"] = {"grad_norm": {"count": 1, "max": [1.0] * (n_layers + 1),
                                         "min": [1.0] * (n_layers + 1),
                                         "mean": [1.0] * (n_layers + 1),
                                         "nonfinite": [0] * (n_layers + 1)}}
        elif how == "reserved":
            w["series"] = {"x:max": {"count": 1, "nonfinite": 0}}
        else:
            w["steps"] = 0
        bad["window"] = w
    elif kind == "gns":
        g = draw(gns(max(n_layers, 1)))
        how = draw(st.sampled_from(["b order", "lengths", "index", "nonfinite b", "mode"]))
        if how == "b order":
            g["b_big"] = g["b_small"]
        elif how == "lengths":
            g["small_sq"] = g["small_sq"] + [1.0]
        elif how == "index":
            g["layers"] = [n_layers]
            g["small_sq"], g["big_sq"] = [1.0], [1.0]
        elif how == "nonfinite b":
            g["b_small"] = "NaN"
        else:
            g["mode"] = "macro"
        bad["gns"] = g
    elif kind == "huge count":
        bad[draw(st.sampled_from(["batch_size", "tokens", "nonfinite", "micro_batches"]))] = (
            draw(st.sampled_from([2**63, 2**64 + 1, 10**30])))
    elif kind == "not a batch":
        body_override = draw(st.sampled_from([b"[]", b"{}", b"null", b"1", b'"steps"',
                                              b'{"wire_version":1}',
                                              b'{"wire_version":1,"steps":{}}']))
    elif kind == "deep nesting":
        depth = draw(st.integers(1000, 100_000))
        body_override = (b'{"wire_version":1,"steps":[{"step":1,"scalars":{"a":'
                         + b"[" * depth + b"]" * depth + b"}}]}")
    elif kind == "empty":
        body_override = b""
    elif kind == "too many steps":
        steps = [{"step": k} for k in range(MAX_STEPS + 1)]
    elif kind == "too large":
        body_override = b'{"wire_version":1,"steps":[' + b" " * MAX_BODY + b"]}"
    elif kind == "gzip bomb":  # small on the wire, beyond the limit once inflated
        body_override = b'{"wire_version":1,"steps":[' + b" " * (MAX_BODY * 2) + b"]}"
        compress = True
    body = body_override if body_override is not None else wire.dumps(
        {"wire_version": wire.WIRE_VERSION, "steps": steps})
    headers = {"Content-Type": wire.CONTENT_TYPE}
    if kind == "truncated":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif kind == "not utf-8":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])) + (
            body[at:])
    if compress or kind.startswith("gzip"):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
        if kind == "gzip corrupt":
            # Past the 10-byte header (whose time stamp and flags may be anything).
            at = draw(st.integers(10, len(body) - 1))
            body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1:]
        elif kind == "gzip truncated":
            body = body[: draw(st.integers(0, len(body) - 1))]
    if kind == "content type":
        headers["Content-Type"] = draw(st.sampled_from(
            ["text/plain", "application/x-www-form-urlencoded", "application/jsonx", "",
             "multipart/form-data; boundary=x"]))
    elif kind == "content encoding":
        headers["Content-Encoding"] = draw(st.sampled_from(["br", "deflate", "gzip, gzip",
                                                            "zstd"]))
    return kind, body, headers


def wire_fields() -> set[str]:
    return set(StepIn.model_fields)


# -- what a valid batch must become ------------------------------------------------------

def f32(values: list[float]) -> np.ndarray:
    with np.errstate(over="ignore"):  # a double beyond float32's range is stored as ±Inf
        return np.asarray(values, dtype=np.float64).astype("<f4")


def expected_rows(rec: dict[str, Any], n_layers: int) -> tuple[
        dict[str, Any], dict[str, np.ndarray], dict[str, float]]:
    """(steps columns, layer metric -> float32 vector, scalar name -> value) for one record."""
    cols = {c: rec.get(c) for c in (*wire.FLOAT_FIELDS, *wire.INT_FIELDS, *wire.BOOL_FIELDS)
            if c != "step_time"}
    layers: dict[str, np.ndarray] = {}
    for field, metric in (("layer_grad_norms", "grad_norm"), ("layer_nonfinite", "nonfinite"),
                          ("layer_param_norms", "param_norm"),
                          ("layer_update_norms", "update_norm")):
        if field in rec:
            layers[metric] = f32(rec[field])
    if "layer_param_norms" in rec:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = np.asarray(rec["layer_update_norms"]) / np.asarray(rec["layer_param_norms"])
        layers["update_ratio"] = f32(list(ratio))
    scalars = dict(rec.get("scalars", {}))
    scalars.update({f"lr/group{i}": v for i, v in enumerate(rec.get("lrs", []))})
    if "step_time" in rec:
        scalars["step_time"] = rec["step_time"]
    w = rec.get("window")
    if w is not None:
        scalars[WINDOW_STEPS] = w["steps"]
        for name, st_ in w["series"].items():
            for stat in WINDOW_STATS:
                if st_.get(stat) is not None:
                    scalars[f"{name}:{stat}"] = st_[stat]
        for stat in WINDOW_STATS:
            if "layers" in w:
                layers[f"grad_norm:{stat}"] = f32(w["layers"]["grad_norm"][stat])
    g = rec.get("gns")
    if g is not None:
        small = np.full(n_layers, np.nan, "<f4")
        big = np.full(n_layers, np.nan, "<f4")
        small[g["layers"]] = f32(g["small_sq"])
        big[g["layers"]] = f32(g["big_sq"])
        layers["gns_small_sq"], layers["gns_big_sq"] = small, big
        scalars.update({"gns/b_small": g["b_small"], "gns/b_big": g["b_big"],
                        "gns/small_sq": _sum(g["small_sq"]), "gns/big_sq": _sum(g["big_sq"])})
    return cols, layers, scalars


def _sum(values: list[float]) -> float:
    """The exact sum rounded once (by fractions); NaN when it has no meaning (a NaN, or +Inf
    and -Inf), ±Inf with an infinity or beyond a double's range."""
    if any(math.isnan(v) for v in values) or {math.inf, -math.inf} <= set(values):
        return math.nan
    if any(math.isinf(v) for v in values):
        return next(v for v in values if math.isinf(v))
    exact = sum(map(Fraction, values), Fraction(0))
    try:
        return float(exact)
    except OverflowError:
        return math.inf if exact > 0 else -math.inf


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (floats and float arrays alike)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        x, y = np.asarray(a), np.asarray(b)
        return x.shape == y.shape and bool(np.array_equal(x, y, equal_nan=True))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return bool(a == b)
