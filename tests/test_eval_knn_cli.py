"""eval_knn.py as a command: results.json schema and plot for a random-init network and for a
backbone.pt checkpoint (widths and DSPNet dns), clear errors, 2 processes giving 1 process's numbers
(the calibration set is the same batches for any process count), and the device and ffcv loaders
giving the torch loader's features."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_knn
import knn
from config import ConfigError, parse_config
from models import ARCHS, profile
from tests.test_multiprocess import free_port, thread_env

REPO = Path(__file__).resolve().parents[1]
FAST = ["--bank_subset=60", "--test_subset=30", "--calib_images=40", "--batch_size=20", "--k=5,20"]


@pytest.fixture(autouse=True)
def one_thread():
    """NOTE: on the shared 2-core machine, 1 thread ran the in-process tests 3x faster than 2."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_two_processes(args):
    """eval_knn.py as a command, launched as 2 CPU processes by accelerate (a free port each time; the
    threads of this process shared between the 2)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(REPO / "eval_knn.py"), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", **thread_env(2)}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)


def check_results(out_dir, names, ks=("5", "20")):
    res = json.loads((out_dir / "results.json").read_text())
    assert list(res) == names
    for r in res.values():
        assert {"top1", "top5", "params", "macs", "top1_k"} <= set(r)
        assert set(r["top1_k"]) == set(ks) and r["top1"] == r["top1_k"][ks[-1]]
        assert all(0.0 <= a <= 1.0 for a in [r["top1"], r["top5"], *r["top1_k"].values()])
        assert r["top5"] >= r["top1"] and r["params"] > 0 and r["macs"] > 0
    assert (out_dir / "knn.png").stat().st_size > 1000 and (out_dir / "config.yaml").is_file()
    return res


def main(argv):  # in-process: no interpreter start-up and imports (about 4 s a run here)
    return eval_knn.main(parse_config(eval_knn.Config, argv))


def test_random_init(image_folder, tmp_path, capsys):
    main(["--arch=resnet18_cifar_tiny", "--widths=1.0,0.25", f"--data_path={image_folder}", f"--out_dir={tmp_path}",
          *FAST])
    res = check_results(tmp_path, ["1.0", "0.25"])
    model = ARCHS["resnet18_cifar_tiny"]()
    for w in (1.0, 0.25):  # the sub-network's figures at the eval image size, 32 px
        assert (res[str(w)]["params"], res[str(w)]["macs"]) == profile(model, w, input_size=32)
    out = capsys.readouterr().out
    assert "1 process(es)" in out and "k=20" in out and "kNN T=0.1 " in out  # CIFAR's temperature by default


def test_imagenet_temperature_by_default(image_folder, tmp_path, capsys):
    """temperature=0 (the default) is DINO's 0.07 on ImageNet; an explicit one is kept."""
    args = ["--arch=resnet18_cifar_tiny", "--widths=1.0", f"--data_path={image_folder}", "--dataset=imagenet",
            "--bank_subset=10", "--test_subset=10", "--calib_images=10", "--batch_size=10", "--k=5"]
    main([*args, f"--out_dir={tmp_path / 'a'}"])
    assert "kNN T=0.07 " in capsys.readouterr().out
    main([*args, f"--out_dir={tmp_path / 'b'}", "--temperature=0.2"])
    assert "kNN T=0.2 " in capsys.readouterr().out


def make_ckpt(path, arch="resnet18_cifar_tiny", **extra):
    torch.manual_seed(1)
    sd = ARCHS[arch]().state_dict() if arch in ARCHS else {}
    torch.save({"arch": arch, "backbone": sd, "teacher": sd, "widths": [1.0, 0.5], "width_min": 0.5, "step": 0,
                "config": {"data_path": "unused", "dataset": "cifar10"}, **extra}, path)


def test_checkpoint_widths_and_dns(image_folder, tmp_path):
    make_ckpt(tmp_path / "backbone.pt")
    main([f"--ckpt={tmp_path / 'backbone.pt'}", "--teacher", f"--data_path={image_folder}",
          f"--out_dir={tmp_path / 'a'}", *FAST])
    check_results(tmp_path / "a", ["1.0", "0.5"])  # the checkpoint's default widths
    make_ckpt(tmp_path / "dsp.pt", dns=[{"width": 1.0, "depth": None}, {"width": 1.0, "depth": [2, 1, 1, 1]},
                                       {"width": 2 / 3, "depth": [1, 1, 1, 1]}])  # as train_dspnet.py saves them
    main([f"--ckpt={tmp_path / 'dsp.pt'}", f"--data_path={image_folder}", f"--out_dir={tmp_path / 'b'}", *FAST])
    res = check_results(tmp_path / "b", ["1.0", "1.0_d2-1-1-1", "0.6667_d1-1-1-1"])  # every DN, by default
    assert res["0.6667_d1-1-1-1"]["macs"] < res["1.0_d2-1-1-1"]["macs"] < res["1.0"]["macs"]


@pytest.mark.parametrize("args,message", [
    (["--ckpt=/nonexistent/backbone.pt"], "checkpoint not found: /nonexistent/backbone.pt"),
    (["--ckpt={tmp}/bad.pt"], "has arch 'resnet999'"),
    (["--arch=resnet18_cifar", "--widths=1.0,1.5"], "widths must lie in (0, 1], got [1.5]"),
    (["--arch=resnet18_cifar", "--widths=0"], "widths must lie in (0, 1], got [0.0]"),
    ([], "give --ckpt, or --arch"),
])
def test_clear_errors(tmp_path, args, message):
    make_ckpt(tmp_path / "bad.pt", arch="resnet999")
    with pytest.raises(ConfigError) as e:  # a SystemExit: one line, no traceback
        main([a.format(tmp=tmp_path) for a in args] + [f"--out_dir={tmp_path}"])
    assert message in str(e.value)


def test_two_processes_equal_one(image_folder, tmp_path):
    args = ["--arch=resnet18_cifar_tiny", "--widths=1.0,0.5", f"--data_path={image_folder}", "--autocast=false",
            *FAST]
    # 1 process here, with the thread count each of the 2 gets: a thread count cannot change a sum's order
    torch.set_num_threads(int(thread_env(2)["OMP_NUM_THREADS"]))  # one_thread restores it
    main(args + [f"--out_dir={tmp_path / 'one'}"])
    two = run_two_processes(args + [f"--out_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    ref, got = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert got == ref


class FeatureLog(dict):
    """module.extract_features patched to keep what each call returns, (features, labels, indices), in
    the list of the loader kind being run: log.kind = "torch"; ...; log["torch"] lists its passes."""

    def __init__(self, monkeypatch, module):
        super().__init__()
        real = module.extract_features

        def recorded(*args, **kw):
            out = real(*args, **kw)
            self.setdefault(self.kind, []).append(out)
            return out

        monkeypatch.setattr(module, "extract_features", recorded)


def test_device_and_ffcv_loaders_equal_torch(image_folder, tmp_path, monkeypatch):
    """loader=device (tensors on the device) and loader=ffcv (a raw .beton: the same pixels) feed the network
    the torch loader's images: the same bank and test features at every width, in the same order with the
    same labels (on the whole, small, splits); subsets with ffcv are a clear error."""
    import ffcv_data
    pytest.importorskip("ffcv")
    ffcv_data.write_beton(image_folder, tmp_path / "beton", raw=True, num_workers=1)
    common = ["--arch=resnet18_cifar_tiny", "--widths=1.0,0.25", f"--data_path={image_folder}", "--calib_images=40",
              "--batch_size=50", "--k=5,20", "--autocast=false"]
    features, res = FeatureLog(monkeypatch, knn), {}  # knn_eval's features of each pass
    for kind in ("torch", "device", "ffcv"):
        features.kind = kind
        res[kind] = main([*common, f"--loader={kind}", f"--ffcv_path={tmp_path / 'beton'}",
                          f"--out_dir={tmp_path / kind}"])
    assert [len(f) for f, _, _ in features["torch"]] == [200, 100, 200, 100]  # bank and test, at each width
    for kind in ("device", "ffcv"):
        for (f, y, idx), (ref_f, ref_y, ref_idx) in zip(features[kind], features["torch"], strict=True):
            assert torch.equal(y.cpu(), ref_y) and torch.equal(idx.cpu(), ref_idx), kind
            torch.testing.assert_close(f.cpu(), ref_f, rtol=0, atol=1e-5, msg=kind)
    assert res["device"] == res["torch"]
    with pytest.raises(ConfigError, match="bank_subset"):
        main([*common, "--loader=ffcv", f"--ffcv_path={tmp_path / 'beton'}", "--bank_subset=50",
              f"--out_dir={tmp_path / 'x'}"])


def test_vit_images_at_its_input_size(image_folder, tmp_path, monkeypatch, capsys):
    """A random-init ViT that fixes its input size (48 px here, the release's Table 3 ViT: 224 px) gets CIFAR
    upsampled to it on every loader (data.eval_transform; cached and on the device each batch is upsampled as
    it is served): the same features, and MACs counted at 48 px (loader=ffcv: tests/test_knn.py)."""
    import functools

    from models import ViT

    monkeypatch.setitem(ARCHS, "vit_48_test", functools.partial(ViT, 32, 1, 2, img_size=48, patch_size=16,
                                                                 slim="input"))
    common = ["--arch=vit_48_test", "--widths=1.0,0.5", f"--data_path={image_folder}", "--bank_subset=40",
              "--test_subset=20", "--calib_images=20", "--batch_size=16", "--k=5", "--autocast=false"]
    features, res = FeatureLog(monkeypatch, knn), {}  # (a 32 px batch fails the ViT: 5 tokens, 10 position embeddings)
    for kind in ("torch", "cache", "device"):
        features.kind = kind
        loader = "--cache=true" if kind == "cache" else f"--loader={kind}"
        res[kind] = main([*common, loader, f"--out_dir={tmp_path / kind}"])
    assert "MACs at 48 px" in capsys.readouterr().out
    model = ARCHS["vit_48_test"]()
    assert [(r["params"], r["macs"]) for r in res["torch"].values()] == [profile(model, w, input_size=48)
                                                                        for w in (1.0, 0.5)]
    for kind in ("cache", "device"):
        assert res[kind] == res["torch"]
        for (f, y, idx), (ref_f, ref_y, ref_idx) in zip(features[kind], features["torch"], strict=True):
            assert torch.equal(y.cpu(), ref_y) and torch.equal(idx.cpu(), ref_idx)
            torch.testing.assert_close(f.cpu(), ref_f, rtol=0, atol=1e-6, msg=kind)


def test_normalization_defaults_to_the_checkpoints(image_folder, tmp_path, monkeypatch, capsys):
    """mean/std empty: the checkpoint's training run's (backbone.pt's config), as for dataset; given: these
    (both, or a one-line error naming the key). eval_knn.py and eval_linear.py see the same images whether
    the run's mean/std come from the checkpoint or the command line, other images than the preset's."""
    import eval_linear

    custom = ["--mean=[0.45,0.5,0.55]", "--std=[0.2,0.25,0.3]"]
    make_ckpt(tmp_path / "plain.pt")  # a run of the preset normalization (or from before the keys existed)
    make_ckpt(tmp_path / "own.pt", config={"dataset": "cifar10", "mean": [0.45, 0.5, 0.55], "std": [0.2, 0.25, 0.3]})
    ckpt = torch.load(tmp_path / "own.pt", weights_only=True)
    cfg = parse_config(eval_knn.Config, [])
    assert eval_knn.eval_data(cfg, ckpt) == ("cifar10", ((0.45, 0.5, 0.55), (0.2, 0.25, 0.3)))
    assert eval_knn.eval_data(cfg, {}) == ("cifar10", eval_knn.data.MEAN_STD["cifar10"])
    assert eval_knn.eval_data(parse_config(eval_knn.Config, ["--dataset=imagenet"]), {}) == (
        "imagenet", eval_knn.data.MEAN_STD["imagenet"])
    keys = parse_config(eval_knn.Config, ["--mean=0.5,0.5,0.5", "--std=0.1,0.1,0.1"])
    assert eval_knn.eval_data(keys, ckpt)[1] == ((0.5,) * 3, (0.1,) * 3)  # the command line wins
    with pytest.raises(ConfigError, match=r"^config error: mean=\[0.5, 0.5, 0.5\] without std"):
        eval_knn.eval_data(parse_config(eval_knn.Config, ["--mean=0.5,0.5,0.5"]), ckpt)

    knn_features, linear_features = FeatureLog(monkeypatch, knn), FeatureLog(monkeypatch, eval_linear)
    linear = ["--widths=0.5", "--train_subset=40", "--test_subset=20", "--calib_images=20", "--batch_size=20",
              "--epochs=1"]
    for kind, args in (("ckpt", ["--ckpt={tmp}/own.pt"]), ("keys", ["--ckpt={tmp}/plain.pt", *custom]),
                       ("preset", ["--ckpt={tmp}/plain.pt"])):
        knn_features.kind = linear_features.kind = kind
        args = [a.format(tmp=tmp_path) for a in args] + [f"--data_path={image_folder}", "--autocast=false"]
        main([*args, *FAST, "--widths=0.5", f"--out_dir={tmp_path / kind / 'knn'}"])
        eval_linear.main(parse_config(eval_linear.Config, [*args, *linear, f"--out_dir={tmp_path / kind / 'lin'}"]))
    assert "on cifar10, mean [0.45, 0.5, 0.55] std [0.2, 0.25, 0.3] (" in capsys.readouterr().out
    for log in (knn_features, linear_features):
        for (f, _, _), (g, _, _), (h, _, _) in zip(log["ckpt"], log["keys"], log["preset"], strict=True):
            assert torch.equal(f, g) and not torch.allclose(f, h, atol=1e-3)
