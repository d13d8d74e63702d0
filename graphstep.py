"""The training step as one function of device tensors, with no host work inside: what a CUDA graph captures.

An eager step launches each of its kernels from Python (about 900 for the paper's network) and
reads values back to the host now and then; at the paper's batch of 32 a GPU then spends most
of the step waiting for the launches (docs/speed.md). `GraphedStep` computes exactly what
`Trainer.train_step` computes (forward under autocast, DepthLoss, the gradients, Adam with the
triangular2 CyclicLR's lr and beta1, the skip of a non-finite loss, the --ema average), but:

  * gradients come from torch.func.grad_and_value over the network's own tensors (so the step
    is a pure function that torch.compile traces whole, and a CUDA graph captures whole);
  * the schedule's lr and beta1 are computed on the device from the count of steps, never
    copied from the host;
  * a non-finite loss leaves weights, Adam's moments and Adam's own step count untouched through
    torch.where, with no branch on a value; the step still counts, as in Trainer.train_step;
  * the batch is read from static input buffers (`rgb`, `depth`), which the caller fills.

Adam's state and the schedule's position live here while it runs; `write_back` puts them into
the torch.optim.Adam and CyclicLR that checkpoints save, and `GraphedStep(...)` reads them from
those on construction, so --resume works across both kinds of step. fp16 (whose GradScaler
changes its scale on the host) is not supported.
"""
import warnings

import torch
from torch.func import functional_call, grad_and_value

from hardware import autocast


class GraphedStep:
    """One training step of `model` as tensors in, tensors out; see the module's docstring.

    model: the DepthNet (its parameters and buffers are updated in place); loss_fn: DepthLoss;
    optimizer, scheduler: the Trainer's Adam and CyclicLR, whose hyperparameters and state it
    takes; ema: the --ema copy or None, with its decay; batch_shape: (B, H, W) of the static buffers.
    """

    def __init__(self, model, loss_fn, optimizer, scheduler, amp_dtype, channels_last, batch_shape, ema=None,
                 ema_decay=0.0):
        if amp_dtype == torch.float16:
            raise ValueError("the graphed step runs in fp32 or bf16; fp16 needs GradScaler's host-side scale")
        self.model, self.loss_fn, self.amp_dtype = model, loss_fn, amp_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        device = next(model.parameters()).device
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.buffers = dict(model.named_buffers())
        group = optimizer.param_groups[0]
        self.weight_decay, self.eps, self.beta2 = group["weight_decay"], group["eps"], group["betas"][1]
        # AdamW shrinks the weights by lr·decay apart from the moments; Adam adds decay·p to the gradient.
        self.decoupled = isinstance(optimizer, torch.optim.AdamW)
        self.schedule = cyclic_schedule_of(scheduler)
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        # Steps so far (the position in the schedule and the --ema warm-up), and those whose update was applied
        # (Adam's bias correction). In float64, as CyclicLR computes on the host: a 0-d tensor does not promote
        # the float32 tensors it scales.
        self.steps = torch.zeros((), dtype=torch.float64, device=device)
        self.applied = torch.zeros((), dtype=torch.float64, device=device)
        self.read_state(optimizer, scheduler)
        self.ema, self.ema_decay = ema, ema_decay
        self.ema_pairs = None
        if ema is not None:
            trained = dict(model.state_dict(keep_vars=True))
            self.ema_pairs = [(a, trained[k]) for k, a in ema.state_dict(keep_vars=True).items()
                              if a.is_floating_point()]
        b, h, w = batch_shape
        dtype = next(iter(self.params.values())).dtype
        self.rgb = torch.zeros(b, 3, h, w, device=device, dtype=dtype)
        self.depth = torch.zeros(b, 1, h, w, device=device, dtype=dtype)
        # Capture needs a few eager steps first (lazy initialisation, cudnn's choice of algorithms).
        self.graph, self.graph_out, self.warmup_left = None, None, 3

    def replay(self, rgb, depth):
        """`step` on a batch through the CUDA graph: the batch copied into the static buffers, the first steps
        run eagerly on a side stream (as capture needs), the next one captured, every later one replayed.
        Returns step's outputs; the loss is a copy, since the next replay overwrites the graph's outputs."""
        self.rgb.copy_(rgb, non_blocking=True)
        self.depth.copy_(depth, non_blocking=True)
        device = self.rgb.device
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                loss, parts, pred = self.step(self.rgb, self.depth)
            torch.cuda.current_stream(device).wait_stream(side)
            return loss, parts, pred
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.graph_out = self.step(self.rgb, self.depth)
        self.graph.replay()
        loss, parts, pred = self.graph_out
        return loss.clone(), parts, pred

    # ---------------------------------------------------------------- the step
    def step(self, rgb, depth):
        """One step on (rgb, depth); returns (loss, parts of the loss, detached prediction), all on the device.

        A pure function of tensors: no value is read back, no branch depends on one.
        """
        lr, beta1 = self.schedule.at(self.steps)
        grads, (loss, (parts, pred)) = self._gradients(rgb, depth)
        ok = torch.isfinite(loss)
        step = self.applied + 1
        with torch.no_grad():
            for name, p in self.params.items():
                coupled = self.weight_decay and not self.decoupled
                g = grads[name] + self.weight_decay * p if coupled else grads[name]
                m = torch.where(ok, self.exp_avg[name] * beta1 + g * (1 - beta1), self.exp_avg[name])
                v = torch.where(ok, self.exp_avg_sq[name] * self.beta2 + g * g * (1 - self.beta2),
                                self.exp_avg_sq[name])
                self.exp_avg[name].copy_(m)
                self.exp_avg_sq[name].copy_(v)
                bias1 = 1 - beta1 ** step
                bias2 = 1 - self.beta2 ** step
                update = (lr / bias1) * m / (v.sqrt() / bias2.sqrt() + self.eps)
                kept = p * (1 - lr * self.weight_decay) if self.decoupled else p
                p.copy_(torch.where(ok, kept - update, p))
            if self.ema_pairs is not None:
                # min(DECAY, (1 + n) / (10 + n)) after n steps, as Trainer._update_weight_average.
                weight = 1 - torch.clamp((1 + self.steps) / (10 + self.steps), max=self.ema_decay)
                for averaged, trained in self.ema_pairs:
                    averaged.copy_(averaged + (trained - averaged) * weight)
            self.applied.copy_(self.applied + ok.to(self.applied.dtype))
            self.steps.copy_(self.steps + 1)
        return loss.detach(), parts, pred.detach()

    def _gradients(self, rgb, depth):
        """(gradients of the loss by trainable parameter, (loss, (parts, prediction))); BatchNorm's running
        statistics are updated in place, as in an eager forward pass."""
        rgb = rgb.contiguous(memory_format=self.memory_format)

        def loss_of(params, buffers):
            with autocast(rgb.device.type, self.amp_dtype):
                pred = functional_call(self.model, (params, buffers), (rgb,))
            loss, parts = self.loss_fn(pred, depth)
            return loss, (parts, pred)

        # The buffers are an argument, not captured: the transform then lets BatchNorm update them in place.
        return grad_and_value(loss_of, has_aux=True)(self.params, self.buffers)

    # ---------------------------------------------------------------- state
    def read_state(self, optimizer, scheduler):
        """Take Adam's moments and the schedule's position from `optimizer` and `scheduler` (a resumed run)."""
        by_param = {id(p): n for n, p in self.params.items()}
        for p, state in optimizer.state.items():
            name = by_param.get(id(p))
            if name is not None and "exp_avg" in state:
                self.exp_avg[name].copy_(state["exp_avg"])
                self.exp_avg_sq[name].copy_(state["exp_avg_sq"])
                self.applied.fill_(float(state["step"]))
        self.steps.fill_(float(scheduler.last_epoch))

    def write_back(self, optimizer, scheduler):
        """Put Adam's moments and step counts and the schedule's position into `optimizer` and `scheduler`,
        so that a checkpoint saves, and an eager step continues, exactly this state (one host sync)."""
        steps, applied = (int(v) for v in torch.stack([self.steps, self.applied]).tolist())
        for name, p in self.params.items():
            state = optimizer.state[p]
            state["exp_avg"] = self.exp_avg[name].clone()
            state["exp_avg_sq"] = self.exp_avg_sq[name].clone()
            state["step"] = torch.tensor(float(applied), device=p.device)
        scheduler.last_epoch = steps - 1
        # The graphed step updates the weights without optimizer.step(), so PyTorch would warn that the
        # schedule skips its first value; here it is only being positioned, and skips nothing.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()  # sets the param groups' lr and beta1 to the schedule's at this position


class CyclicSchedule:
    """torch.optim.lr_scheduler.CyclicLR's triangular2 lr and momentum (Adam's beta1) as tensor functions of
    the number of steps, so the step computes them on the device."""

    def __init__(self, base_lr, max_lr, up, down, base_momentum, max_momentum, cycle_momentum):
        self.base_lr, self.max_lr, self.total, self.ratio = base_lr, max_lr, float(up + down), up / (up + down)
        self.base_m, self.max_m, self.cycle_momentum = base_momentum, max_momentum, cycle_momentum

    def at(self, steps):
        """(lr, beta1) that CyclicLR gives after `steps` scheduler steps (a 0-d float tensor)."""
        cycle = torch.floor(1 + steps / self.total)
        x = 1.0 + steps / self.total - cycle
        scale_factor = torch.where(x <= self.ratio, x / self.ratio, (x - 1) / (self.ratio - 1))
        amplitude = 1 / (2 ** (cycle - 1))  # triangular2: the amplitude halves every cycle
        lr = self.base_lr + (self.max_lr - self.base_lr) * scale_factor * amplitude
        if not self.cycle_momentum:
            return lr, torch.full_like(lr, self.max_m)
        return lr, self.max_m - (self.max_m - self.base_m) * scale_factor * amplitude


def cyclic_schedule_of(scheduler):
    """The CyclicSchedule of a triangular2 CyclicLR with one parameter group."""
    if scheduler.mode != "triangular2" or len(scheduler.base_lrs) != 1:
        raise ValueError("the graphed step computes triangular2 CyclicLR with one parameter group")
    up = round(scheduler.total_size * scheduler.step_ratio)
    return CyclicSchedule(scheduler.base_lrs[0], scheduler.max_lrs[0], up, scheduler.total_size - up,
                          scheduler.base_momentums[0] if scheduler.cycle_momentum else 0.0,
                          scheduler.max_momentums[0] if scheduler.cycle_momentum else 0.9,
                          scheduler.cycle_momentum)

