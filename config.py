"""Config for every script: one flat dataclass, one field per line with a default and a comment,

    @dataclass
    class Config:
        epochs: int = 100  # passes over the training set
        widths: list[float] = field(default_factory=lambda: [1.0, 0.5])  # evaluated widths

    cfg = parse_config(Config)     # defaults <- --config FILE.yaml <- --key=value overrides
    save_config(cfg, cfg.out_dir)  # out_dir/config.yaml, loadable again with --config
    if __name__ == "__main__": run(main, Config)   # parse, call main(cfg), exit cleanly on any error

and is run as `python script.py --config yaml/cifar10_quick.yaml --epochs=2 --widths=1.0,0.25`.
`python script.py --help` lists every field with its type, default and comment.

Config: dataclass defaults, then --config FILE.yaml, then --key=value (or --key value) overrides.
--config may be given more than once: the files are layered in order, a later file's keys win
(`--config yaml/us3l_ablations/t7_case02.yaml --config yaml/us3l_ablations/paper.yaml`: a row's
switches at the paper's scale).
Supported field types: int, float, bool, str, list[...] of those (nested too), and `X | None`.
Values are read with yaml.safe_load and then checked against the field type; a wrong type or an
unknown key exits with one line naming the key and where it came from (the file or the command
line). Command-line notes:
  - str fields take the text as typed (YAML would turn `no` into False and `007` into 7);
    for `str | None` fields, null, ~ and None mean None.
  - list fields also take a list without its outer brackets: --widths=1.0,0.5 is --widths=[1.0,0.5]
    and --depths=[2,2],[3,4] is --depths=[[2,2],[3,4]].
  - a bool field may stand alone: --flag is --flag=true.
  - a key given twice: the last one wins (as with argparse).
float fields accept ints and numeric strings: PyYAML reads `1e-4` (no dot) as the string '1e-4'.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import inspect
import io
import json
import os
import shlex
import subprocess
import sys
import textwrap
import tokenize
import traceback
import types
import typing
from pathlib import Path

import torch

import yaml


class ConfigError(SystemExit):
    """A bad config key, value or file. A SystemExit, so a script prints one line, no traceback."""


class UserError(Exception):
    """Base of the errors a user causes and fixes from the message alone (data.BadImageError): run()
    prints them as one line, as the missing-file errors (USER_ERRORS)."""


# What run() reports in one line, `error: <message>`, without a traceback (DEBUG=1 prints it as well):
# a missing, unreadable or foreign file or folder (data, split, .beton, checkpoint) names itself and the fix.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               UserError)


T = typing.TypeVar("T")


def run(main, cls: type) -> None:
    """Entry point of every script: `run(main, Config)` parses the config and calls main(cfg). A config
    error or a USER_ERRORS failure exits with one line; any other exception with its traceback.
    One process, or a clean end: the process group is torn down before the interpreter exits, so a
    rank that stops on an error (e.g. a non-finite loss) exits with code 1 and its traceback, not
    with an abort ("terminate called without an active exception"). The traceback is printed and
    dropped *before* the teardown: it holds main's frames, whose DDP model holds the process group;
    a group still alive at interpreter exit aborted in about 1 run of 5 (two gloo processes).
    An error with more than one process: the message is printed and flushed, then os._exit(code),
    with no teardown at all. The rank may have failed alone (a bad image, an OOM, a full disk) while
    its peers sit in a collective it will never join; destroy_process_group, or the destructors of
    DDP and the loaders, could then wait for them, and they would wait in turn for the collective
    timeout (30 minutes by default, NCCL or gloo). Exiting at once lets the launcher (torchrun under
    `accelerate launch`) see the failure and stop the other ranks within seconds, and srun's
    --kill-on-bad-exit the other nodes. A shorter process-group timeout was not chosen: it would
    also cut legitimate long waits (rank 0 saving a checkpoint or computing a kNN while the others
    wait at a barrier) and still leave minutes of waiting. Cost of the hard exit: nothing after
    the error runs (log.jsonl is appended and closed per record, so it is complete; a TensorBoard
    writer may lose its last buffered events; a W&B run is marked crashed)."""
    code = 0
    try:
        main(parse_config(cls))
    except SystemExit as e:  # --help (code 0), ConfigError (its one-line message, exit 1)
        code = e.code
    except USER_ERRORS as e:  # one line naming the problem and its fix
        if os.environ.get("DEBUG"):
            traceback.print_exc()
        code = f"error: {e}"
    except (Exception, KeyboardInterrupt) as e:
        traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if code and distributed and torch.distributed.get_world_size() > 1:
        if not isinstance(code, int):  # a message, as sys.exit would print it
            print(code, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    gc.collect()  # frees what the dropped traceback kept alive (models, loaders, the group's users)
    if distributed:
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

    config_files, cli = [], {}  # cli: key -> raw text as typed
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
            config_files.append(value)
        else:
            _check_key(key, fields, "on the command line")
            cli[key] = value

    updates = {}
    for config_file in config_files:  # layered: a later file's keys win
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
    """{field: comment} from `name: type = default  # comment` lines of the class source, with the
    comment-only lines that follow a field (its comment, continued); a `# --- title` line starts a
    section and continues nothing. {} when the source is unavailable (a class made in a REPL, say)."""
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
    out, field = {}, None
    for n in sorted(comment):
        if first_name.get(n) in names:  # a field's own line
            field = first_name[n]
            out[field] = comment[n]
        elif n not in first_name and field and n - 1 in comment and not comment[n].startswith("---"):
            out[field] += " " + comment[n]  # a continuation line right below the field's comment
        else:
            field = None
    return out
