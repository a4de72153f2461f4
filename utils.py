"""Helpers shared by the training and evaluation scripts (train_us3l.py, train_dspnet.py,
eval_knn.py, eval_linear.py); their config parsing is config.py.

Schedules of the global step (cosine, warmup_cosine), LARS and param_groups, ema_update_, the end of a
step of several backward passes (all_reduce_grads_ or OverlappedAllReduce, optimizer_step_ with fp16
loss scaling), atomic checkpoints (atomic_save, BackgroundSaver), resume (load_resume, read_results),
log_jsonl, check_finite, trackers (check_tracker, init_tracker, tracker_log: TensorBoard or W&B under out_dir),
cpus_per_rank (the default thread count of per-process CPU work).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import threading
from pathlib import Path

import torch

from config import ConfigError

# ------------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step (the one clock), set by hand each step, so a
# resumed run needs only the step counter and no scheduler state.


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half a cosine from `start` (step 0) to `end` (step >= total), clamped outside [0, total].
    EMA momentum as BYOL: tau = cosine(step, total, 0.996, 1.0) = 1 - 0.004 * (cos(pi*k/K) + 1) / 2."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, end: float = 0.0) -> float:
    """Linear from 0 (step 0) to `peak` (step `warmup`), then cosine to `end` at step `total`."""
    if step < warmup:
        return peak * step / warmup
    return cosine(step - warmup, total - warmup, peak, end)


# ------------------------------------------------------------------------------------------------
# Optimizer


def param_groups(params, weight_decay: float) -> list[dict]:
    """Weights (ndim > 1) get weight decay and LARS adaptation; biases and norm scales (ndim <= 1)
    get neither, as BYOL. Takes model.parameters() or model.named_parameters(); split by shape,
    never by name. The extra "lars" key is harmless to torch.optim.SGD, so SGD runs use it too."""
    params = [p[1] if isinstance(p, tuple) else p for p in params]
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lars": True},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars": False}]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and the LARS trust ratio (You et al. 2017), as in BYOL and SimCLR:
    d = g + wd*p;  d *= eta*||p||/||d|| (when both norms > 0);  mu = m*mu + d;  p -= lr*mu.
    Groups with lars=False (see param_groups) are plain momentum SGD: no decay, no trust ratio.
    No host sync: the trust ratio stays on the device (torch.where, not an `if`)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # a few fused _foreach kernels per group, not a loop of small ones
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            d = [p.grad for p in ps]
            if group["lars"]:
                d = torch._foreach_add(d, ps, alpha=group["weight_decay"])
                p_norm, d_norm = torch.stack(torch._foreach_norm(ps)), torch.stack(torch._foreach_norm(d))
                ratio = torch.where((p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm, 1.0)
                torch._foreach_mul_(d, list(ratio.unbind()))
            mu = []
            for p in ps:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
                mu.append(self.state[p]["mu"])
            torch._foreach_mul_(mu, group["momentum"])
            torch._foreach_add_(mu, d)
            torch._foreach_add_(ps, mu, alpha=-group["lr"])
        return loss


@torch.no_grad()
def all_reduce_grads_(params, world: int) -> None:
    """Average the gradients over processes with one all-reduce of one flat buffer: the trainers do
    several backward passes per step (one per width or DN) and sync once, instead of DDP's sync per
    backward. Every rank must hold gradients for the same parameters (the same widths were run)."""
    if world <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.div_(world).split([g.numel() for g in grads]), grads)])


class OverlappedAllReduce:
    """all_reduce_grads_ (world > 1) overlapped with a step's last backward, as DDP: fixed ~25 MB buckets
    of the parameters in reverse order (the backward reaches the last layers first), each all-reduced
    asynchronously once its gradients are final and every earlier bucket is out (same order on every
    rank: same buckets, graph, hooks). arm(loss) before that backward; finish() (optimizer_step_) sends
    the rest, waits, divides by world, copies back: all_reduce_grads_'s sums, bit for bit (fp16: of the
    scaled gradients). arm() walks the graph (DDP's find_unused_parameters; 0.5 ms for a ResNet-50 on a
    CPU): a parameter it does not reach (a block a shallower DN skips, a head only earlier widths use)
    is final already, and would otherwise hold back its bucket and every later one until finish()."""

    def __init__(self, params, world: int, bucket_mb: float = 25.0):
        self.world, self.buckets, self.hooks, self.sent, size = world, [[]], [], [], 0
        # own group: sync BN's all-reduces in the backward never wait behind a bucket (NCCL: one stream per group)
        self.group = torch.distributed.new_group()
        params = [p for p in params if p.requires_grad]
        # NCCL makes a group's communicator lazily, at its first collective: warm it up here (a tiny
        # all_reduce), not inside step 1's backward where it would stall the first buckets behind its setup
        if params:
            torch.distributed.all_reduce(torch.zeros(1, device=params[0].device), group=self.group)
        for p in reversed(params):
            if size and size + p.numel() * p.element_size() > bucket_mb * 2**20:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()

    def arm(self, loss) -> None:
        reached, todo, seen = set(), [loss.grad_fn], set()
        while todo:  # the parameters whose AccumulateGrad node the backward of `loss` will run
            fn = todo.pop()
            if fn is not None and fn not in seen:
                seen.add(fn)
                todo += [f for f, _ in fn.next_functions]
                reached.add(getattr(fn, "variable", None))
        self.ready = [sum(p not in reached for p in bucket) for bucket in self.buckets]  # final gradients
        self.hooks = [p.register_post_accumulate_grad_hook(lambda _, b=b: self._ready(b, 1))
                      for b, bucket in enumerate(self.buckets) for p in bucket if p in reached]
        self._ready(0, 0)  # buckets of unreached parameters only go now

    def _ready(self, b, n):  # autograd calls it once the last backward has accumulated a parameter's gradient
        self.ready[b] += n
        while len(self.sent) < len(self.buckets) and self.ready[k := len(self.sent)] == len(self.buckets[k]):
            self._send()

    @torch.no_grad()
    def _send(self):
        grads = [p.grad for p in self.buckets[len(self.sent)] if p.grad is not None]  # None alike on every rank
        flat = torch.cat([g.flatten() for g in grads]) if grads else None
        self.sent.append((torch.distributed.all_reduce(flat, group=self.group, async_op=True) if grads else None,
                          flat, grads))

    @torch.no_grad()
    def finish(self) -> None:
        for h in self.hooks:
            h.remove()
        while len(self.sent) < len(self.buckets):
            self._send()
        for work, flat, grads in self.sent:
            if grads:
                work.wait()
                flat = flat.div_(self.world).split([g.numel() for g in grads])
                torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat, grads)])
        self.hooks, self.sent = [], []


@torch.no_grad()
def check_same_across_processes(module: torch.nn.Module, accelerator, buffers: bool = True) -> None:
    """Raise unless every process holds the same parameters and floating-point buffers (BN running
    statistics, e.g. of a momentum-BN target; buffers=False: parameters only, as per-process BN
    leaves them differing): one gather of per-tensor float64 sums. The trainers call it at the end
    of a run with more than one process."""
    if accelerator.num_processes <= 1:
        return
    named = [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if buffers and b.is_floating_point())]
    sums = torch.stack([t.detach().double().sum() for _, t in named])
    gathered = accelerator.gather(sums[None])  # (world, P)
    differ = [n for (n, _), lo, hi in zip(named, gathered.min(0).values, gathered.max(0).values) if lo != hi]
    if differ:
        raise RuntimeError(f"parameters or BN statistics differ across processes at the end of training: "
                           f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}")


@torch.no_grad()
def ema_update_(teacher: torch.nn.Module, student: torch.nn.Module, tau: float, buffers: bool = True) -> None:
    """teacher = tau*teacher + (1-tau)*student, parameter by parameter (fp32 teacher), and buffers
    (BN running stats) copied from the student unless buffers=False (a teacher with momentum BN keeps
    its own). Call after optimizer.step() with the unwrapped student (accelerator.unwrap_model);
    both must list their tensors in the same order."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"ema_update_: teacher has {len(t_params)} parameters, student {len(s_params)}")
    torch._foreach_lerp_(t_params, [s.to(t.dtype) for t, s in zip(t_params, s_params)], 1.0 - tau)
    if buffers:
        for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
            t.copy_(s)


# ------------------------------------------------------------------------------------------------
# Checkpoints: the trainers write one file, out_dir/checkpoints/last.pt (state_dicts, step), with
# atomic_save: a crash at any moment, mid-write included, leaves the previous checkpoint readable.


def atomic_save(obj, path) -> None:
    """torch.save that never leaves a half-written file at `path`: a failed save keeps the old one."""
    _atomic_write(path, lambda f: torch.save(obj, f))


class BackgroundSaver:
    """atomic_save in a thread, for the trainers' checkpoints: save() copies the tensors to the CPU (the
    only part the training step waits for: state_dict tensors are the live weights) and returns; a
    thread writes and fsyncs while training goes on. The next save() and wait() first wait for the
    previous write and raise its error, if any. A process killed mid-write leaves the previous file
    (atomic_save), so the other processes need not wait at a barrier for it."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, obj, path) -> None:
        self.wait()
        snapshot = _to_cpu(obj)
        self.thread = threading.Thread(target=self._write, args=(snapshot, path), daemon=True)
        self.thread.start()

    def _write(self, obj, path):
        try:
            atomic_save(obj, path)
        except BaseException as e:  # raised in the main thread by the next save() or wait()
            self.error = e

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _atomic_write(path, write) -> None:
    """write(f) into a temp file next to `path`, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a plain open() would give 0644
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write (SIGKILL)
        stale.unlink(missing_ok=True)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too (Linux): makes renames inside it durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# Logging and divergence checks


def load_resume(cfg, ckpt_path, modules: dict, accelerator, extra: dict | None = None) -> int:
    """Resume per cfg.resume: auto (ckpt_path if it exists) | none | PATH. Loads {key: module,
    optimizer or grad scaler} from the checkpoint and returns its step, or 0 for a fresh start.
    extra: {key: default} of plain values the checkpoint may hold (e.g. the W&B run id), updated
    in place from it on every process.
    A checkpoint written under another config (the trainers store it as "config") is a one-line
    ConfigError naming the keys that differ, unless they are RESUME_SAFE (logging, workers, ...) or
    listed in cfg.allow_changed; those are printed and taken from this config.
    The global batch (batch_size x processes, stored as "num_processes") must be the checkpoint's:
    the lr, the steps per epoch and every schedule depend on it, so another one is refused; the same
    global batch on another number of processes resumes (same data order, same schedules).
    Several processes: the main one decides whether there is a checkpoint, every process loads it,
    and all of them fail together (one message) if any cannot read it or reads another step, so
    processes that see different files never hang in a later collective."""
    unknown = [k for k in getattr(cfg, "allow_changed", ()) if not hasattr(cfg, k)]
    if unknown:
        raise ConfigError(f"config error: allow_changed names keys this script does not have: {', '.join(unknown)}")
    path = ckpt_path if cfg.resume == "auto" else (None if cfg.resume == "none" else cfg.resume)
    status = 0 if path is None else (2 if not os.path.isfile(path) else 1)  # fresh | resume | missing
    if accelerator.num_processes > 1:
        status = _broadcast_object(status, accelerator)
    if status == 0 or (status == 2 and cfg.resume == "auto"):
        return 0
    if status == 2:
        raise ConfigError(f"config error: resume={cfg.resume}: no such checkpoint (allowed: auto, none, a file)")
    step, error = None, ""
    try:
        step = _load_checkpoint(cfg, path, modules, accelerator, extra)
    except ConfigError as e:
        error = str(e)
    except Exception as e:  # a rank that cannot read the file says why, and all stop
        hint = ("with several nodes, out_dir must be a folder every node sees" if accelerator.num_processes > 1 else
                "a file cut short by a full disk or a copy: remove it, or pass --resume=none to start over")
        error = (f"config error: process {accelerator.process_index} cannot resume from {path} ({type(e).__name__}: "
                 f"{e}); {hint}")
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        reports = gather_object([(error, step)])
        error = next((e for e, _ in reports if e), "")
        if not error and len({s for _, s in reports}) > 1:
            error = (f"config error: the processes read checkpoints of different steps from {path} "
                     f"({[s for _, s in reports]}); out_dir must be one folder that every process sees")
    if error:
        raise ConfigError(error)
    return step


# Keys a resumed run may change: where it logs and how often, its workers, where it finds the same data,
# how the all-reduce is scheduled (bit-identical sums), the kNN monitor's batch, and batch_size (checked
# below: the global batch must stay). Any other change (a seed, max_steps, the lr, a loss switch) would
# continue the old run as another one: refused unless listed in the config's allow_changed.
RESUME_SAFE = {"resume", "out_dir", "allow_changed", "log_every", "save_every", "save_every_min", "eval_every",
               "num_workers", "tracker", "knn_batch_size", "data_path", "ffcv_path", "overlap_allreduce",
               "batch_size"}


def _load_checkpoint(cfg, path, modules, accelerator, extra=None) -> int:
    # to the CPU, then load_state_dict copies to each module's device (a 2-process CPU run's device is
    # cpu:0 / cpu:1, which torch.load cannot map to)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    now, then = dataclasses.asdict(cfg), ckpt.get("config", {})
    allowed = RESUME_SAFE | set(getattr(cfg, "allow_changed", ()))
    changed = [k for k in now if k in then and then[k] != now[k] and k not in ("resume", "out_dir")]
    how = ("; use another out_dir or --resume=none to start afresh" if cfg.resume == "auto"
           else "; resume from a checkpoint of this config")
    said = ", ".join(f"{k}={then[k]!r} there, {now[k]!r} here" for k in changed)
    if "arch" in changed:
        raise ConfigError(f"config error: {path} was written by a run with another arch ({said}){how}")
    world, world_then = accelerator.num_processes, ckpt.get("num_processes", accelerator.num_processes)
    batch_then = then.get("batch_size", cfg.batch_size)
    if batch_then * world_then != cfg.batch_size * world:
        fits = (f"batch_size={batch_then * world_then // world} on {world} processes, or "
                if batch_then * world_then % world == 0 else "")
        raise ConfigError(f"config error: {path} was trained with a global batch of {batch_then * world_then} "
                          f"(batch_size={batch_then} x num_processes={world_then}), this run has "
                          f"{cfg.batch_size * world} (batch_size={cfg.batch_size} x num_processes={world}): the lr, "
                          f"steps per epoch and schedules depend on it; resume with {fits}"
                          f"batch_size={batch_then} on {world_then} processes{how}")
    refused = [k for k in changed if k not in allowed]
    if refused:
        diff = ", ".join(f"{k}={then[k]!r} there, {now[k]!r} here" for k in refused)
        raise ConfigError(f"config error: {path} was written by a run with another config ({diff}): a new run "
                          f"needs a new --out_dir (or --resume=none); to continue this run with the change, "
                          f"--allow_changed={','.join(refused)}")
    try:
        for key, m in modules.items():
            m.load_state_dict(ckpt[key])
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ConfigError(f"config error: {path} does not fit this config ({said or first}){how}") from None
    if extra is not None:
        extra.update({k: ckpt[k] for k in extra if k in ckpt})
    if changed:
        accelerator.print(f"resuming {path} with changed keys: {said}")
    if world_then != world:
        accelerator.print(f"resuming a run of {world_then} process(es) on {world}, same global batch")
    accelerator.print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


def _broadcast_object(obj, accelerator):
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([obj if accelerator.is_main_process else None])[0]


def read_results(path, accelerator) -> dict:
    """results.json of a run folder as the main process reads it ({} if absent), the same dict on
    every process: what a rank does next (skip a finished run, the first kNN monitor) must not
    depend on a file that another node may see otherwise."""
    results = json.loads(Path(path).read_text()) if accelerator.is_main_process and os.path.isfile(path) else {}
    return _broadcast_object(results, accelerator) if accelerator.num_processes > 1 else results


def optimizer_step_(optimizer, scaler, params, world: int, regularize=None, overlap=None) -> None:
    """The end of a step made of several backward passes: the all-reduce of the (loss-scaled) gradients
    (overlap.finish(), or one blocking), unscale, regularize() (e.g. group decay, on true gradients),
    the optimizer step, the scale update, zero grads. fp16 (scaler enabled): a step whose gradients
    overflowed is skipped on every process alike, since the all-reduce spreads an inf or NaN of any
    rank to all ranks before each one's scaler looks; the scaler then lowers its scale everywhere. Its
    check is one host sync. With a disabled scaler (bf16, fp32) this is all-reduce, regularize, step."""
    overlap.finish() if overlap is not None else all_reduce_grads_(params, world)
    scaler.unscale_(optimizer)
    if regularize is not None:
        regularize()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def log_jsonl(path, record: dict) -> None:
    """Append `record` as one JSON line; tensors and numpy values become Python numbers or lists.
    Main process only (the caller's job). A CUDA tensor here is a host sync: pass floats you have."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_to_json) + "\n")


def trim_jsonl(path, step: int) -> None:
    """On resume from `step`: drop the records a killed run logged after its last checkpoint (the
    resumed run logs those steps again) and a last line cut short by the kill. Main process only."""
    if not os.path.isfile(path):
        return
    keep = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line + "\n")
    _atomic_write(path, lambda f: f.write("".join(keep).encode()))


def _to_json(x):
    if hasattr(x, "tolist"):  # torch tensors, numpy arrays and numpy scalars
        return x.tolist()
    raise TypeError(f"log_jsonl: cannot write {type(x).__name__} as JSON")


# ------------------------------------------------------------------------------------------------
# Trackers (config key `tracker` of every script): log.jsonl is always written; TensorBoard or W&B
# come on top, through Accelerate, and write under out_dir like everything else of a run:
# TensorBoard to out_dir/<project>/, W&B to out_dir/wandb/. Main process only.

TRACKERS = ("", "tensorboard", "wandb")


def check_tracker(name: str) -> None:
    """A one-line ConfigError, before anything runs, unless tracker `name` can log here. Accelerate
    alone only warns about a missing package and then trains with nothing logged."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if name not in TRACKERS:
        raise ConfigError(f"config error: tracker={name!r}, allowed: tensorboard, wandb, or empty (log.jsonl only)")
    if name == "tensorboard" and not is_tensorboard_available():
        raise ConfigError("config error: tracker=tensorboard needs the tensorboard package, which is not installed: "
                          "pip install -r requirements.txt")
    if name == "wandb" and not is_wandb_available():
        raise ConfigError("config error: tracker=wandb needs the wandb package, which is optional and not installed: "
                          "pip install wandb (then `wandb login`, or WANDB_MODE=offline to log without an account)")


def tracker_config(cfg) -> dict:
    """The config as flat {key: bool | int | float | str} for hyper-parameter logging: TensorBoard's
    hparams refuse lists and None (DSPNet's `dns`, eval widths), so those become JSON text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in dataclasses.asdict(cfg).items()}


def init_tracker(accelerator, cfg, project: str, run_id: str | None = None, step: int = 0) -> str | None:
    """Start cfg.tracker (nothing if empty) with the flattened config as hyper-parameters; returns
    the W&B run id (None for TensorBoard), which the trainers store in their checkpoints and
    results.json. The Accelerator must be built with log_with=cfg.tracker, project_dir=cfg.out_dir.
    Resume from a checkpoint of `step`: run_id continues that W&B run (resume="allow"), and
    TensorBoard drops what an interrupted run logged after `step` (purge_step), which the resumed
    run logs again.
    A tracker that fails to start (W&B not logged in, say) stops every process with one line."""
    if not cfg.tracker:
        return None
    error = ""
    if accelerator.is_main_process:
        if cfg.tracker == "wandb":
            kwargs = {"wandb": {"dir": cfg.out_dir, "id": run_id, "resume": "allow", "name": cfg.out_dir}}
        else:
            kwargs = {"tensorboard": {"purge_step": step + 1}} if step else {}
        try:
            accelerator.init_trackers(project, config=tracker_config(cfg), init_kwargs=kwargs)
            if cfg.tracker == "wandb":
                run_id = accelerator.get_tracker("wandb", unwrap=True).id
        except Exception as e:
            error = f"config error: tracker={cfg.tracker} could not start ({type(e).__name__}: {e})"
    if accelerator.num_processes > 1:
        error, run_id = _broadcast_object((error, run_id), accelerator)
    if error:
        raise ConfigError(" ".join(error.split()))
    return run_id


def tracker_log(accelerator, record: dict, step: int) -> None:
    """Send a log record to the tracker, if any, at `step`: numbers as they are, a list of numbers
    as key/0, key/1, ... (a step's widths); text and the step itself stay in log.jsonl only."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    values = {}
    for k, v in record.items():
        if k == "step":
            continue
        if isinstance(v, (int, float)):
            values[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
            values.update({f"{k}/{i}": x for i, x in enumerate(v)})
    accelerator.log(values, step=step)


def to_floats(tensors: dict) -> dict[str, float]:
    """{name: 0-d tensor} -> {name: float} with one device-to-host copy (not one sync per value)."""
    if not tensors:
        return {}
    return dict(zip(tensors, torch.stack([t.detach().float() for t in tensors.values()]).tolist()))


def check_finite(losses: dict, step: int, accelerator) -> dict[str, float]:
    """Raise FloatingPointError on every rank when any rank has a non-finite loss; else return the
    losses averaged over processes as floats (ready for log_jsonl). `losses`: {name: 0-d tensor},
    e.g. one per width, same keys in the same order on every rank.
    Cost: one small all-reduce and exactly one device->host sync. Called every step, the sync stops
    the CPU from queueing kernels ahead of the GPU (noticeable for small models; not measured here).
    Called every `log_every` steps it is nearly free, but a NaN may go unseen for log_every-1 steps:
    also call it right before each save_checkpoint so that no checkpoint holds diverged weights."""
    names = [str(k) for k in losses]
    with torch.no_grad():
        vals = torch.stack([torch.as_tensor(v).detach().float().reshape(()).to(accelerator.device)
                            for v in losses.values()])
        packed = torch.cat([(~torch.isfinite(vals)).sum().float().view(1), vals])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")  # the flag is a count of bad values
    bad, *values = packed.tolist()  # the one host sync
    values = [v / accelerator.num_processes for v in values]
    if bad > 0:
        shown = ", ".join(f"{n}={v:.6g}" for n, v in zip(names, values))
        raise FloatingPointError(f"non-finite loss at step {step}: {shown}"
                                 + (" (means over processes)" if accelerator.num_processes > 1 else ""))
    return dict(zip(names, values))


# ------------------------------------------------------------------------------------------------
# Device


def check_precision(precision: str, device) -> None:
    """bf16 on a GPU below compute capability 8.0 (V100, T4) runs emulated, far slower than fp16, although
    torch.cuda.is_bf16_supported() says yes: a one-line error instead of a slow run."""
    if precision == "bf16" and torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ConfigError(f"config error: precision=bf16 on {torch.cuda.get_device_name(device)} (compute "
                              f"capability {major}.{minor}) is emulated and slow: use precision=fp16 (with loss "
                              f"scaling) or precision=no")


def cpus_per_rank() -> int:
    """This process's share of the CPUs for its own threads and workers: the CPUs it may run on
    (sched_getaffinity: a taskset, cgroup or SLURM allocation, not the machine's count) over the processes
    of this node (LOCAL_WORLD_SIZE, which accelerate launch and torchrun set; 1 without it), at least 1.
    The default where a thread count is not given (ffcv_data's loader threads): a per-node count taken by
    each of 8 ranks oversubscribes the node 8 times. NOTE: a launcher that binds each process to CPUs of its
    own (srun --cpu-bind per task) sees them divided again: give num_workers explicitly there."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))


def cpu_state(module: torch.nn.Module) -> dict:
    """module.state_dict() as CPU tensors: backbone.pt then loads on a host without the trainer's GPU."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
