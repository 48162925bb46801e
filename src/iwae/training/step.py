"""The training step as one program: the estimator's gradient and Adam's update, compiled with torch.compile.

One step on a minibatch x is

    g = grad_params loss(model, x, objective, estimator)        (iwae.core.objectives.loss: every bound and estimator,
                                                                 DReG's and PIWAE's path-gradient rescaling included)
    params, m, v = Adam(params, g, m, v, lr)                    (on a torch.optim.Adam's state: its fused kernel
                                                                 eagerly, ``adam_update`` compiled)
    bound_sum += sum_b bound(x_b)

written as one function that ``torch.compile(fullgraph=True)`` turns into a single program (forward, backward
and update; ``torch._dynamo.config.trace_autograd_ops`` lets it trace ``torch.autograd.grad``). The eager step
runs the same function uncompiled, so the two differ by float rounding only: the compiled program draws its
random numbers with torch's own generators (inductor's ``fallback_random``), in the same order as eager, and
the optimizer's state is that of a ``torch.optim.Adam``, so checkpoints are the same in both modes (the compiled
update also sets to zero the moments below the smallest normal float, which torch's keeps: ``adam_update``). The
learning rate is a tensor the step reads, so a schedule changes it without recompiling.

On a CPU, the compiled program calls its kernels from C++ (inductor's ``cpp_wrapper``) rather than from Python,
and dynamo checks only its guards on tensors and global state before each call (``_guards_to_check``).
On a GPU, ``mode="reduce-overhead"`` captures the compiled step in a CUDA graph: the optimizer is then
``capturable`` (its step counts live on the device), the learning rate is a device tensor updated in place,
and the random draws are graph-safe (torch's CUDA generator, whose state the checkpoints save).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.adam import adam

from iwae.core.objectives import Objective, loss
from iwae.models.latent import DeepLatentModel
from iwae.platform.compiled import Compiled


def make_adam(model: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Adam:
    """The Adam optimizer of a training run: ``capturable`` on a GPU, so that its update can live in a CUDA graph;
    ``fused`` on a CPU (one pass over each parameter's state, which the eager step uses)."""
    device = next(model.parameters()).device
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps, capturable=device.type == "cuda",
                            fused=device.type == "cpu" or None)


class TrainStep:
    """``step(x)`` takes one Adam step on the minibatch ``x`` (B, D) and adds the batch's summed bound to
    ``step.bound_sum`` (a float64 device tensor); nothing in it waits for the host. For a model stacking
    several seeds (``iwae.training.stacked``), ``x`` is (S, B, D) and ``bound_sum`` has shape ``bound_shape`` = (S,).

    Args:
      model: the model whose parameters ``optimizer`` updates.
      optimizer: a ``torch.optim.Adam`` over ``model.parameters()`` in one group (its state dict is what
        checkpoints save; ``make_adam`` makes one).
      objective, estimator: as for ``objectives.loss``; the gradient is that of the per-batch sum
        (``reduction``) of the bound.
      compile: False for eager; True to compile with inductor; or another ``torch.compile`` backend (its
        name or callable). A step that fails to compile warns in one line and runs eagerly.
      all_reduce: for data-parallel training (``iwae.platform.distributed``), a function that sums tensors over the
        ranks
        (``distributed.all_reduce_sum``): applied to the gradients of this rank's rows and their summed bound, so
        that every rank takes the step of the whole global batch; inside the compiled program.
      what: the step's name in the message that reports its compile time.
      inductor_options: inductor settings that replace the step's own (e.g. ``{"cpp_wrapper": False}``: the
        program's kernels called from Python, where torch's profiler records each matrix product).
    """

    def __init__(self, model: DeepLatentModel, optimizer: torch.optim.Adam, objective: Objective, estimator: str,
                 *, compile: bool | str | Callable[..., object] = False, reduction: str = "sum",
                 bound_shape: tuple[int, ...] = (), all_reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
                 what: str = "the training step", inductor_options: dict[str, object] | None = None) -> None:
        objective.check_estimator(estimator)
        if len(optimizer.param_groups) != 1:
            raise ValueError("TrainStep needs an Adam optimizer with one parameter group")
        self.model, self.optimizer, self.objective, self.estimator = model, optimizer, objective, estimator
        self.reduction, self.all_reduce = reduction, all_reduce
        self.params = list(optimizer.param_groups[0]["params"])
        device = self.params[0].device
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), dtype=torch.float64, device=device)
        self.bound_sum = torch.zeros(bound_shape, dtype=torch.float64, device=device)
        group, state = optimizer.param_groups[0], optimizer.state
        self._hyper = {"beta1": group["betas"][0], "beta2": group["betas"][1], "eps": group["eps"],
                       "capturable": group["capturable"]}  # read once: the compiled step guards on no dict
        self._fused = bool(group["fused"])
        for p in self.params:  # Adam's state as its own first step would create it
            if not state[p]:
                step = torch.zeros((), device=p.device) if group["capturable"] else torch.tensor(0.0)
                state[p].update(step=step, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        self._run: Callable[[Tensor], None] = self._step
        if compile:
            backend = "inductor" if compile is True else compile
            if device.type == "cuda":  # tensors a CUDA graph updates in place keep their addresses
                for t in [self.lr, self.bound_sum, *(v for p in self.params for v in state[p].values())]:
                    torch._dynamo.mark_static_address(t)
            # eager's random draws; on a GPU, the step as a CUDA graph; on a CPU, the program's calls of its kernels
            # in C++ (``cpp_wrapper``: a step of small kernels must not pay Python's call overhead per kernel);
            # autograd.grad traced into the graph
            options = {"fallback_random": True, "triton.cudagraphs": device.type == "cuda",
                       "cpp_wrapper": device.type == "cpu", **_guards_to_check(device), **(inductor_options or {})}
            self._run = Compiled(self._step, what, backend=backend, options=options,
                                 dynamo_config={"trace_autograd_ops": True})

    @property
    def compiled(self) -> bool:
        """Whether the step runs compiled (False after a failed compilation fell back to eager)."""
        return isinstance(self._run, Compiled) and self._run.compiled

    @property
    def compile_seconds(self) -> float | None:
        """Seconds the compilation took (None before the first step, or when not compiled)."""
        return self._run.seconds if isinstance(self._run, Compiled) else None

    def set_lr(self, lr: float) -> None:
        """Use learning rate ``lr`` from the next step on (in place: no recompilation, no new CUDA graph)."""
        self.lr.fill_(lr)
        self.optimizer.param_groups[0]["lr"] = lr

    def __call__(self, x: Tensor) -> None:
        self._run(x)

    def _step(self, x: Tensor) -> None:
        out = loss(self.model, x, self.objective, estimator=self.estimator, reduction=self.reduction)
        grads = list(torch.autograd.grad(out.loss, self.params))
        bound = out.bound.detach().sum(-1)
        if self.all_reduce is not None:  # the sums over every rank's rows: those of the global batch
            *grads, bound = self.all_reduce([*grads, bound])
        with torch.no_grad():
            self._adam(grads)
            self.bound_sum += bound

    def _adam(self, grads: list[Tensor]) -> None:
        """torch.optim.Adam's update of the parameters, on its own state: eagerly, the optimizer's own (fused)
        kernel; compiled, ``adam_update``, which reads the learning rate as a tensor (so the schedule needs no
        recompilation) and which inductor fuses into one pass per parameter."""
        moments = [self.optimizer.state[p] for p in self.params]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in moments], [s["exp_avg_sq"] for s in moments]
        steps = [s["step"] for s in moments]
        if torch.compiler.is_compiling():
            adam_update(self.params, grads, exp_avgs, exp_avg_sqs, steps, self.lr, self._hyper["beta1"],
                        self._hyper["beta2"], self._hyper["eps"])
        else:
            adam(self.params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                 lr=self.optimizer.param_groups[0]["lr"], weight_decay=0.0, maximize=False, fused=self._fused,
                 **self._hyper)


def _guards_to_check(device: torch.device) -> dict[str, object]:
    """The compiled step's guards that dynamo checks before each call, as a ``torch.compile`` option: on a CPU,
    those on tensors (shapes, dtypes, strides: a minibatch of another shape compiles anew) and on global state
    (grad mode and the like) only. Everything else the step reads (its model's modules, objective, estimator
    and Adam's settings) is fixed for the step's life, so it is not checked again before each call. Not on a
    GPU, where CUDA graphs replay without guards, nor where torch lacks the filter."""
    keep = getattr(torch.compiler, "keep_portable_guards_unsafe", None)
    return {"guard_filter_fn": keep} if device.type == "cpu" and keep is not None else {}


def adam_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                steps: list[Tensor], lr: Tensor, beta1: float, beta2: float, eps: float) -> None:
    """One Adam step (Kingma & Ba 2015, Algorithm 1, as torch.optim.Adam computes it), in place:

        t += 1;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Written for the compiled step: every parameter's two bias-correction factors are computed once and stacked
    into one small tensor that the per-element kernels read. torch's own single-tensor update leaves them as
    scalar expressions, which inductor recomputes (two ``pow`` and a ``sqrt``) for every vector of every
    parameter: per-parameter constants are computed once per step, never per element.

    A moment that falls below the smallest normal float (``torch.finfo(dtype).tiny``, 1.2e-38 in float32) is set
    to zero. A weight whose gradient stays zero (that of a pixel that stays black in minibatch after minibatch)
    has its first moment decay by beta1 at every step, into the denormal floats, which a CPU computes many times
    more slowly than normal ones, at every step from then on. The update such a moment would make is below the
    rounding of every parameter that is not itself within a few powers of ten of the smallest float.

    The bias corrections are computed in each parameter's precision (the step counts are float32 tensors, as
    torch.optim.Adam keeps them; ``lr`` is rounded to it from any precision), and a 0-d parameter and its moments
    are updated through 1-d views: torch.compile (2.13) drops an in-place write to a 0-d float64 tensor made under
    ``torch.no_grad``.
    """
    for step in steps:
        step += 1
    counts = [step.to(param.dtype) for step, param in zip(steps, params, strict=True)]
    step_sizes = torch.stack([lr.to(t.dtype) / (1 - beta1**t) for t in counts])
    correction_sqrts = torch.stack([(1 - beta2**t).sqrt() for t in counts])
    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        param, grad, exp_avg, exp_avg_sq = (t.view(1) if t.dim() == 0 else t for t in tensors)
        tiny = torch.finfo(param.dtype).tiny
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg.masked_fill_(exp_avg.abs() < tiny, 0.0)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg_sq.masked_fill_(exp_avg_sq < tiny, 0.0)
        param.sub_(step_sizes[i] * exp_avg / (exp_avg_sq.sqrt() / correction_sqrts[i] + eps))
