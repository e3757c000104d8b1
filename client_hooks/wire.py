"""The gradsentry wire format: one source of truth for client and collector.

This module imports only the standard library, so the collector can read it
without pulling in torch.

A run is announced once (``POST /api/v1/runs``) with a :class:`RunSpec`-shaped
JSON object; steps follow in batches (``POST /api/v1/runs/{run}/steps``)::

    {"wire_version": 1,
     "steps": [{"step": 0, "wall_time": 1700000000.5, "step_time": 0.27,
                "loss": 2.31, "lr": 0.001,
                "grad_norm": 1.7, "batch_size": 32, "samples": 32, "tokens": 4096,
                "nonfinite": 0,
                "layer_grad_norms": [0.3, 1.2, ...],   # one per run layer, in order
                "layer_nonfinite": [0, 0, ...],        # optional, same length
                "clip_coef": 0.42, "loss_scale": 65536.0, "local_grad_norm": 2.1,
                "overflow": false, "micro_batches": 4,
                "layer_param_norms": [12.5, 40.1, ...], # every K-th step, one per layer
                "layer_update_norms": [0.01, 0.2, ...], # same steps, same length
                "lrs": [0.001, 0.0001],                # with several param groups
                "scalars": {"attn_logit_max": 7.5},
                "window": {...}}]}                    # when logging every N steps

Every field but ``step`` is optional.

Floats travel as JSON numbers, except NaN, +Inf and -Inf, which travel as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the proto3 JSON
convention), so any JSON parser can read them. The collector also accepts the
bare ``NaN``/``Infinity`` tokens Python's ``json`` module writes by default.

Measurement semantics (DESIGN.md): ``grad_norm`` and ``layer_grad_norms`` are
L2 norms of the gradient the optimizer sees *before clipping*, after
accumulation and all-reduce, unscaled. A layer is a module path; its norm is
sqrt(sum of its parameter tensors' squared norms). ``layer_nonfinite[i]`` is the
number of parameter tensors of layer ``i`` whose gradient holds a NaN or Inf.

The other per-step fields:

- ``step_time``: seconds from the end of the previous optimizer step to the
  end of this one (the training thread's clock; absent on the first step).
  The collector stores it as the series ``step_time``.
- ``clip_coef``: total gradient norm when the optimizer step ran (after
  ``clip_grad_norm_`` or any other in-place change) divided by ``grad_norm``;
  1.0 exactly when nothing changed the gradient, < 1 when it was clipped.
- ``loss_scale``: the AMP ``GradScaler`` scale the backward passes ran with
  (only when the client was given the scaler); the norms are already divided
  by it.
- ``overflow``: with a scaler, whether it skipped this step because the
  gradient held inf/NaN. An overflow record carries no norms (``grad_norm``,
  ``layer_*``, ``clip_coef``, ``local_grad_norm`` absent) and takes a step
  index of its own.
- ``local_grad_norm``: with data parallelism (world size > 1), the sending
  rank's own total norm before the all-reduce (unscaled, pre-clip). Together
  with ``grad_norm`` (after it) it gives two batch sizes for the noise scale.
- ``micro_batches``: backward passes accumulated into this step, as counted
  by the hooks.
- ``layer_param_norms``, ``layer_update_norms``: on steps whose index is a
  multiple of ``param_every`` (``watch(param_every=K)``, default 10, 0 = never)
  and only there, per layer (same order and length as ``layer_grad_norms``):
  the L2 norm of the weights after the optimizer step, |w_l|, and of that
  step's change, |w_l(after) - w_l(before)|, each sqrt(sum of the layer's
  tensors' squared norms). The collector stores both and their ratio, the
  update-to-weight ratio |Δw_l| / |w_l| (layer metric ``update_ratio``; 0/0 is
  NaN). Absent from overflow records.
- ``gns`` (with ``watch(noise_scale=...)``): squared gradient norms at two batch sizes
  for the gradient noise scale, ``{"mode": "micro"|"ddp"|"per_example", "b_small": b,
  "b_big": B, "layers": [i, ...], "small_sq": [...], "big_sq": [...]}``: for each run layer
  index in ``layers``, ``small_sq`` is the mean over the step's small batches (micro-batches,
  ranks or examples) of the layer's squared gradient norm at batch size b, and ``big_sq`` the
  squared norm of the step's gradient (batch size B), both unscaled. Absent from overflow
  records and from steps where b < B cannot be had (one micro-batch, unknown batch size).
- ``lrs``: the learning rate of every optimizer param group, in group order,
  when there is more than one group (``lr`` is always group 0's). The
  collector stores ``lrs[i]`` as the scalar series ``lr/group{i}``, so a
  record's ``scalars`` may not use those names.

- ``window``: present when the record stands for several optimizer steps
  (``watch(log_every=N)``, or ``log()`` called only every N steps): the
  record's own fields are its last step's, and the window summarises all of
  them, that step included::

      {"steps": 10, "first_step": 10,
       "series": {"grad_norm": {"count": 10, "nonfinite": 0, "max": 9.1,
                                "min": 1.2, "mean": 2.0},
                  "loss": {...}, "<extra scalar>": {...}},
       "layers": {"grad_norm": {"count": 10, "max": [...], "min": [...],
                                "mean": [...], "nonfinite": [...]}}}

  ``count`` is how many of the steps reported the series; ``max``, ``min``
  and ``mean`` are over its finite values only (absent, or NaN in a layer
  list, when none was finite) and ``nonfinite`` counts the steps where it was
  NaN or ±Inf. The collector stores them as series ``X:max``, ``X:min``,
  ``X:mean``, ``X:nonfinite`` and layer metrics ``grad_norm:max`` etc. at the
  record's step (``window:steps`` holds ``steps``), and folds the maxima and
  minima into the envelopes it serves, so a spike between records is kept.
  Extra scalar names may therefore not end in ``:max``, ``:min``, ``:mean``
  or ``:nonfinite``.

Run-level semantics (``RunSpec.semantics``, :data:`DEFAULT_SEMANTICS`) say
what every record of the run means; they do not vary per record, so records
do not repeat them. The world size is ``RunSpec.world_size`` and
``semantics["world_size"]`` (plus ``semantics["rank"]`` of the sender when > 1).
With ``watch(noise_scale=...)`` the semantics also hold ``noise_scale`` (the mode) and,
when declared, ``dataset_size`` (examples sampled without replacement: the collector applies
the finite-population correction).
"""

from __future__ import annotations

import gzip
import json
import math
from typing import Any

WIRE_VERSION = 1
CONTENT_TYPE = "application/json"

# Names of the per-step fields that are floats (may be non-finite).
FLOAT_FIELDS = ("wall_time", "step_time", "loss", "lr", "grad_norm", "clip_coef", "loss_scale",
                "local_grad_norm")
# Per-step fields that are lists of floats (may hold non-finite values).
FLOAT_LIST_FIELDS = ("layer_grad_norms", "layer_param_norms", "layer_update_norms", "lrs")
INT_FIELDS = ("batch_size", "samples", "tokens", "nonfinite", "micro_batches")
BOOL_FIELDS = ("overflow",)

_NONFINITE_OUT = {math.inf: "Infinity", -math.inf: "-Infinity"}
NONFINITE_STRINGS = frozenset(("NaN", "Infinity", "-Infinity"))

DEFAULT_SEMANTICS: dict[str, Any] = {
    "clip": "pre",  # norms are measured before gradient clipping
    "reduction": "global",  # after the data-parallel all-reduce
    "world_size": 1,
    "micro_batches": "per_record",  # counted per step: the record's micro_batches field
    "amp": "unscaled",
}


def encode_float(x: float) -> float | str:
    """A float as it goes on the wire: itself, or one of the non-finite strings."""
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "NaN"
    return _NONFINITE_OUT[x]


def decode_float(x: float | int | str | None) -> float | None:
    """Inverse of :func:`encode_float` (``None`` stays ``None``)."""
    if x is None or isinstance(x, float):
        return x
    if isinstance(x, int):
        return float(x)
    if x in NONFINITE_STRINGS:
        return float(x.replace("Infinity", "inf"))
    raise ValueError(f"not a wire float: {x!r}")


def _encode_value(v: Any) -> Any:
    if isinstance(v, float):
        return encode_float(v)
    if isinstance(v, dict):
        return {k: _encode_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode_value(x) for x in v]
    return v


def dumps(obj: Any) -> bytes:
    """Encode an object as wire JSON (non-finite floats as strings), UTF-8."""
    return json.dumps(_encode_value(obj), allow_nan=False, separators=(",", ":")).encode()


def encode_batch(
    steps: list[dict[str, Any]], compress: bool = True
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of one ``POST .../steps`` request for ``steps``."""
    body = dumps({"wire_version": WIRE_VERSION, "steps": steps})
    headers = {"Content-Type": CONTENT_TYPE}
    if compress:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return body, headers
