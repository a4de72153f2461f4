"""bench/gpu_check.py --smoke and bench/gpu_session.sh SMOKE=1: every part and every step of the GPU
session runs at toy size on a CPU and writes its JSON (a GPU slot then runs the same at full size, with no
surprise), on a machine without `datasets`, `ffcv` and ONNX as well: only the rows that need them are null."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.conftest import CIFAR10_TAR

REPO = Path(__file__).resolve().parents[1]
ROWS = ["data", "plain_img_per_s", "us3l_img_per_s", "us3l_vs_limit", "p3_time_ratio", "p3_macs_ratio", "copy_224_ratio",
        "p4_224_ratio", "loader_torch_img_per_s", "loader_torch_vs_us3l", "loader_ffcv_img_per_s", "loader_ffcv_vs_us3l",
        "dspnet_p5", "dspnet_p5_macs", "cifar10_knn"]
FFCV_ROWS = {"loader_ffcv_img_per_s", "loader_ffcv_vs_us3l"}
# run the script with these modules unimportable (None in sys.modules: `import ffcv` raises ImportError)
WITHOUT = ("import runpy, sys; sys.modules.update(dict.fromkeys(['datasets', 'ffcv', 'onnx', 'onnxruntime', "
           "'onnxscript'])); sys.path.insert(0, 'bench'); sys.argv[0] = 'bench/gpu_check.py'; "
           "runpy.run_path('bench/gpu_check.py', run_name='__main__')")


def tiny_tarball(image_folder, path):
    """The CIFAR-10 tarball's layout (cifar10/{train,test}/<class>/NNNN.jpg) from the generated images."""
    with tarfile.open(path, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(image_folder / split, arcname=f"cifar10/{split}")
    return path


def test_smoke_without_datasets_ffcv_onnx(image_folder, tmp_path):
    tar = CIFAR10_TAR if CIFAR10_TAR.is_file() else tiny_tarball(image_folder, tmp_path / "cifar10-jpg.tar.gz")
    data_path = tmp_path / "data" / "cifar10"  # missing: part data extracts the tarball into it
    p = subprocess.run([sys.executable, "-c", WITHOUT, "--smoke", f"--out={tmp_path / 'out'}", f"--data_tar={tar}",
                        f"--data_path={data_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert set(res["errors"]) == {"beton", "loader_ffcv"}, res["errors"]  # FFCV's part, and the one reading its file
    assert "FFCV" in res["errors"]["beton"] and res["errors"]["loader_ffcv"] == "skipped: part beton failed"
    for key in ROWS:
        assert key in res, key
        assert (res[key] is None) == (key in FFCV_ROWS), key
    assert res["not_run"] == [] and res["torch"] == __import__("torch").__version__ and res["device"].startswith("cpu")
    assert res["data"]["path"] == str(data_path) and res["data"]["train_images"] == (50_000 if tar == CIFAR10_TAR else 200)
    assert (data_path / ".extracted").is_file()
    assert res["loader_torch_img_per_s"] > 0 and res["loader_torch_vs_us3l"] > 0
    knn = res["cifar10_knn"]
    assert knn["steps"] == 2 and set(knn["knn_top1"]) == {"1.0", "0.75", "0.5", "0.25"}  # the quick recipe's knn_widths
    assert 0 <= knn["data_wait"] < 1 and knn["img_per_s"] > 0
    assert 0 < res["us3l_vs_limit"] and 0 < res["p3_time_ratio"] and 0 < res["dspnet_p5"] and 0 < res["p4_224_ratio"]
    assert "p4_224_ratio" in p.stdout and "wrote" in p.stdout


def test_session_smoke(image_folder, tmp_path):
    """gpu_session.sh SMOKE=1: each step runs at toy size and the summary records it; the kill-and-resume
    step resumes from a checkpoint and logs every step once; gpu_check's FFCV loader part runs here."""
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "OUT": str(out), "DATA_PATH": str(tmp_path / "cifar10"),
           "CIFAR10_TAR": str(tiny_tarball(image_folder, tmp_path / "tiny.tar.gz"))}
    p = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["cuda_tests", "sync_debug", "knn_memory", "devices", "gpu_check", "quick_fp16"]
    assert summary["ok"] and summary["smoke"], {k: (s["rc"], (out / s["log"]).read_text()[-1500:]) for k, s in steps.items()}
    assert all(not s["timed_out"] and 0 < s["seconds"] < s["limit_s"] for s in steps.values())
    tests = steps["cuda_tests"]["result"]
    assert tests["tests"] >= 3 and tests["failures"] == tests["errors"] == 0
    assert tests["skipped"] == (0 if __import__("torch").cuda.is_available() else tests["tests"])  # "needs CUDA"
    assert steps["sync_debug"]["result"]["errors"] == {} and "not checked" in steps["sync_debug"]["result"]["sync_at"]
    assert steps["knn_memory"]["result"]["knn_memory"]["bank"] == [4096, 64]
    devices = steps["devices"]["result"]
    assert devices["errors"] == {} and devices["sync_bn"]["python_ms"] > 0 and devices["sync_bn"]["local_ms"] > 0
    assert (devices["sync_bn"]["fused_ms"] is None) == (not __import__("torch").cuda.is_available())
    if __import__("torch").cuda.device_count() < 2:
        assert devices["ffcv_contexts"]["checked"] is False  # it cannot show on one GPU
    check = steps["gpu_check"]["result"]
    assert check["data"]["train_images"] == 200 and check["not_run"] == []
    if importlib.util.find_spec("ffcv"):
        assert check["errors"] == {} and check["loader_ffcv_img_per_s"] > 0
    quick = steps["quick_fp16"]["result"]
    assert quick["first_rc"] == -9 and quick["killed_after_step"] >= 3 and quick["resumed_from"] in (2, 4)
    assert quick["second_rc"] == 0 and quick["logged_steps_once"] and set(quick["knn_top1"]) == {"1.0", "0.75", "0.5", "0.25"}
    assert not list(out.rglob("*.pt"))  # checkpoints do not travel back


def test_missing_data_nulls_its_rows_only(tmp_path):
    """No tarball: part data fails, the parts that need it are skipped, the others run, the JSON is written."""
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", f"--out={tmp_path}", "--parts=copy_224,cifar10_knn",
                        f"--data_tar={tmp_path / 'missing.tar.gz'}", f"--data_path={tmp_path / 'cifar10'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["parts"] == ["data", "copy_224", "cifar10_knn"] and res["not_run"] == []  # data: cifar10_knn needs it
    assert res["errors"]["data"].startswith("FileNotFoundError") and "missing.tar.gz" in res["errors"]["data"]
    assert res["errors"]["cifar10_knn"] == "skipped: part data failed" and set(res["errors"]) == {"data", "cifar10_knn"}
    assert res["data"] is None and res["cifar10_knn"] is None and res["copy_224_ratio"] > 0


def test_cudnn_widths_part(tmp_path):
    """--parts cudnn_widths (opt-in): cudnn.benchmark on, off, and on with width_grid 1/64, each in a process of
    its own, over steps that draw new widths; at toy size here (the cudnn flag is a no-op on a CPU)."""
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", f"--out={tmp_path}", "--parts=cudnn_widths"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["parts"] == ["cudnn_widths"] and res["errors"] == {} and res["not_run"] == []
    settings = {"bench_on", "bench_off", "bench_on_grid64"}
    for key in ("cudnn_widths_ms", "cudnn_widths_new_ms"):
        assert set(res[key]) == settings and all(v > 0 for v in res[key].values()), res[key]
    assert set(res["cudnn_widths_known_ms"]) == settings  # null where every step met a new shape
    assert all(v is None or v > 0 for v in res["cudnn_widths_known_ms"].values())
    cuda = __import__("torch").cuda.is_available()
    for key in ("cudnn_widths_reserved_mb", "cudnn_widths_allocated_mb"):
        assert (res[key] is None) == (not cuda), res[key]
    if cuda:
        assert all(res["cudnn_widths_reserved_mb"][k] >= res["cudnn_widths_allocated_mb"][k] > 0 for k in settings)
    setup = res["cudnn_widths_setup"]
    assert setup["steps"] == 6 and setup["arch"] == "resnet18_cifar_tiny"
    for grid in ("", "_grid64"):  # a shape is a function of the width; the first step's R_min 0.75 is new
        assert 2 <= setup[f"shapes{grid}"] <= setup[f"widths{grid}"] and 1 <= setup[f"new_steps{grid}"] <= 6
    assert "cudnn_widths_ms" in p.stdout and "bench_on_grid64" in p.stdout


def test_nvidia_smi_parsing():
    """bench_devices.parse_smi (the ffcv_contexts check): the GPUs holding a context of a process, from
    nvidia-smi's bus ids, and each GPU's used memory."""
    spec = importlib.util.spec_from_file_location("bench_devices", REPO / "bench" / "bench_devices.py")
    spec.loader.exec_module(bench_devices := importlib.util.module_from_spec(spec))
    gpus = "0, 00000000:18:00.0, 1033\n1, 00000000:3B:00.0, 20500\n"
    apps = "4242, 00000000:18:00.0\n4242, 00000000:3b:00.0\n777, 00000000:3B:00.0\n"
    assert bench_devices.parse_smi(gpus, apps, 4242) == {"pid_on": [0, 1], "used_mib": [1033.0, 20500.0]}
    assert bench_devices.parse_smi(gpus, apps, 777)["pid_on"] == [1]
    assert bench_devices.parse_smi(gpus, "No running processes found\n", 4242)["pid_on"] == []
