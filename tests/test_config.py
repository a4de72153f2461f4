"""Config loading (config.parse_config / save_config): the three layers, coercion and strictness."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

import yaml
from config import ConfigError, config_help, parse_config, save_config


@dataclass
class Config:
    epochs: int = 100  # passes over the training set
    base_lr: float = 0.5  # lr at batch 256, scaled by the global batch
    bf16: bool = True  # bf16 autocast
    precision: str = "bf16"  # bf16|fp16|no
    widths: list[float] = field(default_factory=lambda: [1.0, 0.5])  # widths to evaluate
    sizes: list[int] = field(default_factory=lambda: [32, 64])  # crop sizes
    depths: list[list[int]] = field(default_factory=lambda: [[2, 2, 2, 2]])  # blocks per stage
    tracker: str | None = None  # accelerate tracker, None for log.jsonl only
    label_fraction: float | None = None  # e.g. 0.1; None uses all labels
    max_steps: int | None = None  # stop early; None runs all epochs


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults():
    assert parse_config(Config, []) == Config()


def test_yaml_layer(tmp_path):
    path = write(tmp_path, "epochs: 2\nwidths: [1.0, 0.25]\ndepths: [[2, 2, 2, 2], [3, 4, 6, 3]]\n"
                           "tracker: wandb\nlabel_fraction: 0.1\n")
    cfg = parse_config(Config, ["--config", path])
    assert cfg == Config(epochs=2, widths=[1.0, 0.25], depths=[[2, 2, 2, 2], [3, 4, 6, 3]],
                         tracker="wandb", label_fraction=0.1)


def test_empty_yaml_keeps_defaults(tmp_path):
    assert parse_config(Config, [f"--config={write(tmp_path, '# nothing differs')}"]) == Config()


def test_command_line_beats_yaml_beats_defaults(tmp_path):
    path = write(tmp_path, "epochs: 2\nbase_lr: 0.1\n")
    # the override wins wherever it stands relative to --config
    for argv in (["--config", path, "--epochs=3"], ["--epochs", "3", "--config", path]):
        cfg = parse_config(Config, argv)
        assert (cfg.epochs, cfg.base_lr, cfg.bf16) == (3, 0.1, True)
    assert parse_config(Config, ["--epochs=3", "--epochs=4"]).epochs == 4  # last wins


def test_coercion_from_command_line():
    cfg = parse_config(Config, ["--base_lr=1", "--widths=[1.0,0.5]", "--sizes", "16,24",
                                "--depths=[2,2],[3,4]", "--bf16=false", "--precision=no",
                                "--label_fraction", "0.01", "--max_steps=10", "--tracker=null"])
    assert cfg.base_lr == 1.0 and isinstance(cfg.base_lr, float)
    assert cfg.widths == [1.0, 0.5] and cfg.sizes == [16, 24] and cfg.depths == [[2, 2], [3, 4]]
    assert cfg.bf16 is False
    assert cfg.precision == "no"  # the text as typed, not YAML's False
    assert (cfg.label_fraction, cfg.max_steps, cfg.tracker) == (0.01, 10, None)
    cfg = parse_config(Config, ["--widths=1.0,0.5", "--depths=[[3,4,6,3]]", "--base_lr=1e-4",
                                "--widths=0.25", "--tracker", "wandb", "--max_steps=None"])
    assert cfg.widths == [0.25] and cfg.depths == [[3, 4, 6, 3]] and cfg.base_lr == 1e-4
    assert cfg.tracker == "wandb" and cfg.max_steps is None
    assert all(isinstance(w, float) for w in parse_config(Config, ["--widths=1,0"]).widths)


def test_bare_bool_flag():
    cfg = parse_config(Config, ["--bf16=false", "--bf16", "--epochs=1"])
    assert cfg.bf16 is True and cfg.epochs == 1
    assert parse_config(Config, ["--bf16", "false", "--base_lr", "-0.1"]).bf16 is False
    assert parse_config(Config, ["--bf16=off"]).bf16 is False  # YAML 1.1 booleans


def test_yaml_numbers_and_quoted_floats(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string: float fields accept numeric strings
    cfg = parse_config(Config, ["--config", write(tmp_path, "base_lr: 1e-4\nwidths: [1, '0.5']\n")])
    assert cfg.base_lr == 1e-4 and cfg.widths == [1.0, 0.5]


@pytest.mark.parametrize("text, key, shown", [
    ("epochs: 2.5", "epochs", "2.5"),
    ("epochs: true", "epochs", "True"),
    ("base_lr: fast", "base_lr", "'fast'"),
    ("widths: 0.5", "widths", "0.5"),
    ("depths: [2, 2, 2, 2]", "depths", "[2, 2, 2, 2]"),
    ("precision: no", "precision", "False"),
    ("bf16: 1", "bf16", "1"),
    ("sizes: [32, 1.5]", "sizes", "[32, 1.5]"),
])
def test_wrong_type_in_yaml_names_key_and_file(tmp_path, text, key, shown):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as e:
        parse_config(Config, ["--config", path])
    msg = str(e.value)
    assert f"'{key}'" in msg and path in msg and shown in msg and "\n" not in msg
    assert ("quote it" in msg) == (key == "precision")  # the YAML-boolean hint, only for str fields


@pytest.mark.parametrize("arg, key", [
    ("--epochs=2.5", "epochs"),
    ("--epochs=many", "epochs"),
    ("--base_lr=fast", "base_lr"),
    ("--bf16=maybe", "bf16"),
    ("--widths=[a,b]", "widths"),
    ("--max_steps=1.5", "max_steps"),
    ("--depths=[2,2,2,2]", "depths"),
])
def test_wrong_type_on_command_line_names_key_and_source(arg, key):
    with pytest.raises(ConfigError, match=f"'{key}' on the command line"):
        parse_config(Config, [arg])


def test_unknown_key_in_yaml(tmp_path):
    path = write(tmp_path, "epochs: 2\nbase_lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        parse_config(Config, ["--config", path])
    msg = str(e.value)
    assert "'base_lrr'" in msg and path in msg and "did you mean 'base_lr'" in msg


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError, match="'epoch' on the command line.*did you mean 'epochs'"):
        parse_config(Config, ["--epoch=2"])
    with pytest.raises(ConfigError, match="'zzz' on the command line"):
        parse_config(Config, ["--zzz"])


def test_command_line_syntax_errors():
    with pytest.raises(ConfigError, match="unexpected argument 'epochs=2'"):
        parse_config(Config, ["epochs=2"])
    with pytest.raises(ConfigError, match="--epochs needs a value"):
        parse_config(Config, ["--epochs"])


def test_config_files_are_layered(tmp_path):
    """--config twice: the files in order, a later file's keys win, the command line last; an unknown
    key is named with the file it is in."""
    (tmp_path / "a.yaml").write_text("epochs: 5\nbase_lr: 0.5\n")
    (tmp_path / "b.yaml").write_text("base_lr: 0.1\n")
    cfg = parse_config(Config, [f"--config={tmp_path / 'a.yaml'}", f"--config={tmp_path / 'b.yaml'}"])
    assert (cfg.epochs, cfg.base_lr) == (5, 0.1)
    cfg = parse_config(Config, [f"--config={tmp_path / 'b.yaml'}", f"--config={tmp_path / 'a.yaml'}", "--epochs=7"])
    assert (cfg.epochs, cfg.base_lr) == (7, 0.5)
    (tmp_path / "c.yaml").write_text("base_lrr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'base_lrr' in .*c.yaml"):
        parse_config(Config, [f"--config={tmp_path / 'a.yaml'}", f"--config={tmp_path / 'c.yaml'}"])


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"config file not found: {path}"):
        parse_config(Config, ["--config", path])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "epochs: 2\nwidths: [1.0, 0.5\n")
    with pytest.raises(ConfigError, match=f"cannot parse {path} at line 3"):
        parse_config(Config, ["--config", path])


def test_yaml_not_a_mapping(tmp_path):
    path = write(tmp_path, "- epochs\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_config(Config, ["--config", path])


def test_config_error_exits_with_one_line():
    with pytest.raises(SystemExit) as e:  # a script needs no try/except to print it
        parse_config(Config, ["--epoch=2"])
    assert isinstance(e.value.code, str) and e.value.code.startswith("config error:")


def test_unsupported_field_type_is_a_programming_error():
    @dataclass
    class Bad:
        pair: tuple[int, int] = (1, 2)  # not a supported config type

    with pytest.raises(TypeError, match="Bad.pair"):
        parse_config(Bad, [])


def test_save_config_round_trip(tmp_path):
    cfg = parse_config(Config, ["--epochs=3", "--precision=no", "--widths=0.25,1", "--tracker=wandb",
                                "--depths=[[2,2,2,2],[3,4,6,3]]", "--base_lr=1e-6"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    text = path.read_text()
    assert text.startswith("# git: ")
    assert yaml.safe_load(text)["precision"] == "no"  # quoted, not a YAML boolean
    assert parse_config(Config, ["--config", str(path)]) == cfg
    assert parse_config(Config, ["--config", str(save_config(Config(), tmp_path))]) == Config()


def test_help_lists_every_field_with_default_and_comment(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Config, ["--epochs=2", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == config_help(Config)
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    assert list(lines) == [f"--{name}" for name in Config.__dataclass_fields__]
    assert "100" in lines["--epochs"] and "passes over the training set" in lines["--epochs"]
    assert "[1.0, 0.5]" in lines["--widths"] and "widths to evaluate" in lines["--widths"]
    assert "null" in lines["--tracker"] and "str | None" in lines["--tracker"]


@dataclass
class Sectioned:
    # --- data
    loader: str = "torch"  # torch | device (batched on the device,
    # CIFAR scale) | ffcv
    # --- model
    arch: str = "r18"  # a key of ARCHS
    seed: int = 0


def test_help_prints_each_whole_comment_and_no_section_title():
    help_lines = {line.split()[0]: line for line in config_help(Sectioned).splitlines() if line.startswith("  --")}
    assert help_lines["--loader"].endswith("torch | device (batched on the device, CIFAR scale) | ffcv")
    assert help_lines["--arch"].endswith("a key of ARCHS") and "model" not in help_lines["--arch"]
    assert help_lines["--seed"].rstrip().endswith("0")  # no comment, and not the next section's title
