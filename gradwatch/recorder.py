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

MAX_SITES_PER_MODULE = 4  # calls of one activation module per forward kept apart; later ones share the last
ABSENT = -1.0  # grad norm of a layer none of whose parameters has a .grad this step (norms are >= 0)
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
    """How the squared norms of the parameters that have a .grad become per-layer norms and the total."""

    pair_param: torch.Tensor  # index into the present params, one entry per (param, layer) pair
    pair_layer: torch.Tensor
    gather: bool  # pair i is not simply present param i (tied weights, or a layer without grads)
    absent: torch.Tensor | None  # bool per layer: none of its parameters has a .grad this step
    shard_weight: torch.Tensor | None  # sharded params: per present param, see Recorder.shard_weight_for


@dataclass
class RatioSpec:
    """The parameters whose update ratio one step measures, and the layers they belong to."""

    params: list[torch.Tensor]
    pair_param: torch.Tensor  # index into params, one entry per (param, layer) pair
    pair_layer: torch.Tensor
    absent: torch.Tensor  # bool per layer: not measured by this spec
    shard_weight: torch.Tensor | None = None  # sharded params: see Recorder.shard_weight_for


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
        # FSDP/DTensor: each rank measures its own shards; squares carry 1/(ranks holding each element), so
        # that summing them over the ranks at flush gives the full tensor's (see _dist.shard_weights).
        weights = _dist.shard_weights(mm.params, world)
        self.sharded = weights is not None
        self._shard_weight = None if weights is None else torch.tensor(weights, dtype=torch.float64,
                                                                        device=device)
        self.n_layers = len(mm.layers)
        self._plans: dict[tuple[int, ...], GradPlan] = {}
        self._full_plan = self._plan(tuple(range(len(mm.params))))
        self.recording = True
        self.detail = True  # a detail step: also grad max-abs and activation fractions (set by the Watcher)
        self.sites: list[Site] = []
        self._site_of: dict[tuple[int, int], Site] = {}
        self._tied = len(set(mm.param_of_pair)) < len(mm.param_of_pair)  # a parameter owned by two layers
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
        sq = stats.sq_norms(grads)
        if plan.shard_weight is not None:
            sq = sq * plan.shard_weight
        layer_norm = stats.per_layer(sq[plan.pair_param] if plan.gather else sq, plan.pair_layer,
                                     self.n_layers, "sum").sqrt_()
        # Without tied weights the total is the root of the layers' squares, taken on the host at flush.
        # (Sharded: the host merges the ranks' layer norms first, so the same holds.)
        total = sq.sum().sqrt() if self._tied else None
        layer_max = None
        if self.cfg.grad_maxabs and self.detail:
            mx = stats.maxabs(grads)
            layer_max = stats.per_layer(mx[plan.pair_param] if plan.gather else mx, plan.pair_layer,
                                        self.n_layers, "amax")
        scale = self._scale()
        if scale is not None:  # grads are scaled by the GradScaler until it unscales them
            inv = scale.double().reciprocal()
            layer_norm = layer_norm * inv
            total = total * inv if total is not None else None
            layer_max = layer_max * inv if layer_max is not None else None
        if plan.absent is not None:
            layer_norm = layer_norm.masked_fill(plan.absent, ABSENT)
            layer_max = layer_max.masked_fill(plan.absent, ABSENT) if layer_max is not None else None
        self._grad = (layer_norm, layer_max, total, scale)

    def shard_weight_for(self, params: list[int]) -> torch.Tensor | None:
        """Sharded runs: per parameter, the factor that makes the sum over ranks of its local shard's squared
        norm the full tensor's (see _dist.shard_weights); None otherwise."""
        return None if self._shard_weight is None else self._shard_weight[params]

    def _plan(self, present: tuple[int, ...]) -> GradPlan:
        """How to turn the squared norms of the `present` params into per-layer ones; one per pattern."""
        hit = self._plans.get(present)
        if hit is not None:
            return hit
        where = {p: i for i, p in enumerate(present)}
        pairs = [(where[p], ly) for p, ly in zip(self.mm.param_of_pair, self.mm.layer_of_pair) if p in where]
        covered = {ly for _, ly in pairs}
        dev = self.device
        hit = GradPlan(
            pair_param=torch.tensor([p for p, _ in pairs], dtype=torch.long, device=dev),
            pair_layer=torch.tensor([ly for _, ly in pairs], dtype=torch.long, device=dev),
            gather=[p for p, _ in pairs] != list(range(len(present))),
            absent=None if len(covered) == self.n_layers else torch.tensor(
                [ly not in covered for ly in range(self.n_layers)], dtype=torch.bool, device=dev),
            shard_weight=self.shard_weight_for(list(present)))
        self._plans[present] = hit
        return hit

    def _scale(self) -> torch.Tensor | None:
        s = self.scaler
        if s is None or not s.is_enabled() or getattr(s, "_scale", None) is None:
            return None
        return s._scale.reshape(()).float().clone()

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
            else:
                torch.maximum(site.unit_max, m, out=site.unit_max)
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
        delta_sq = stats.sq_norms(torch._foreach_sub(after, before))
        w_sq = stats.sq_norms(before)
        if self.sharded:
            delta_sq, w_sq = delta_sq * spec.shard_weight, w_sq * spec.shard_weight
        d = stats.per_layer(delta_sq[spec.pair_param], spec.pair_layer, self.n_layers, "sum")
        w = stats.per_layer(w_sq[spec.pair_param], spec.pair_layer, self.n_layers, "sum")
        if self.sharded:  # the host sums both parts over the ranks, then divides
            nan = float("nan")
            d, w = d.sqrt().masked_fill(spec.absent, nan), w.sqrt().masked_fill(spec.absent, nan)
            self._update_parts = (d, w) if self._update_parts is None else \
                (torch.fmax(self._update_parts[0], d), torch.fmax(self._update_parts[1], w))
            return
        ratio = (d / w).sqrt().masked_fill(spec.absent, float("nan"))
        # Two optimizers cover different layers; fmin keeps each one's numbers and ignores the NaNs.
        self._ratio = ratio if self._ratio is None else torch.fmin(self._ratio, ratio)

    # ---- step close-out ---------------------------------------------------------------------------
    def finish_step(self, step: int, loss, window_end: bool, weight_norm: bool) -> StepRow:
        """Turn this step's state into a StepRow and reset for the next step."""
        with torch.no_grad():
            return self._finish_step(step, loss, window_end, weight_norm)

    def _finish_step(self, step: int, loss, window_end: bool, weight_norm: bool) -> StepRow:
        layout: list[tuple[str, int]] = []
        parts: list[torch.Tensor] = []

        def put(name: str, t: torch.Tensor) -> None:
            # Mixed dtypes are fine: cat promotes them, and the row becomes float32 in one op at the end.
            if t.dim() != 1:
                t = t.reshape(-1)
            layout.append((name, t.numel()))
            parts.append(t if t.device == self.device else t.to(self.device, non_blocking=True))

        host_loss = None
        if isinstance(loss, torch.Tensor):
            put("loss", loss)
        elif loss is not None:
            host_loss = float(loss)
        if self._grad is not None:
            layer_norm, layer_max, total, scale = self._grad
            put("grad_norm", layer_norm)
            if total is not None:
                put("grad_total", total)
            if layer_max is not None:
                put("grad_maxabs", layer_max)
            if scale is not None:
                put("loss_scale", scale)
        if weight_norm and self.mm.params:
            plan = self._full_plan
            params = [_dist.local(p) for p in self.mm.params] if self.sharded else self.mm.params
            w_sq = stats.sq_norms(params)
            if plan.shard_weight is not None:
                w_sq = w_sq * plan.shard_weight
            w_sq = w_sq[plan.pair_param] if plan.gather else w_sq
            put("weight_norm", stats.per_layer(w_sq, plan.pair_layer, self.n_layers, "sum").sqrt_())
        if self._ratio is not None:
            put("update_ratio", self._ratio)
        if self._update_parts is not None:
            put("update_delta", self._update_parts[0])
            put("update_weight", self._update_parts[1])
        row_sites: dict[str, list[tuple[int, int]]] = {}
        for site in (self.sites[i] for i in sorted(self._active_sites)):
            if site.pos is not None and site.numel:
                metric = "zero_fraction" if site.kind == "relu" else "saturation_fraction"
                put(f"{metric}@{site.index}", site.pos)
                row_sites.setdefault(metric, []).append((site.index, site.numel))
            site.pos, site.numel = None, 0
        if window_end:
            for site in self.sites:
                if site.unit_max is not None:  # the host takes the fraction, after the max over ranks
                    put(f"unit_max@{site.index}", site.unit_max)
                    row_sites.setdefault("dead_fraction", []).append((site.index, site.unit_max.numel()))
                    site.unit_max = None
        if self._carry is not None:
            put("grad_carry", self._carry)
        if self._probes:
            put("probes", torch.stack(self._probes))
        lrs: list[float | None] = []
        for i, lr in enumerate(self.lrs):
            if isinstance(lr, torch.Tensor):  # a capturable/tensor lr stays on device until the flush
                put(f"lr@{i}", lr)
                lrs.append(None)
            else:
                lrs.append(float("nan") if lr is None else float(lr))
        flat = torch.cat(parts) if parts else None  # a copy: the row aliases nothing that changes later
        if flat is not None and flat.dtype != torch.float32:
            flat = flat.float()
        row = StepRow(step, time.time(), host_loss, lrs, None, layout, flat, row_sites, self._trace,
                      self.eval_forward)
        self._reset_step()
        return row

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
        self._ratio: torch.Tensor | None = None
        self._update_parts: tuple[torch.Tensor, torch.Tensor] | None = None  # sharded: this rank's ||dw||, ||w||
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
