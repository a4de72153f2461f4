"""Helpers shared by the training and evaluation scripts (train_us3l.py, train_dspnet.py,
eval_knn.py, eval_linear.py).

Config: each script defines one flat dataclass, one field per line with a default and a comment,

    @dataclass
    class Config:
        epochs: int = 100  # passes over the training set
        widths: list[float] = field(default_factory=lambda: [1.0, 0.5])  # evaluated widths

    cfg = parse_config(Config)     # defaults <- --config FILE.yaml <- --key=value overrides
    save_config(cfg, cfg.out_dir)  # out_dir/config.yaml, loadable again with --config

and is run as `python script.py --config yaml/recipe.yaml --epochs=2 --widths=1.0,0.25`.
`python script.py --help` lists every field with its type, default and comment.

Also: schedules of the global step (cosine, warmup_cosine), LARS and param_groups, ema_update_,
atomic checkpoints (save_checkpoint, load_checkpoint, find_latest_checkpoint, atomic_save),
log_jsonl and check_finite.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import inspect
import io
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import tokenize
import traceback
import types
import typing
from pathlib import Path

import torch
import yaml

# ------------------------------------------------------------------------------------------------
# Config: dataclass defaults, then --config FILE.yaml, then --key=value (or --key value) overrides.
# Supported field types: int, float, bool, str, list[...] of those (nested too), and `X | None`.
# Values are read with yaml.safe_load and then checked against the field type; a wrong type or an
# unknown key exits with one line naming the key and where it came from (the file or the command
# line). Command-line notes:
#   - str fields take the text as typed (YAML would turn `no` into False and `007` into 7);
#     for `str | None` fields, null, ~ and None mean None.
#   - list fields also take a list without its outer brackets: --widths=1.0,0.5 is --widths=[1.0,0.5]
#     and --depths=[2,2],[3,4] is --depths=[[2,2],[3,4]].
#   - a bool field may stand alone: --flag is --flag=true.
#   - a key given twice: the last one wins (as with argparse).
# float fields accept ints and numeric strings: PyYAML reads `1e-4` (no dot) as the string '1e-4'.


class ConfigError(SystemExit):
    """A bad config key, value or file. A SystemExit, so a script prints one line, no traceback."""


T = typing.TypeVar("T")


def run(main, cls: type) -> None:
    """Entry point of every script: `run(main, Config)` parses the config and calls main(cfg).
    However main ends, the process group is torn down before the interpreter exits, so a rank that
    stops on an error (e.g. a non-finite loss, raised on every rank by check_finite) exits with code 1
    and its traceback, not with an abort ("terminate called without an active exception").
    The traceback is printed and dropped *before* the teardown: it holds main's frames, whose DDP
    model holds the process group; a group still alive at interpreter exit aborted in about 1 run
    of 5 (two gloo processes, measured here)."""
    code = 0
    try:
        main(parse_config(cls))
    except SystemExit as e:  # --help (code 0), ConfigError (its one-line message, exit 1)
        code = e.code
    except (Exception, KeyboardInterrupt) as e:
        traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    gc.collect()  # frees what the dropped traceback kept alive (models, loaders, the group's users)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if code:
        sys.stdout.flush()
        sys.exit(code)


def parse_config(cls: type[T], argv: list[str] | None = None) -> T:
    """Build a `cls` instance from its defaults, `--config FILE.yaml` and `--key=value` overrides
    (argv defaults to sys.argv[1:]). `--help` prints the fields and exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    for name, tp in fields.items():
        if not _supported(tp):
            raise TypeError(f"{cls.__name__}.{name}: unsupported config type {_type_name(tp)}")

    config_file, cli = None, {}  # cli: key -> raw text as typed
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(config_help(cls))
            raise SystemExit(0)
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"config error: unexpected argument {arg!r} on the command line "
                              "(use --key=value or --config FILE.yaml)")
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]
                i += 1
            elif fields.get(key) is bool:
                value = "true"
            elif key in fields or key == "config":
                raise ConfigError(f"config error: --{key} needs a value on the command line")
        if key == "config":
            if config_file is not None:
                raise ConfigError("config error: --config given twice on the command line")
            config_file = value
        else:
            _check_key(key, fields, "on the command line")
            cli[key] = value

    updates = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config error: config file not found: {config_file}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(f"config error: cannot parse {config_file}{at}: {problem}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"config error: {config_file} must hold a mapping of key: value, "
                              f"got {type(data).__name__}")
        for key, value in data.items():
            where = f"in {config_file}"
            _check_key(str(key), fields, where)
            updates[key] = _coerce(value, fields[key], key, where)
    for key, text in cli.items():
        updates[key] = _coerce(_parse_cli(text, fields[key], key), fields[key], key, "on the command line")
    return dataclasses.replace(cls(), **updates)


def save_config(cfg, out_dir) -> Path:
    """Write the resolved config to out_dir/config.yaml (feed it back with --config); the git SHA
    and the command line go in comments at the top. Call it on the main process only."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = f"# git: {git_sha()}\n# command: python {shlex.join(sys.argv)}\n"
    body = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=None)
    path, tmp = out / "config.yaml", out / "config.yaml.tmp"
    tmp.write_text(header + body)
    os.replace(tmp, path)  # atomic: a crash never leaves half a config
    return path


def git_sha() -> str:
    """The commit of this repository, '-dirty' if tracked files changed, or 'unknown'."""
    repo = Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)

    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty else "")


def config_help(cls) -> str:
    """One line per field: --name, type, default (as you would type it), and the source comment."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    defaults = dataclasses.asdict(cls())
    rows = [(f"--{f.name}", _type_name(hints[f.name]), json.dumps(defaults[f.name]), comments.get(f.name, ""))
            for f in dataclasses.fields(cls) if f.init]
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = [f"usage: {Path(sys.argv[0]).name} [--config FILE.yaml] [--key=value ...]",
             "Layers: the defaults below, then the YAML file, then --key=value (or --key value).", ""]
    lines += ["  " + "  ".join(row[c].ljust(widths[c]) for c in range(3)) + "  " + row[3] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _check_key(key, fields, where):
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else " (see --help)"
        raise ConfigError(f"config error: unknown key {key!r} {where}{hint}")


def _strip_none(tp):
    """(T, True) for `T | None`, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _supported(tp) -> bool:
    tp, _ = _strip_none(tp)
    if typing.get_origin(tp) is list:
        return len(typing.get_args(tp)) == 1 and _supported(typing.get_args(tp)[0])
    return tp in (int, float, bool, str)


def _type_name(tp) -> str:
    return tp.__name__ if tp in (int, float, bool, str) else str(tp).replace("typing.", "")


def _parse_cli(text: str, tp, key):
    inner, optional = _strip_none(tp)
    if optional and text in ("null", "~", "None"):
        return None
    if inner is str:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if typing.get_origin(inner) is list and not isinstance(value, list):
        try:
            value = yaml.safe_load(f"[{text}]")  # --widths=1.0,0.5 or --depths=[2,2],[3,4]
        except yaml.YAMLError:
            raise ConfigError(f"config error: key {key!r} on the command line: cannot parse {text!r} "
                              f"as {_type_name(tp)}") from None
    return value


def _coerce(value, tp, key, where):
    """`value` checked against `tp` (ints and numeric strings become floats), else ConfigError."""
    try:
        return _convert(value, tp)
    except ValueError:
        yaml_bool = isinstance(value, bool) and _strip_none(tp)[0] is str
        hint = " (quote it: YAML reads yes/no/on/off as booleans)" if yaml_bool else ""
        raise ConfigError(f"config error: key {key!r} {where}: expected {_type_name(tp)}, "
                          f"got {value!r}{hint}") from None


def _convert(value, tp):
    tp, optional = _strip_none(tp)
    if value is None and optional:
        return None
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ValueError
        return [_convert(v, typing.get_args(tp)[0]) for v in value]
    if isinstance(value, bool) != (tp is bool):  # bool is an int subclass: keep them apart
        raise ValueError
    if tp is float and isinstance(value, (int, str)):
        return float(value)  # ValueError for a non-numeric string
    if not isinstance(value, tp):
        raise ValueError
    return value


def _field_comments(cls) -> dict[str, str]:
    """{field: comment} from `name: type = default  # comment` lines of the class source; {} when
    the source is unavailable (a class made in a REPL, say)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    first_name, comment = {}, {}  # by line number
    for tok in tokens:
        if tok.type == tokenize.NAME:
            first_name.setdefault(tok.start[0], tok.string)
        elif tok.type == tokenize.COMMENT:
            comment[tok.start[0]] = tok.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    return {first_name[n]: c for n, c in comment.items() if first_name.get(n) in names}


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
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["lars"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ok = (p_norm > 0) & (d_norm > 0)
                    d = d.mul_(torch.where(ok, group["eta"] * p_norm / d_norm, 1.0))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
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


@torch.no_grad()
def check_same_across_processes(module: torch.nn.Module, accelerator) -> None:
    """Raise unless every process holds the same parameters (DESIGN 6): one gather of per-tensor
    float64 sums. The trainers call it at the end of a run with more than one process."""
    if accelerator.num_processes <= 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
    gathered = accelerator.gather(sums[None])  # (world, P)
    if not torch.equal(gathered.min(0).values, gathered.max(0).values):
        raise RuntimeError("parameters differ across processes at the end of training")


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


def load_resume(cfg, ckpt_path, modules: dict, accelerator) -> int:
    """Resume per cfg.resume: auto (ckpt_path if it exists) | none | PATH. Loads {key: module or
    optimizer} from the checkpoint and returns its step, or 0 for a fresh start. A checkpoint
    written under another config (the trainers store it as "config") that does not load, or of
    another arch, is a one-line ConfigError naming the keys that differ; keys that differ but load
    (log_every, epochs, ...) are printed and taken from this config."""
    path = ckpt_path if cfg.resume == "auto" else (None if cfg.resume == "none" else cfg.resume)
    if path is None or (cfg.resume == "auto" and not os.path.isfile(path)):
        return 0
    if not os.path.isfile(path):
        raise ConfigError(f"config error: resume={cfg.resume}: no such checkpoint (allowed: auto, none, a file)")
    ckpt = torch.load(path, map_location=accelerator.device, weights_only=True)
    now, then = dataclasses.asdict(cfg), ckpt.get("config", {})
    changed = [k for k in now if k in then and then[k] != now[k] and k not in ("resume", "out_dir")]
    how = ("; use another out_dir or --resume=none to start afresh" if cfg.resume == "auto"
           else "; resume from a checkpoint of this config")
    said = ", ".join(f"{k}={then[k]!r} there, {now[k]!r} here" for k in changed)
    if "arch" in changed:
        raise ConfigError(f"config error: {path} was written by a run with another arch ({said}){how}")
    try:
        for key, m in modules.items():
            m.load_state_dict(ckpt[key])
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ConfigError(f"config error: {path} does not fit this config ({said or first}){how}") from None
    if changed:
        accelerator.print(f"resuming {path} with changed keys: {said}")
    accelerator.print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


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
