"""Statistics of the steps between two records, kept on the device.

When records are sent less often than optimizer steps run (``watch(log_every=N)``, or
``log()`` called only every N steps), the steps in between are not sampled away: each
series keeps, over the window's steps, element-wise

    max  = max  { v_s : v_s finite }        min = min { v_s : v_s finite }
    mean = sum { v_s : v_s finite } / #{ s : v_s finite }
    nonfinite = #{ s : v_s is NaN or ±Inf }    count = #{ s : the step reported v }

so a one-step spike between two records still reaches the collector (DESIGN.md,
"Measurement semantics"). Adding a step is a handful of element-wise kernels on the device;
nothing is read back until the record is packed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Rows of a name's running state: max, min, sum of finite values, finite count, non-finite count.
_MAX, _MIN, _SUM, _FINITE, _BAD = range(5)


@dataclass
class _Series:
    state: torch.Tensor  # (5, K) in the accumulator dtype
    count: int  # steps that reported this series
    vector: bool  # a per-layer vector (K = layers) rather than one value


@dataclass
class Window:
    """Running statistics of named series over the steps since the last record."""

    steps: int = 0
    first: int | None = None  # step index of the window's first step
    _series: dict[tuple[str, bool], _Series] = field(default_factory=dict)

    def add_step(self, index: int) -> None:
        """Count one optimizer step (index ``index``) into the window."""
        if self.first is None:
            self.first = index
        self.steps += 1

    def add(self, name: str, values: torch.Tensor, *, vector: bool = False) -> None:
        """Fold one step's ``values`` (shape ``(K,)``, any float dtype) into series ``name``."""
        with torch.no_grad():
            acc = torch.float32 if values.device.type == "mps" else torch.float64
            v = values.detach().reshape(-1).to(acc)
            finite = torch.isfinite(v)
            step = torch.stack([
                torch.where(finite, v, -torch.inf),
                torch.where(finite, v, torch.inf),
                torch.where(finite, v, 0.0),
                finite.to(acc),
                (~finite).to(acc),
            ])
            held = self._series.get((name, vector))
            if held is None:
                self._series[name, vector] = _Series(step, 1, vector)
                return
            if held.state.shape != step.shape or held.state.device != step.device:
                return  # the layer set cannot change mid-run; never raise into training
            s = held.state
            held.state = torch.cat([
                torch.maximum(s[_MAX:_MAX + 1], step[_MAX:_MAX + 1]),
                torch.minimum(s[_MIN:_MIN + 1], step[_MIN:_MIN + 1]),
                s[_SUM:] + step[_SUM:],
            ])
            held.count += 1

    def pack(self) -> tuple[list[tuple[str, int, int, bool]], torch.Tensor | None]:
        """``[(name, K, count, vector)]`` and one float32 tensor holding, per name in that
        order, ``max, min, mean, nonfinite`` (``4 * K`` values; max/min/mean are NaN where no
        value was finite). Still on the device; call :meth:`reset` afterwards."""
        layout: list[tuple[str, int, int, bool]] = []
        parts: list[torch.Tensor] = []
        with torch.no_grad():
            for (name, _), held in self._series.items():
                s = held.state
                none = s[_FINITE] == 0
                nan = torch.full_like(s[_MAX], torch.nan)
                mean = s[_SUM] / s[_FINITE].clamp(min=1)
                parts += [torch.where(none, nan, s[_MAX]), torch.where(none, nan, s[_MIN]),
                          torch.where(none, nan, mean), s[_BAD]]
                layout.append((name, s.shape[1], held.count, held.vector))
            if not parts:
                return layout, None
            device = parts[0].device
            return layout, torch.cat([p.to(device) for p in parts]).to(torch.float32)

    def reset(self) -> None:
        self.steps, self.first = 0, None
        self._series.clear()


def unpack(layout: list[tuple[str, int, int, bool]], values: list[float], steps: int,
           first: int) -> dict[str, object]:
    """The wire ``window`` object from :meth:`Window.pack`'s layout and its host values."""
    series: dict[str, object] = {}
    layers: dict[str, object] = {}
    pos = 0
    for name, k, count, vector in layout:
        block = values[pos:pos + 4 * k]
        pos += 4 * k
        mx, mn, mean, bad = (block[i * k:(i + 1) * k] for i in range(4))
        nonfinite = [int(b) for b in bad]
        if vector:
            layers[name] = {"count": count, "max": mx, "min": mn, "mean": mean,
                            "nonfinite": nonfinite}
        else:
            stats: dict[str, object] = {"count": count, "nonfinite": nonfinite[0]}
            if bad[0] < count:  # some value was finite
                stats.update(max=mx[0], min=mn[0], mean=mean[0])
            series[name] = stats
    out: dict[str, object] = {"steps": steps, "first_step": first}
    if series:
        out["series"] = series
    if layers:
        out["layers"] = layers
    return out
