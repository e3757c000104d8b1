"""Training-loop overhead of the gradsentry client against the bare loop and the alternatives.

Method:

* Model: ``client_hooks.demo.TinyGPT`` (GPT-style decoder, tied head) on CPU, sized by the CLI
  flags; the script prints its parameter-tensor count and gradient bytes.
* Variants, each on its **own model copy** (``copy.deepcopy`` of one initialisation) with its
  own AdamW, so that hooks of one variant never fire in another's backward:

  - ``bare``: forward, cross-entropy, backward, ``opt.step()``, ``opt.zero_grad()``.
  - ``gradsentry``: a ``Monitor(model, opt, server=...)`` (what ``client_hooks.watch`` returns,
    plus the timers described below) against a real collector started here in a subprocess
    (SQLite in a temp dir), and ``mon.log(loss=loss, batch_size=B)`` after each step, as the
    README shows. Records really go over HTTP.
  - ``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` before the step (one
    reduction pass over the gradients, then an in-place scale).
  - ``lightning.grad_norm``: ``grad_norm(model, norm_type=2)`` before the step, as a user
    would call it in ``on_before_optimizer_step`` (without ``self.log_dict``: no Trainer here,
    so this is a lower bound of Lightning's cost).
  - ``wandb.watch``: ``wandb.watch(model, log="gradients", log_freq=1)`` in offline mode
    (``WANDB_MODE=offline``, ``WANDB_DIR`` a temp dir, no network) plus
    ``wandb.log({"loss": ...})`` each step, which commits the histograms the hooks queued.

  A variant whose package cannot be imported is reported as skipped.
* Threads: one torch intra-op thread by default (``--threads``). On the shared 2-core machine
  of the first runs, two threads made steps swing from 0.4 s to 5 s whenever another process
  took a core (every parallel op waits for its descheduled thread); one thread degrades only
  in proportion to the CPU share it gets.
* Interleaving: in each round every variant runs ``--steps-per-round`` consecutive steps; the
  order of variants rotates from round to round, so drift from other work on the machine and
  position effects fall on all variants alike. The first ``--warmup-rounds`` rounds are
  discarded. Each step is timed with ``time.perf_counter`` around the whole step; the table
  shows the median per variant, its ratio to ``bare`` and the added time (difference of the
  medians; also the median of the round-paired differences).
* Client work per step, timed inside the loop: the ``gradsentry`` variant's monitor is a
  subclass of :class:`client_hooks.monitor.Monitor` whose every ``_on_*`` hook/callback and
  ``log`` are wrapped in ``perf_counter`` timers (outermost call only). Their sum per step is
  everything the client runs on the training thread (per-parameter hooks, backward-end
  callbacks, optimizer pre/post hooks, ``log()``), whatever the client's internals are. The
  table lists each method's median per step: the hot spots.
* The floor, "one read of all gradient bytes": in a variant of its own (``one-read floor``,
  the bare loop on its own model copy), right after ``loss.backward()`` (where the client's
  reduction runs), the loop times ``torch._foreach_norm(grads)`` or ``[g.sum() for g in
  grads]``, alternating step by step so that each is the first to read the fresh gradients
  (each reads every gradient element once and writes one scalar per tensor), and excludes
  that time from the step. The floor is the faster of the two medians. (Until 2026-11-23 the
  floor was read in the gradsentry variant itself, after the client had read the gradients,
  which found them in cache and made the floor look cheaper.) A microbenchmark on populated
  gradients (interleaved, rotating order, ``--micro-reps`` each) repeats the floors next to
  the client's reduction (``LayerNorms.compute()``), ``clip_grad_norm_`` and Lightning's
  ``grad_norm``.
* Also reported: the CPU time of the sender thread per logged step, and with the CPU norm
  worker on, of its two threads per step (gradient norms; the ``param_every`` weight copy and
  weight/update norms): off the training thread, but on a 2-core machine they compete for a
  core. ``--diagnose`` adds two attribution variants: 76 no-op post-accumulate-grad hooks, and
  ``watch()`` without ``log()``.
* Medians hide the ``param_every`` (``PARAM_EVERY`` = 10) steps, which also copy and reduce
  the weights: the client work is also given as a mean over all steps (against the floor's
  mean), and as means over the K-th steps and the others.
* Targets (the issue): client work per step <= 1.3x the one-read floor (medians, and means
  over all steps); ``wandb.watch``'s added time >= 20x the client's.

Run: ``.venv/bin/python bench/client_overhead.py`` (``--help`` for sizes and counts).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import client_hooks  # noqa: E402
from client_hooks.demo import TinyGPT  # noqa: E402
from client_hooks.monitor import Monitor  # noqa: E402

StepHook = Callable[[torch.Tensor], None]
NORM_THREAD_ENV = "GRADSENTRY_NORM_THREAD"
SYNC = "gradsentry, no norm thread"
PARAM_EVERY = 10  # watch()'s default, passed explicitly: the K-th steps are counted here


@dataclass
class Variant:
    """One way of running the training step, on its own model copy."""

    name: str
    model: TinyGPT
    opt: torch.optim.Optimizer
    before_step: StepHook | None = None  # after backward, before optimizer.step()
    after_step: StepHook | None = None  # after optimizer.step()
    times: list[float] = field(default_factory=list)
    rounds: list[list[float]] = field(default_factory=list)
    close: Callable[[], None] | None = None
    probe: Callable[[], None] | None = None  # after backward, excluded from the step's time
    steps_run: int = 0  # warm-up included: the optimizer step index of the next step


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- collector --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def collector(tmp: Path) -> Iterator[str]:
    """A real collector (``server.cli serve``) on a free port, SQLite in ``tmp``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--port",
        str(port),
        "--database-url",
        f"sqlite:///{tmp / 'b.db'}",
        "--log-level",
        "warning",
    ]
    with open(tmp / "collector.log", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"collector did not start: see {tmp / 'collector.log'}")
            time.sleep(0.2)
        log(f"collector up at {url} (pid {proc.pid})")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- variants ---------------------------------------------------------------------------------


def make_opt(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)


def build_variants(
    base: TinyGPT,
    server: str,
    batch: int,
    tmp: Path,
    only: set[str] | None,
    diagnose: bool = False,
    probe: Probe | None = None,
) -> tuple[list[Variant], Monitor | None, list[str]]:
    """The variants (each on a deepcopy of ``base``), our monitor, and skip notes."""
    variants: list[Variant] = []
    notes: list[str] = []
    mon: Monitor | None = None

    def want(name: str) -> bool:
        return only is None or name in only

    def new(name: str) -> Variant:
        model = copy.deepcopy(base)
        return Variant(name, model, make_opt(model))

    if want("bare"):
        variants.append(new("bare"))
    if want("gradsentry"):
        v = new("gradsentry")
        cls = probe.monitor_class() if probe is not None else Monitor
        mon = cls(v.model, v.opt, project="bench", server=server, batch_size=batch,
                  param_every=PARAM_EVERY)
        m = mon

        def ours_after(loss: torch.Tensor) -> None:
            m.log(loss=loss, batch_size=batch)

        v.after_step = ours_after
        variants.append(v)
        if getattr(mon, "_worker", None) is not None:
            # The same client with its CPU norm worker thread off (client_hooks/overlap.py):
            # every norm on the training thread, at the end of the backward pass.
            v = new(SYNC)
            saved = os.environ.get(NORM_THREAD_ENV)
            os.environ[NORM_THREAD_ENV] = "0"
            try:
                sync = cls(v.model, v.opt, project="bench", server=server, batch_size=batch,
                           param_every=PARAM_EVERY)
            finally:
                if saved is None:
                    os.environ.pop(NORM_THREAD_ENV)
                else:
                    os.environ[NORM_THREAD_ENV] = saved
            assert getattr(sync, "_worker", None) is None

            def sync_after(loss: torch.Tensor, s: Monitor = sync) -> None:
                s.log(loss=loss, batch_size=batch)

            v.after_step = sync_after
            v.close = sync.close
            variants.append(v)
    if probe is not None and want("gradsentry"):
        # The floor on a model of its own: right after backward it is the first to read the
        # gradients, as the client's reduction is in the gradsentry variant (reading them after
        # the client did would find them in cache and flatter the floor).
        v = new("one-read floor")
        f_model, f_probe = v.model, probe
        v.probe = lambda: f_probe.floor(f_model)
        variants.append(v)
    if want("clip_grad_norm_"):
        v = new("clip_grad_norm_")
        params = [p for p in v.model.parameters() if p.requires_grad]

        def clip(loss: torch.Tensor) -> None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)

        v.before_step = clip
        variants.append(v)
    if want("lightning.grad_norm"):
        try:
            from lightning.pytorch.utilities import grad_norm
        except Exception as exc:  # noqa: BLE001 - any import failure means: skip
            notes.append(f"lightning.grad_norm skipped: {exc!r}")
        else:
            v = new("lightning.grad_norm")
            lmodel = v.model

            def lightning_norms(loss: torch.Tensor) -> None:
                grad_norm(lmodel, norm_type=2)

            v.before_step = lightning_norms
            variants.append(v)
    if want("wandb.watch"):
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_DIR"] = str(tmp)
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        try:
            import wandb

            wandb.init(project="gradsentry-bench", mode="offline", dir=str(tmp))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"wandb.watch skipped: {exc!r}")
        else:
            v = new("wandb.watch")
            wandb.watch(v.model, log="gradients", log_freq=1)

            def wandb_log(loss: torch.Tensor) -> None:
                wandb.log({"loss": loss.item()})

            v.after_step = wandb_log
            variants.append(v)
    if diagnose:
        v = new("diag: 76 no-op grad hooks")
        for param in v.model.parameters():
            param.register_post_accumulate_grad_hook(_noop_hook)  # type: ignore[no-untyped-call]
        variants.append(v)
        v = new("diag: gradsentry without log()")
        quiet = client_hooks.watch(v.model, v.opt, project="bench", server=server)
        v.close = quiet.close
        variants.append(v)
    return variants, mon, notes


def _noop_hook(param: torch.Tensor) -> None:
    return None


def train_step(v: Variant, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    logits = v.model(x[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()  # type: ignore[no-untyped-call]
    untimed = 0.0
    if v.probe is not None:
        t1 = time.perf_counter()
        v.probe()
        untimed = time.perf_counter() - t1
    if v.before_step is not None:
        v.before_step(loss)
    v.opt.step()
    if v.after_step is not None:
        v.after_step(loss)
    v.opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0 - untimed


# -- instrumentation of our monitor -----------------------------------------------------------


FLOORS: dict[str, Callable[[list[torch.Tensor]], object]] = {
    "torch._foreach_norm(grads)": torch._foreach_norm,
    "[g.sum() for g in grads]": lambda grads: [g.sum() for g in grads],
}


class Probe:
    """Time the monitor spends on the training thread per step, and the floor beside it.

    :meth:`monitor_class` subclasses :class:`Monitor` with every ``_on_*`` hook and ``log``
    wrapped in a timer (outermost call only), so whatever the client runs per step, its hooks
    included, is counted without relying on its internals. :meth:`floor` reads the gradients
    right after the backward pass, where the client's reduction runs; the training loop
    excludes that time from the step.
    """

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []  # one per measured step: method -> seconds
        self.by_variant: dict[str, list[dict[str, float]]] = {}  # the same, per gradsentry variant
        self.kth: dict[str, list[bool]] = {}  # per gradsentry variant: step was a K-th step
        self.floors: dict[str, list[float]] = {name: [] for name in FLOORS}
        self.on = False
        self._depth = 0
        self._floor_calls = 0

    def monitor_class(self) -> type[Monitor]:
        probe = self

        def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def timed(mon: Monitor, *args: Any, **kwargs: Any) -> Any:
                if probe._depth:
                    return fn(mon, *args, **kwargs)
                probe._depth += 1
                t0 = time.perf_counter()
                try:
                    return fn(mon, *args, **kwargs)
                finally:
                    probe._depth -= 1
                    probe.acc[name] = probe.acc.get(name, 0.0) + time.perf_counter() - t0

            return timed

        names = [n for n, f in vars(Monitor).items() if callable(f) and n.startswith("_on_")]
        methods = {n: wrap(n, getattr(Monitor, n)) for n in [*names, "log"]}
        return type("TimedMonitor", (Monitor,), methods)

    def floor(self, model: torch.nn.Module) -> None:
        """One floor per step, alternating, so each is the first to read the gradients."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        name = list(FLOORS)[self._floor_calls % len(FLOORS)]
        self._floor_calls += 1
        t0 = time.perf_counter()
        FLOORS[name](grads)
        if self.on:
            self.floors[name].append(time.perf_counter() - t0)


def thread_cpu_s(thread: threading.Thread | None) -> float | None:
    """CPU seconds of one thread of this process (Linux /proc): the scheduler's run time in
    ns (``schedstat``), else user + system time in clock ticks (10 ms each)."""
    if thread is None or thread.native_id is None:
        return None
    task = Path(f"/proc/self/task/{thread.native_id}")
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = (task / "stat").read_text().rsplit(")", 1)[1]
    except OSError:
        return None
    parts = fields.split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


# -- microbenchmark ---------------------------------------------------------------------------


def micro(
    mon: Monitor, model: TinyGPT, opt: torch.optim.Optimizer, x: torch.Tensor, reps: int
) -> dict[str, list[float]]:
    """Seconds per call of each isolated operation, interleaved with a rotating order."""
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    # Our hooks fire in this backward: the monitor's reduction plan is cached from here on.
    loss.backward()  # type: ignore[no-untyped-call]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    params = [p for p in model.parameters() if p.grad is not None]

    ops: dict[str, Callable[[], object]] = {
        "floor: torch._foreach_norm(grads)": lambda: torch._foreach_norm(grads),
        "floor: [g.sum() for g in grads]": lambda: [g.sum() for g in grads],
        "clip_grad_norm_(max_norm=1e30)": lambda: torch.nn.utils.clip_grad_norm_(params, 1e30),
    }
    norms = getattr(mon, "_norms", None)  # internal: the client's reduction, when it has one
    if norms is not None and callable(getattr(norms, "compute", None)):
        ops["ours: LayerNorms.compute() (the reduction alone)"] = norms.compute
    with contextlib.suppress(Exception):
        from lightning.pytorch.utilities import grad_norm

        ops["lightning grad_norm(model, 2)"] = lambda: grad_norm(model, norm_type=2)
    names = list(ops)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps + 5):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            ops[name]()
            dt = time.perf_counter() - t0
            if r >= 5:
                samples[name].append(dt)
    return samples


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=30, help="measured rounds")
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup-rounds", type=int, default=2)
    p.add_argument("--micro-reps", type=int, default=300)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default). 1 by default: on a shared machine a "
        "multi-threaded op waits for its slowest thread, and a step can take 10x longer",
    )
    p.add_argument("--only", default=None, help="comma-separated variant names")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="add two attribution variants: 76 no-op grad hooks; gradsentry without log()",
    )
    p.add_argument("--seed", type=int, default=20261123)
    p.add_argument("--json", default=None, help="also write every raw timing (s) to this file")
    args = p.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the collector subprocess and temp dir are cleaned up.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = TinyGPT(vocab=args.vocab, dim=args.dim, depth=args.depth, heads=args.heads, seq=args.seq)
    tensors = [q for q in base.parameters() if q.requires_grad]
    n_params = sum(q.numel() for q in tensors)
    grad_bytes = sum(q.numel() * q.element_size() for q in tensors)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    log(
        f"TinyGPT depth={args.depth} dim={args.dim} heads={args.heads} seq={args.seq} "
        f"vocab={args.vocab} batch={args.batch}: {len(tensors)} parameter tensors, "
        f"{n_params / 1e6:.2f}M parameters, {grad_bytes / 2**20:.1f} MiB of gradients"
    )
    g = torch.Generator().manual_seed(args.seed)
    data = [torch.randint(args.vocab, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    only = set(args.only.split(",")) if args.only else None

    with tempfile.TemporaryDirectory(prefix="gs-bench-") as tmpdir, collector(Path(tmpdir)) as url:
        tmp = Path(tmpdir)
        probe = Probe()
        variants, mon, notes = build_variants(
            base, url, args.batch, tmp, only, args.diagnose, probe
        )
        for note in notes:
            log(note)
        sender_thread = getattr(getattr(mon, "_sender", None), "_thread", None)
        worker_thread = getattr(getattr(mon, "_worker", None), "_thread", None)
        param_thread = getattr(getattr(mon, "_param_overlap", None), "thread", None)
        log(f"gradsentry's CPU norm worker thread: {'on' if worker_thread else 'off'}; "
            f"K-th step thread: {'on' if param_thread else 'off'}")
        log(
            f"variants: {', '.join(v.name for v in variants)}; {args.warmup_rounds} warm-up + "
            f"{args.rounds} rounds x {args.steps_per_round} steps each, rotating order"
        )
        cpu0 = wcpu0 = pcpu0 = 0.0
        total_rounds = args.warmup_rounds + args.rounds
        t_start = time.monotonic()
        for r in range(total_rounds):
            measured = r >= args.warmup_rounds
            if r == args.warmup_rounds:
                cpu0 = thread_cpu_s(sender_thread) or 0.0
                wcpu0 = thread_cpu_s(worker_thread) or 0.0
                pcpu0 = thread_cpu_s(param_thread) or 0.0
            probe.on = measured
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                round_times = []
                for i in range(args.steps_per_round):
                    probe.acc.clear()
                    kth = v.steps_run % PARAM_EVERY == 0
                    dt = train_step(v, data[(r * args.steps_per_round + i) % len(data)])
                    v.steps_run += 1
                    round_times.append(dt)
                    if measured and v.name.startswith("gradsentry"):
                        probe.by_variant.setdefault(v.name, []).append(dict(probe.acc))
                        probe.kth.setdefault(v.name, []).append(kth)
                if measured:
                    v.times += round_times
                    v.rounds.append(round_times)
            meds = "  ".join(
                f"{v.name} {1e3 * statistics.median(v.times):.0f}" for v in variants if v.times
            )
            log(
                f"round {r + 1}/{total_rounds}{'' if measured else ' (warm-up)'}"
                f"  {time.monotonic() - t_start:.0f}s  medians ms: {meds}"
            )
        probe.on = False
        sender_cpu = (thread_cpu_s(sender_thread) or 0.0) - cpu0
        worker_cpu = (thread_cpu_s(worker_thread) or 0.0) - wcpu0 if worker_thread else None
        param_cpu = (thread_cpu_s(param_thread) or 0.0) - pcpu0 if param_thread else None
        probe.steps = probe.by_variant.get("gradsentry", [])

        ours_v = next((v for v in variants if v.name == "gradsentry"), None)
        iso: dict[str, list[float]] = {}
        if mon is not None and ours_v is not None:
            log(f"microbenchmark: {args.micro_reps} interleaved reps per operation")
            iso = micro(mon, ours_v.model, ours_v.opt, data[0], args.micro_reps)
            ok = mon.flush(30)
            log(f"monitor flush ok={ok} stats={mon.stats}")
            mon.close()
        for v in variants:
            if v.close is not None:
                v.close()
        if args.json:
            raw = {
                "variants": {v.name: {"rounds": v.rounds} for v in variants},
                "micro": iso,
                "in_loop": {"monitor": probe.by_variant, "floors": probe.floors,
                            "kth": probe.kth},
                "thread_cpu_s": {"sender": sender_cpu, "norm_worker": worker_cpu,
                                 "param_thread": param_cpu},
                "args": vars(args),
            }
            Path(args.json).write_text(json.dumps(raw))
        report(variants, iso, probe, sender_cpu, worker_cpu, param_cpu, args, len(tensors),
               grad_bytes)
    return 0


def report(
    variants: list[Variant],
    iso_samples: dict[str, list[float]],
    probe: Probe,
    sender_cpu: float,
    worker_cpu: float | None,
    param_cpu: float | None,
    args: argparse.Namespace,
    n_tensors: int,
    grad_bytes: int,
) -> None:
    bare = next((v for v in variants if v.name == "bare"), None)
    med = {v.name: statistics.median(v.times) for v in variants}
    print("\n## End to end (ms per training step, medians of interleaved steps)\n")
    print(
        "| variant | steps | median ms/step | p25-p75 ms | ratio to bare "
        "| added ms (diff of medians) | added ms (median of paired round diffs) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    added: dict[str, float] = {}
    paired: dict[str, float] = {}
    for v in variants:
        q = statistics.quantiles(v.times, n=4) if len(v.times) > 1 else [v.times[0]] * 3
        iqr = f"{1e3 * q[0]:.0f}-{1e3 * q[2]:.0f}"
        if bare is None:
            print(f"| {v.name} | {len(v.times)} | {1e3 * med[v.name]:.1f} | {iqr} | - | - | - |")
            continue
        added[v.name] = med[v.name] - med["bare"]
        paired[v.name] = statistics.median(
            statistics.median(a) - statistics.median(b)
            for a, b in zip(v.rounds, bare.rounds, strict=True)
        )
        print(
            f"| {v.name} | {len(v.times)} | {1e3 * med[v.name]:.1f} | {iqr} | "
            f"{med[v.name] / med['bare']:.3f} | {1e3 * added[v.name]:+.2f} | "
            f"{1e3 * paired[v.name]:+.2f} |"
        )
    floor = 0.0
    floor_name = ""
    work: dict[str, float] = {}  # gradsentry variant -> median client work per step (s)
    mean_work: dict[str, float] = {}  # the same, mean over all measured steps
    mean_floor = 0.0
    if probe.by_variant:
        names = sorted({n for steps in probe.by_variant.values() for step in steps for n in step})
        cols = list(probe.by_variant)
        for col in cols:
            work[col] = statistics.median(sum(step.values()) for step in probe.by_variant[col])
            mean_work[col] = statistics.fmean(sum(st.values()) for st in probe.by_variant[col])
        print(
            "\n## gradsentry on the training thread, timed inside the loop (medians per step, "
            f"over {len(next(iter(probe.by_variant.values())))} steps)\n"
        )
        print("| what | " + " | ".join(f"{c}: median ms/step" for c in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for name in names:
            cells = [
                f"{1e3 * statistics.median(st.get(name, 0.0) for st in probe.by_variant[c]):.3f}"
                for c in cols
            ]
            print(f"| `Monitor.{name}` | " + " | ".join(cells) + " |")
        print("| **all client work per step** | "
              + " | ".join(f"**{1e3 * work[c]:.3f}**" for c in cols) + " |")
        for name, samples in probe.floors.items():
            med_floor = statistics.median(samples)
            print(f"| floor, same place in the loop: `{name}` | {1e3 * med_floor:.3f} |"
                  + " |" * (len(cols) - 1))
        floor_name = min(probe.floors, key=lambda n: statistics.median(probe.floors[n]))
        floor = statistics.median(probe.floors[floor_name])
        mean_floor = statistics.fmean(probe.floors[floor_name])

        def mean_of(col: str, name: str | None, kth: bool | None) -> str:
            """Mean ms over the steps of ``col`` (all, or only K-th / other steps) of one
            method (None: all client work)."""
            rows = [st for st, k in zip(probe.by_variant[col], probe.kth[col], strict=True)
                    if kth is None or k == kth]
            if not rows:
                return "-"
            vals = [sum(st.values()) if name is None else st.get(name, 0.0) for st in rows]
            return f"{1e3 * statistics.fmean(vals):.3f}"

        kth_n = sum(next(iter(probe.kth.values())))
        n_all = len(next(iter(probe.kth.values())))
        print(
            f"\nMeans per step over all {n_all} steps, of which {kth_n} `param_every` "
            f"(K = {PARAM_EVERY}) steps: weight copy before the step, weight and update "
            "norms after it\n"
        )
        print("| what | " + " | ".join(
            f"{c}: mean ms/step (all / K-th / other steps)" for c in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for name in [*names, None]:
            label = f"`Monitor.{name}`" if name else "**all client work per step**"
            cells = [" / ".join(mean_of(c, name, k) for k in (None, True, False)) for c in cols]
            print(f"| {label} | " + " | ".join(cells) + " |")
        for name, samples in probe.floors.items():
            print(f"| floor, same place in the loop: `{name}` (mean) | "
                  f"{1e3 * statistics.fmean(samples):.3f} |" + " |" * (len(cols) - 1))
        for col in cols:
            top = max(sum(st.values()) for st in probe.by_variant[col])
            print(f"- {col}: slowest step's client work {1e3 * top:.3f} ms")
        n_steps = len(probe.steps) or 1
        print(
            f"\nSender thread CPU: {1e3 * sender_cpu / n_steps:.2f} ms per logged step "
            f"({sender_cpu:.2f} s over {n_steps} steps; off the training thread)"
        )
        if worker_cpu is not None:
            print(
                f"Norm worker thread CPU (gradsentry): {1e3 * worker_cpu / n_steps:.2f} ms per "
                f"step ({worker_cpu:.2f} s over {n_steps} steps; off the training thread, on "
                "the core torch leaves idle)"
            )
        if param_cpu is not None:
            print(
                f"K-th step (param_every) thread CPU (gradsentry): {1e3 * param_cpu / n_steps:.2f}"
                f" ms per step ({param_cpu:.2f} s over {n_steps} steps, every step counted)"
            )
        if worker_cpu is not None or param_cpu is not None:
            both = (worker_cpu or 0.0) + (param_cpu or 0.0)
            print(f"Both threads together: {1e3 * both / n_steps:.2f} ms of CPU per step")
    if iso_samples:
        iso = {n: statistics.median(t) for n, t in iso_samples.items()}
        best = {n: min(t) for n, t in iso_samples.items()}
        print(
            f"\n## Isolated costs, microbenchmark ({n_tensors} gradient tensors, "
            f"{grad_bytes / 2**20:.1f} MiB; {args.micro_reps} interleaved reps each)\n"
        )
        print("| operation | median ms | min ms | GB/s of gradient bytes (median) |")
        print("|---|---:|---:|---:|")
        for name, t in iso.items():
            gbs = grad_bytes / t / 1e9
            print(f"| {name} | {1e3 * t:.3f} | {1e3 * best[name]:.3f} | {gbs:.1f} |")
    if not work:
        return
    print("\n## Targets\n")
    for col, mine in work.items():
        verdict = "met" if mine / floor <= 1.3 else "MISSED"
        print(
            f"- {col}: client work per step / one-read floor ({floor_name}), both in the loop "
            f"= {1e3 * mine:.3f} / {1e3 * floor:.3f} ms = {mine / floor:.2f}x (target <= 1.3x): "
            f"{verdict}"
        )
        for name, samples in probe.floors.items():
            if name != floor_name and samples:
                other = statistics.median(samples)
                print(
                    f"  - against the other read, `{name}`: {1e3 * mine:.3f} / "
                    f"{1e3 * other:.3f} ms = {mine / other:.2f}x; that read itself is "
                    f"{other / floor:.2f}x the floor"
                )
        mean = mean_work[col]
        verdict = "met" if mean / mean_floor <= 1.3 else "MISSED"
        print(
            f"  - means over all steps (param_every steps included): {1e3 * mean:.3f} / "
            f"{1e3 * mean_floor:.3f} ms = {mean / mean_floor:.2f}x (target <= 1.3x): {verdict}"
        )
    red = "ours: LayerNorms.compute() (the reduction alone)"
    if iso_samples and red in iso_samples:
        micro_floor = min(t for n, t in iso.items() if n.startswith("floor"))
        print(
            f"- microbenchmark: the reduction alone / fastest floor = {iso[red] / micro_floor:.2f}x"
        )
    if "wandb.watch" in added and "gradsentry" in added:
        for label, src in (("diff of medians", added), ("paired round diffs", paired)):
            w = src["wandb.watch"]
            for col, mine in work.items():
                verdict = "met" if w / mine >= 20 else "MISSED"
                print(
                    f"- wandb.watch added ({label}) / {col} client work per step = "
                    f"{1e3 * w:.1f} / {1e3 * mine:.3f} ms = {w / mine:.0f}x (target >= 20x): "
                    f"{verdict}"
                )
            e2e = src["gradsentry"]
            ratio = f"{w / e2e:.0f}x" if e2e > 0 else "n/a (ours <= 0: within noise)"
            print(f"  - against gradsentry's end-to-end added time ({1e3 * e2e:+.2f} ms): {ratio}")

if __name__ == "__main__":
    sys.exit(main())
