"""Per-step device state that the hooks write into, and its close-out into one flat row per step.

Everything here stays on the model's device: no `.item()`, no `.cpu()`. The hooks in `hooks.py` call
the `on_*` methods; `Watcher.step()` calls `finish_step()`.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch

from . import _dist, stats
from ._model import ModelMap, is_nonnegative
from ._pairs import PairMap
from ._row import RowParts

MAX_SITES_PER_MODULE = 4  # calls of one activation module per forward kept apart; later ones share the last
MAX_PROBES_PER_STEP = 4096  # NaN tracing stops for the rest of a step past this many module calls
_engine = torch.autograd.Variable._execution_engine
# -1 outside backward. Inside it, a forward is activation-checkpoint recomputation, already counted.
_graph_task_id = torch._C._current_graph_task_id


@dataclass
class Site:
    """One call site of an activation module (a module reused twice per forward has two)."""

    index: int
    name: str
    kind: str
    module_type: str
    channels_first: bool = False
    unit_max: torch.Tensor | None = None  # running max per unit over the dead-unit window
    pos: torch.Tensor | None = None  # positives (relu) or saturated count (tanh/sigmoid) in this step
    numel: int = 0
    calls: int = 0  # dead-unit reads so far: turns which samples of a big batch are read


@dataclass
class GradPlan:
    """The parameters that have a .grad (one pattern of them): their PairMap, for the host's per-layer sums."""

    map: int  # index into Recorder.maps
    shard_scale: torch.Tensor | None  # sharded params: per present param, see Recorder.shard_scale_for


@dataclass
class RatioSpec:
    """The parameters whose update ratio one step measures, and the layers they belong to."""

    params: list[torch.Tensor]
    map: int  # index into Recorder.maps
    shard_scale: torch.Tensor | None = None  # sharded params: see Recorder.shard_scale_for


@dataclass
class StepRow:
    """One recorded step: host values, plus one flat device vector laid out by `layout`."""

    step: int
    time: float
    loss: float | None  # a host float; a tensor loss lives in `flat`
    lrs: list
    skipped: bool | None
    layout: list[tuple[str, int]]  # (field, length) of each piece of `flat`, in order
    flat: torch.Tensor | None
    sites: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # field -> [(site, numel)]
    trace: list[tuple[int, tuple[int, ...], int]] = field(default_factory=list)  # (module, in probes, out)
    eval_forward: bool = False  # a training forward (grad enabled) ran in eval() mode


class Recorder:
    def __init__(self, mm: ModelMap, config, device: torch.device, scaler=None, world: int = 1):
        self.mm, self.cfg, self.device, self.scaler = mm, config, device, scaler
        # FSDP/DTensor: each rank measures its own shards; norms carry sqrt(1/(ranks holding each element)),
        # so that summing their squares over the ranks at flush gives the full tensor's (_dist.shard_weights).
        weights = _dist.shard_weights(mm.params, world)
        self.sharded = weights is not None
        self._shard_scale = None if weights is None else torch.tensor(weights, device=device).sqrt()
        self.n_layers = len(mm.layers)
        self.maps: list[PairMap] = []  # shared with the flush (RunLayout.maps): rows name their map by index
        self._plans: dict[tuple[int, ...], GradPlan] = {}
        self._full_plan = self._plan(tuple(range(len(mm.params))))
        self.recording = True
        self.detail = True  # a detail step: also grad max-abs and activation fractions (set by the Watcher)
        # A float16 output or model: affine maps can overflow, so the safe modules are probed on every step.
        self.half_seen = any(p.dtype == torch.float16 for p in mm.params) or bool(
            scaler is not None and scaler.is_enabled())
        self.sites: list[Site] = []
        self._site_of: dict[tuple[int, int], Site] = {}
        self.new_sites: list[Site] = []  # sites seen for the first time, not yet sent to the store
        self.first_error: Exception | None = None  # reported once by the Watcher as a GradwatchWarning
        self._reset_step()

    # ---- backward: gradients -------------------------------------------------------------------
    def on_grad_ready(self) -> None:
        """A watched parameter's .grad was just accumulated; read all grads once backward ends."""
        if self._queued or not self.recording:
            return
        self._queued = True
        # Queued twice: the first callback runs with the ones DDP/FSDP queued during backward, and the
        # second after them, so that reduced gradients are read.
        _engine.queue_callback(lambda: _engine.queue_callback(self._read_grads))

    def on_grad_incoming(self, param: torch.Tensor) -> None:
        """A gradient for the sentinel parameter is about to be accumulated into its .grad.

        At the first backward of a step, a .grad that still holds non-zero values was not reset since the
        last optimizer step: `zero_grad()` is missing. One tiny reduction per step, on the smallest param.
        """
        if self._carry_checked or not self.recording:
            return
        self._carry_checked = True
        if param.grad is not None:
            with torch.no_grad():
                self._carry = param.grad.ne(0).any()

    def _read_grads(self) -> None:
        self._queued = False
        # A backward ends a forward pass. Reset here too, not only when the root module's forward starts:
        # Lightning calls training_step, not the module's forward, so the root's pre-hook may never run, and
        # the next micro-batch's activation calls would count as second calls of the same modules.
        self._calls = [0] * len(self._calls)
        self._seen.clear()
        try:
            with torch.no_grad():
                self._measure_grads()
        except Exception as e:  # noqa: BLE001 - raised here, it would surface from the user's backward()
            self.internal_error(e)

    def internal_error(self, error: Exception) -> None:
        """A bug or an unsupported case inside gradwatch: keep the first; training goes on."""
        if self.first_error is None:
            self.first_error = error

    def _measure_grads(self) -> None:
        grads = [p.grad for p in self.mm.params]
        plan = self._full_plan
        if any(g is None for g in grads):
            present = tuple(i for i, g in enumerate(grads) if g is not None)
            if not present:
                return
            grads = [grads[i] for i in present]
            plan = self._plan(present)
        if self.sharded:
            grads = [_dist.local(g) for g in grads]
        # One norm per parameter and nothing else on the device: the scale, the per-layer sums and the
        # total are taken on the host at flush (chunk.py), where they cost no device op per step.
        mx = stats.maxabs(grads) if self.cfg.grad_maxabs and self.detail else None
        self._grad = (plan, stats.norms(grads), mx, self._scale())

    def add_map(self, pair_param: list[int], pair_layer: list[int]) -> int:
        """Register which layer each (measured parameter, layer) pair names; rows name it by the index returned."""
        self.maps.append(PairMap(pair_param, pair_layer, self.n_layers))
        return len(self.maps) - 1

    def shard_scale_for(self, params: list[int]) -> torch.Tensor | None:
        """Sharded runs: per parameter, the factor that makes the sum over ranks of its local shard's squared
        norm, times this factor squared, the full tensor's (see _dist.shard_weights); None otherwise."""
        return None if self._shard_scale is None else self._shard_scale[params]

    def _plan(self, present: tuple[int, ...]) -> GradPlan:
        """The GradPlan of the `present` params (those with a .grad); one per pattern, made once."""
        hit = self._plans.get(present)
        if hit is not None:
            return hit
        where = {p: i for i, p in enumerate(present)}
        pairs = [(where[p], ly) for p, ly in zip(self.mm.param_of_pair, self.mm.layer_of_pair) if p in where]
        hit = GradPlan(self.add_map([p for p, _ in pairs], [ly for _, ly in pairs]),
                       self.shard_scale_for(list(present)))
        self._plans[present] = hit
        return hit

    def _scale(self) -> torch.Tensor | None:
        s = self.scaler
        if s is None or not s.is_enabled() or getattr(s, "_scale", None) is None:
            return None
        # A copy: the scaler updates its scale in place before the step row is built.
        return s._scale.reshape(()).clone()

    # ---- forward: activations and NaN tracing ----------------------------------------------------
    def on_forward_start(self, training: bool, args: tuple) -> None:
        self._calls = [0] * len(self._calls)
        self._seen.clear()
        if not torch.is_grad_enabled() or _graph_task_id() != -1:
            return
        if not training:
            self.eval_forward = True
        root = self.mm.root_traced
        if self.recording and self.cfg.trace_nonfinite and root is not None:
            # The model's inputs, probed before any module runs: a NaN batch is named as such even when
            # the modules it goes through first are not probed (SAFE_IN_FLOAT32).
            with torch.no_grad():
                ins = tuple(self._probe_of(t, is_input=True) for t in args if isinstance(t, torch.Tensor))
            if ins:
                self._trace.append((root, ins, -1))

    def on_activation(self, a: int, args: tuple, out) -> None:
        if not (self.recording and torch.is_grad_enabled() and isinstance(out, torch.Tensor)) \
                or _graph_task_id() != -1:
            return
        with torch.no_grad():
            self._activation(a, args, out)

    def _activation(self, a: int, args: tuple, out: torch.Tensor) -> None:
        ordinal = min(self._calls[a], MAX_SITES_PER_MODULE - 1)
        self._calls[a] += 1
        site = self._site_of.get((a, ordinal)) or self._new_site(a, ordinal)
        if self.cfg.trace_nonfinite and args:
            self._alias(args[0], out)
        act = self.mm.activations[a]
        if site.kind == "relu":
            if out.ndim == 0 or out.numel() == 0:
                return
            dim = stats.unit_dim(out.shape, site.channels_first)
            m = stats.unit_max(stats.unit_rows(out, dim, site.calls), dim)
            site.calls += 1
            if site.unit_max is None or site.unit_max.shape != m.shape:
                site.unit_max = m  # a new unit count starts a new window for this site
                self._unit_max.pop(site.index, None)
            else:  # folded into the window's running max by one op for every site, in finish_step
                prev = self._unit_max.get(site.index)
                self._unit_max[site.index] = m if prev is None else torch.maximum(prev, m)
            if not self.detail:  # the step's zero and saturation fractions are detail stats
                return
            cnt, n = stats.positive_count(out, nonnegative=is_nonnegative(act.module))
        else:
            if not self.detail:
                return
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None:
                return
            thr = stats.SIGMOID_SATURATION if site.kind == "sigmoid" else stats.TANH_SATURATION
            cnt, n = stats.saturated_count(x, thr)
        site.pos = cnt if site.pos is None else site.pos + cnt
        site.numel += n
        self._active_sites.add(site.index)

    def _new_site(self, a: int, ordinal: int) -> Site:
        act = self.mm.activations[a]
        name = act.name if ordinal == 0 else f"{act.name}#{ordinal + 1}"
        site = Site(len(self.sites), name, act.kind, type(act.module).__name__, act.channels_first)
        self.sites.append(site)
        self._site_of[(a, ordinal)] = site
        self.new_sites.append(site)
        return site

    def on_module_output(self, m: int, args: tuple, kwargs: dict, out) -> None:
        if not (self.recording and torch.is_grad_enabled()) or len(self._probes) >= 2 * MAX_PROBES_PER_STEP \
                or _graph_task_id() != -1:
            return
        with torch.no_grad():
            ins = tuple(self._probe_of(t, is_input=True) for t in _input_tensors(args, kwargs))
            self._trace.append((m, ins, self._probe_of(out)))

    def on_module_input(self, args: tuple, kwargs: dict) -> None:
        """Probe a traced module's inputs before it runs (later lookups reuse these verdicts)."""
        if not (self.recording and torch.is_grad_enabled()) or len(self._probes) >= 2 * MAX_PROBES_PER_STEP \
                or _graph_task_id() != -1:
            return
        with torch.no_grad():
            for t in _input_tensors(args, kwargs):
                self._probe_of(t, is_input=True)

    def on_pass_through(self, args: tuple, out) -> None:
        if self.recording and args and torch.is_grad_enabled():
            self._alias(args[0], out)

    def _alias(self, src, out) -> None:
        if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor):
            idx = self._cached(src, any_version=True)
            if idx is not None:
                self._seen[id(out)] = (weakref.ref(out), idx, out._version)

    def _cached(self, t: torch.Tensor, any_version: bool) -> int | None:
        """The probe of a tensor seen earlier in this forward.

        An input's probe is its verdict from before this module ran, even if the module then changed it in
        place (`any_version`); an output modified in place since it was probed needs a new probe.
        """
        hit = self._seen.get(id(t))
        if hit is not None and hit[0]() is t and (any_version or hit[2] == t._version):
            return hit[1]
        return None

    def _probe_of(self, value, is_input: bool = False) -> int:
        """Index of a finiteness probe for `value`; a tensor already probed this forward is reused.

        Probe i lives at positions 2i (min) and 2i+1 (max) of the step's probe vector.
        """
        if isinstance(value, torch.Tensor):
            idx = self._cached(value, any_version=is_input)
            if idx is not None:
                return idx
            tensors = [value]
        else:
            tensors = _tensors_in(value)
        probe = stats.finite_probe(tensors)
        if probe is None:
            return -1
        self._probes.extend(probe)
        idx = len(self._probes) // 2 - 1
        if isinstance(value, torch.Tensor):
            self._seen[id(value)] = (weakref.ref(value), idx, value._version)
        return idx

    # ---- optimizer: learning rates and the update ratio -------------------------------------------
    def on_optimizer_step(self, optimizer) -> None:
        """optimizer.step() is about to run: the step is not skipped, and these are its learning rates."""
        self.stepped = True
        self.lrs.extend(g.get("lr") for g in optimizer.param_groups)

    def snapshot(self, key: int, spec: RatioSpec) -> None:
        """Copy the weights before an update. The copy lives until `measure_update`, during
        optimizer.step() when there is an optimizer; `update_memory_mb` caps its size."""
        with torch.no_grad():
            self._snap[key] = [_dist.local(p).clone() for p in spec.params]

    def measure_update(self, key: int, spec: RatioSpec) -> None:
        before = self._snap.pop(key, None)
        if not before:
            return
        with torch.no_grad():
            self._measure_update(spec, before)

    def _measure_update(self, spec: RatioSpec, before: list[torch.Tensor]) -> None:
        after = [_dist.local(p) for p in spec.params]
        # Per parameter ||w|| and ||dw||; the host sums them per layer (and over ranks) and divides. The
        # difference overwrites the snapshot in place: a tensor of its own would double the ratio's memory,
        # past update_memory_mb (tests/test_update_memory.py).
        weight = stats.norms(before)
        torch._foreach_sub_(before, after)
        self._updates.append((spec, stats.norms(before), weight))

    # ---- step close-out ---------------------------------------------------------------------------
    def finish_step(self, step: int, loss, window_end: bool, weight_norm: bool) -> StepRow:
        """Turn this step's state into a StepRow and reset for the next step."""
        with torch.no_grad():
            return self._finish_step(step, loss, window_end, weight_norm)

    def _finish_step(self, step: int, loss, window_end: bool, weight_norm: bool) -> StepRow:
        row = RowParts(self.device)
        host_loss = None
        if isinstance(loss, torch.Tensor):
            row.scalars("loss", [loss])
        elif loss is not None:
            host_loss = float(loss)
        if self._grad is not None:
            plan, norms, layer_max, scale = self._grad
            row.per_param(f"gnorm@{plan.map}", norms, plan.shard_scale)
            if layer_max is not None:
                row.vector(f"gmax@{plan.map}", layer_max)
            if scale is not None:  # the host divides by it: grads are scaled until the scaler unscales them
                row.scalars("loss_scale", [scale])
        if weight_norm and self.mm.params:
            plan = self._full_plan
            params = [_dist.local(p) for p in self.mm.params] if self.sharded else self.mm.params
            row.per_param(f"wnorm@{plan.map}", stats.norms(params), plan.shard_scale)
        for spec, delta, weight in self._updates:
            row.per_param(f"udelta@{spec.map}", delta, spec.shard_scale)
            row.per_param(f"uweight@{spec.map}", weight, spec.shard_scale)
        if self._unit_max:
            pending = [(self.sites[i].unit_max, m) for i, m in self._unit_max.items()]
            torch._foreach_maximum_([t for t, _ in pending], [m for _, m in pending])
        row_sites: dict[str, list[tuple[int, int]]] = {}
        for site in (self.sites[i] for i in sorted(self._active_sites)):
            if site.pos is not None and site.numel:
                metric = "zero_fraction" if site.kind == "relu" else "saturation_fraction"
                row.scalars(f"{metric}@{site.index}", [site.pos])
                row_sites.setdefault(metric, []).append((site.index, site.numel))
            site.pos, site.numel = None, 0
        if window_end:
            for site in self.sites:
                if site.unit_max is not None:  # the host takes the fraction, after the max over ranks
                    row.vector(f"unit_max@{site.index}", site.unit_max)
                    row_sites.setdefault("dead_fraction", []).append((site.index, site.unit_max.numel()))
                    site.unit_max = None
        if self._carry is not None:
            row.scalars("grad_carry", [self._carry])
        if self._probes:
            row.scalars("probes", self._probes)
        lrs: list[float | None] = []
        for i, lr in enumerate(self.lrs):
            if isinstance(lr, torch.Tensor):  # a capturable/tensor lr stays on device until the flush
                row.scalars(f"lr@{i}", [lr.reshape(())])
                lrs.append(None)
            else:
                lrs.append(float("nan") if lr is None else float(lr))
        layout, flat = row.build()
        out = StepRow(step, time.time(), host_loss, lrs, None, layout, flat, row_sites, self._trace,
                      self.eval_forward)
        self._reset_step()
        return out

    def skip_step(self) -> None:
        """A step that is not recorded: drop whatever the optimizer hooks noted."""
        self._reset_step()

    def _reset_step(self) -> None:
        self._grad = None
        self._queued = False
        self._carry_checked = False
        self._carry: torch.Tensor | None = None  # the sentinel's .grad was non-zero before this step's backward
        self._active_sites: set[int] = set()
        self._seen: dict[int, tuple[weakref.ref, int]] = {}
        self._probes: list[torch.Tensor] = []
        self._trace: list[tuple[int, tuple[int, ...], int]] = []
        self._snap: dict[int, list[torch.Tensor]] = {}
        self._updates: list[tuple[RatioSpec, list[torch.Tensor], list[torch.Tensor]]] = []  # (spec, ||dw||, ||w||)
        self._unit_max: dict[int, torch.Tensor] = {}  # site -> this step's unit maxima, not yet in its window
        self.stepped = False
        self.eval_forward = False  # a grad-enabled forward ran with the model in eval() mode
        self.lrs: list = []
        self._calls = [0] * len(self.mm.activations)


def _input_tensors(args: tuple, kwargs: dict | None) -> list[torch.Tensor]:
    ins = [t for t in args if isinstance(t, torch.Tensor)]
    return ins + [t for t in kwargs.values() if isinstance(t, torch.Tensor)] if kwargs else ins


def _tensors_in(value, depth: int = 0) -> list[torch.Tensor]:
    """Tensors inside a module output: a tensor, or (nested) tuples, lists, dicts and ModelOutputs."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 3:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v, depth + 1)]
    return []
