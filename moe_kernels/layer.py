"""The MoE layer: router + experts + aux losses, as an ``nn.Module``.

``MoE(hidden_size=..., intermediate_size=..., num_experts=..., top_k=..., router=...)``
takes ``[..., H]`` and returns ``[..., H]``. After each forward, ``layer.losses`` holds
the router's unweighted aux losses (and ``z_loss``), and ``layer.aux_loss`` their sum
weighted by the config's coefficients, ready to add to the training loss.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_bool, check_float, check_int, check_positive_float
from .activations import Activation
from .backends import BACKEND_NAMES, get_backend, unavailable_reason
from .functional import check_inputs, empty_output
from .options import KernelOptions
from .params import expert_params
from .quant import module_quantized_params, quantize_module_
from .routing import Routing, router_jitter, router_name, weighted_aux_loss, z_loss

__all__ = ["MoE", "MoEConfig", "router_options", "StepState"]


class StepState:
    """What a layer's last forward produced: ``losses``, ``aux_loss`` and ``expert_load``.

    Kept apart from the module's copyable state: these tensors belong to one step's
    autograd graph (non-leaf tensors refuse ``copy.deepcopy``, and a pickled or copied
    model must not carry a graph), so copying or pickling a layer gives a fresh, empty
    state. A forward clears it first, so after a forward that raised nothing of the
    previous step reads as current."""

    __slots__ = ("losses", "aux_loss", "_load", "_load_routing")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.losses: dict[str, torch.Tensor] = {}
        self.aux_loss: torch.Tensor | None = None
        self._load: torch.Tensor | None = None
        self._load_routing = None

    @property
    def expert_load(self) -> torch.Tensor | None:
        """The step's load, counted from its routing on first read (a scatter-add on the
        routing's device, no host sync): a forward that nobody asks pays nothing."""
        if self._load is None and self._load_routing is not None:
            self._load = self._load_routing.expert_load().detach()
            self._load_routing = None
        return self._load

    @expert_load.setter
    def expert_load(self, value: torch.Tensor | None) -> None:
        self._load, self._load_routing = value, None

    def load_from(self, routing) -> None:
        """Count the load from ``routing`` when it is first read."""
        self._load, self._load_routing = None, routing

    def __deepcopy__(self, memo) -> "StepState":
        return StepState()

    def __reduce__(self):
        return (StepState, ())


class StepOutputs:
    """Mixin: ``losses``, ``aux_loss`` and ``last_expert_load`` read from (and write to)
    the module's :class:`StepState`."""

    def _step_state(self) -> StepState:
        state = self.__dict__.get("_step")
        if state is None:
            state = StepState()
            object.__setattr__(self, "_step", state)
        return state

    @property
    def losses(self) -> dict[str, torch.Tensor]:
        """The last forward's unweighted aux losses (``{}`` before any, or after a failed one)."""
        return self._step_state().losses

    @losses.setter
    def losses(self, value) -> None:
        self._step_state().losses = value

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The last forward's weighted aux loss, to add to the training loss (``None``
        before any forward, or after one that raised)."""
        return self._step_state().aux_loss

    @aux_loss.setter
    def aux_loss(self, value) -> None:
        self._step_state().aux_loss = value

    @property
    def last_expert_load(self) -> torch.Tensor | None:
        """Valid slots (token assignments, dropped ones excluded) per expert in the last
        forward: an int [E] tensor on the layer's device, detached, read without a host
        sync. Under expert parallelism: this rank's tokens only (sum over the group for the
        global load; :func:`moe_kernels.balance.update_selection_bias` does)."""
        return self._step_state().expert_load


class _RouterDefault:
    """The default of a router-specific field: resolved per router by ``MoEConfig``."""

    def __repr__(self) -> str:
        return "<router default>"


ROUTER_DEFAULT = _RouterDefault()
_TOPK_ROUTERS = ("softmax_topk", "grouped_sigmoid_topk", "noisy_topk")
_CAPACITY_ROUTERS = ("switch", "expert_choice")


@dataclass
class MoEConfig:
    """Everything that defines a MoE layer.

    Router options: ``top_k`` (top-k routers, default 2; Switch takes only 1),
    ``renormalize`` (softmax top-k and grouped sigmoid), ``n_group``, ``topk_group``,
    ``routed_scaling_factor`` and the per-expert selection bias buffer (grouped sigmoid),
    ``capacity_factor`` (Switch: default 1.0, ``None`` drops nothing; Expert Choice:
    default 1.0), ``jitter_eps`` (Switch: multiplies the router input by U(1-eps, 1+eps)
    while training), ``noise`` (noisy top-k).

    Loss coefficients: ``aux_loss_coef`` weighs the router's balancing losses
    (``load_balancing``; ``importance`` and ``load`` for noisy top-k), ``z_loss_coef``
    the router z-loss (both finite and ``>= 0``).

    ``top_k`` and ``capacity_factor`` default per router (``None`` where the router has no
    such option); setting one the router ignores (``router="switch", top_k=2``,
    ``router="softmax_topk", capacity_factor=1.25``) is a ``ValueError`` rather than an
    option that silently does nothing.

    Kernel options (:mod:`moe_kernels.options`; ``None`` = the process default):
    ``combine`` (``"auto"``/``"fused"``/``"separate"``), ``recompute_h``, ``gemm_config`` (a mapping of
    tile fields to pin), ``autotune``. ``router="dense"`` is accepted for
    ``"dense_softmax"`` and stored under that name."""

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int | None = ROUTER_DEFAULT
    router: str = "softmax_topk"
    activation: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0
    bias: bool = False
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    capacity_factor: float | None = ROUTER_DEFAULT
    jitter_eps: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    backend: str = "auto"
    combine: str | None = None
    recompute_h: bool | None = None
    gemm_config: dict | None = None
    autotune: bool | None = None

    def __post_init__(self) -> None:
        check_int("hidden_size", self.hidden_size, low=1)
        check_int("intermediate_size", self.intermediate_size, low=1)
        check_int("num_experts", self.num_experts, low=1)
        self.router = router_name(self.router)
        self._resolve_router_defaults()
        self.kernel_options()  # validates the kernel option fields
        if self.router in _TOPK_ROUTERS:
            check_int("top_k", self.top_k, low=1, high=self.num_experts)
        Activation(self.activation, self.alpha, self.limit)
        check_bool("renormalize", self.renormalize)
        check_bool("bias", self.bias)
        check_float("aux_loss_coef", self.aux_loss_coef, low=0.0)
        check_float("z_loss_coef", self.z_loss_coef, low=0.0)
        check_float("jitter_eps", self.jitter_eps)
        check_float("routed_scaling_factor", self.routed_scaling_factor, low=0.0, low_open=True)
        if self.router == "expert_choice" or (self.router == "switch" and self.capacity_factor is not None):
            check_positive_float("capacity_factor", self.capacity_factor)
        if not (0.0 <= self.jitter_eps < 1.0):
            raise ValueError(f"jitter_eps: expected 0 <= jitter_eps < 1, got {self.jitter_eps}")
        if self.backend not in ("auto", *BACKEND_NAMES):
            raise ValueError(f"backend: expected one of {['auto', *BACKEND_NAMES]}, got {self.backend!r}")
        if self.router == "grouped_sigmoid_topk":
            check_int("n_group", self.n_group, low=1)
            if self.num_experts % self.n_group:
                raise ValueError(f"n_group: expected a divisor of num_experts={self.num_experts}, got {self.n_group}")
            check_int("topk_group", self.topk_group, low=1, high=self.n_group)

    def _resolve_router_defaults(self) -> None:
        r = self.router
        if self.top_k is ROUTER_DEFAULT:
            self.top_k = 2 if r in _TOPK_ROUTERS else 1 if r == "switch" else None
        elif r == "switch" and self.top_k != 1 and self.top_k is not None:
            raise ValueError(f"top_k: router 'switch' routes each token to 1 expert; got top_k={self.top_k!r} "
                             f"(use router='softmax_topk' for k > 1, or leave top_k unset)")
        elif r not in _TOPK_ROUTERS and r != "switch" and self.top_k is not None:
            raise ValueError(f"top_k: not an option of router {r!r} (it is ignored there); got top_k={self.top_k!r}, "
                             f"leave it unset")
        if self.capacity_factor is ROUTER_DEFAULT:
            self.capacity_factor = 1.0 if r in _CAPACITY_ROUTERS else None
        elif r not in _CAPACITY_ROUTERS and self.capacity_factor is not None:
            raise ValueError(f"capacity_factor: not an option of router {r!r} (only 'switch' and 'expert_choice' "
                             f"have a capacity); got capacity_factor={self.capacity_factor!r}, leave it unset")

    def kernel_options(self) -> KernelOptions:
        """The config's kernel option fields as :class:`~moe_kernels.options.KernelOptions`."""
        return KernelOptions(combine=self.combine, recompute_h=self.recompute_h, gemm_config=self.gemm_config,
                             autotune=self.autotune)


def router_options(config: MoEConfig, selection_bias: torch.Tensor | None = None) -> dict:
    """The keyword options that ``config.router`` takes from ``config`` (noisy top-k's
    noise logits come from the layer, not from here)."""
    c = config
    if c.router == "softmax_topk":
        return {"top_k": c.top_k, "renormalize": c.renormalize}
    if c.router == "grouped_sigmoid_topk":
        return {"top_k": c.top_k, "bias": selection_bias, "n_group": c.n_group, "topk_group": c.topk_group,
                "routed_scaling_factor": c.routed_scaling_factor, "renormalize": c.renormalize}
    if c.router in ("switch", "expert_choice"):
        return {"capacity_factor": c.capacity_factor}
    if c.router == "noisy_topk":
        return {"top_k": c.top_k}
    return {}


def add_parameters(module: nn.Module, config: MoEConfig, activation: Activation, num_local_experts: int,
                   *, device=None, dtype=None) -> None:
    """Create a MoE layer's parameters on ``module``: the router (replicated: all
    ``num_experts`` rows), noisy top-k's noise weights, grouped sigmoid's selection-bias
    buffer, and the weights of ``num_local_experts`` experts (all of them, or one
    rank's share under expert parallelism). Values are set by ``reset_parameters``."""
    c = config
    factory = {"device": device, "dtype": dtype}
    e, el, h, i, n = c.num_experts, num_local_experts, c.hidden_size, c.intermediate_size, activation.width_factor
    module.router_weight = nn.Parameter(torch.empty(e, h, **factory))
    module.noise_weight = nn.Parameter(torch.zeros(e, h, **factory)) if c.router == "noisy_topk" else None
    if c.router == "grouped_sigmoid_topk":
        module.register_buffer("selection_bias", torch.zeros(e, device=device, dtype=torch.float32))
    else:
        module.selection_bias = None
    module.w13 = nn.Parameter(torch.empty(el, n * i, h, **factory))
    module.w2 = nn.Parameter(torch.empty(el, h, i, **factory))
    module.b13 = nn.Parameter(torch.zeros(el, n * i, **factory)) if c.bias else None
    module.b2 = nn.Parameter(torch.zeros(el, h, **factory)) if c.bias else None
    warn_if_unavailable(c.backend)


def warn_if_unavailable(backend: str) -> None:
    """Warn at construction when ``backend`` can run on no device of this process (the
    CPU, and each CUDA device if any): the first forward would raise with the same
    reason. A warning, not an error: the device is only known at the forward."""
    if backend == "auto":
        return
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    reasons = [unavailable_reason(backend, d) for d in devices]
    if all(r is not None for r in reasons):
        warnings.warn(f"backend={backend!r} is not available on any device of this process, so the first forward "
                      f"will raise: {'; '.join(f'{d}: {r}' for d, r in zip(devices, reasons))}", stacklevel=4)


class MoE(StepOutputs, nn.Module):
    """A Mixture-of-Experts layer with a fused expert computation.

    Parameters: ``router_weight`` [E, H] (the router's linear map), ``w13`` [E, n*I, H]
    (gate and up rows; ``n = 2`` gated, 1 plain), ``w2`` [E, H, I], optional ``b13``
    [E, n*I] and ``b2`` [E, H]; ``noise_weight`` [E, H] for noisy top-k; buffer
    ``selection_bias`` [E] for grouped sigmoid (DeepSeek-V3's
    ``e_score_correction_bias``, updated by the user's balancing rule, never by
    gradients).

    Example::

        layer = MoE(hidden_size=512, intermediate_size=1024, num_experts=8, top_k=2)
        y = layer(x)                      # x: [batch, seq, 512]
        loss = task_loss(y) + layer.aux_loss
    """

    def __init__(self, config: MoEConfig | None = None, *, device=None, dtype=None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = MoEConfig(**kwargs)
        elif kwargs:
            raise ValueError(f"pass either config or keyword options, not both (got {sorted(kwargs)})")
        self.config = config
        c = config
        act = Activation(c.activation, c.alpha, c.limit)
        self.activation = act
        add_parameters(self, c, act, c.num_experts, device=device, dtype=dtype)
        self._step_state()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        h, i = self.config.hidden_size, self.config.intermediate_size
        nn.init.normal_(self.router_weight, std=1.0 / math.sqrt(h))
        nn.init.normal_(self.w13, std=1.0 / math.sqrt(h))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(i))
        for b in (self.b13, self.b2):
            if b is not None:
                nn.init.zeros_(b)

    def quantize_(self, format: str = "fp8_block", **kwargs) -> "MoE":
        """Quantize the expert weights in place for inference (:func:`moe_kernels.quantize_experts`
        formats and options): ``w13``/``w2`` become buffers of the quantized storage with
        ``w13_scale``/``w2_scale``; the layer then refuses inputs that need gradients."""
        quantize_module_(self, format, **kwargs)
        return self

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={c.hidden_size}, intermediate_size={c.intermediate_size}, num_experts={c.num_experts}, "
                f"router={c.router!r}, top_k={c.top_k}, activation={c.activation!r}, backend={c.backend!r}")

    def router_options(self) -> dict:
        """The keyword options of the configured router (:func:`moe_kernels.routing.route`)."""
        return router_options(self.config, self.selection_bias)

    def route(self, x2d: torch.Tensor, backend=None) -> Routing:
        """Router logits and routing for ``x2d`` [T, H] (training-mode noise included);
        ``backend``: the resolved backend object (default: the config's for ``x2d``)."""
        c = self.config
        if not isinstance(x2d, torch.Tensor) or x2d.dim() != 2 or x2d.shape[1] != c.hidden_size:
            raise ValueError(f"x2d: expected a [T, hidden_size={c.hidden_size}] tensor, got "
                             f"{tuple(x2d.shape) if isinstance(x2d, torch.Tensor) else type(x2d).__name__}")
        router_in = router_jitter(x2d, c.jitter_eps, self.training) if c.router == "switch" else x2d
        logits = router_in @ self.router_weight.t()
        backend = backend or get_backend(c.backend, x2d.device)
        if c.router == "noisy_topk":
            from .routing import noisy_topk
            routing = noisy_topk(logits, c.top_k, noise_logits=x2d @ self.noise_weight.t(), training=self.training)
        else:
            routing = backend.route(logits, c.router, self.router_options())
        if c.z_loss_coef:
            routing.losses["z_loss"] = z_loss(logits)
        return routing

    def _expert_params(self, dtype: torch.dtype):
        """The expert weights in the compute dtype: under ``torch.autocast`` the float32
        master weights are cast (differentiably) to the autocast dtype, as autocast does
        for ``nn.Linear``; otherwise they are used as they are."""
        quantized = module_quantized_params(self)  # after quantize_(): the quantized weights
        if quantized is not None:
            return quantized
        weights = [self.w13, self.w2, self.b13, self.b2]
        if self.w13.dtype != dtype:
            weights = [None if w is None else w.to(dtype) for w in weights]
        return expert_params(*weights, activation=self.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        step = self._step_state()
        step.clear()  # a forward that raises leaves nothing of the previous step readable
        if x.shape[-1] != c.hidden_size:
            raise ValueError(f"x: expected last dimension hidden_size={c.hidden_size}, got shape {tuple(x.shape)}")
        x2d = x.reshape(-1, c.hidden_size).contiguous()
        dtype = self.w13.dtype
        if torch.is_autocast_enabled(x2d.device.type) and x2d.dtype.is_floating_point:
            dtype = torch.get_autocast_dtype(x2d.device.type)
            x2d = x2d.to(dtype)
        params = self._expert_params(dtype)
        check_inputs(x2d, params)
        backend = get_backend(c.backend, x2d.device)
        routing = self.route(x2d, backend)
        if x2d.shape[0] == 0:
            out = empty_output(x2d, params, routing)  # empty, but connected for autograd
            step.expert_load = torch.zeros(c.num_experts, dtype=torch.int32, device=x2d.device)
        else:
            # run: plan and experts, or a backend's path that needs no plan (torch on the CPU).
            out = backend.run(x2d, routing, params, c.kernel_options())
            step.load_from(routing)
        step.losses = routing.losses
        step.aux_loss = weighted_aux_loss(routing.losses, c.aux_loss_coef, c.z_loss_coef, x2d)
        return out.reshape(x.shape)
