"""bench/gpu_check.py --smoke: every part of the GPU check runs at toy size on a CPU and the JSON has
every key (a GPU session then runs the same script at full size, with no surprise)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ["device", "torch", "precision", "plain_img_per_s", "us3l_img_per_s", "us3l_vs_limit", "p3_time_ratio",
        "p4_224_ratio", "copy_224_ratio", "loader_img_per_s", "loader_vs_us3l", "cifar10_knn", "dspnet_p5"]


def test_smoke(image_folder, tmp_path):
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", f"--out={tmp_path}",
                        f"--data_path={image_folder}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["errors"] == {}, res["errors"]
    for key in KEYS:
        assert res[key] is not None, key
    assert set(res["loader_img_per_s"]) == {"torch", "ffcv"} and all(v > 0 for v in res["loader_img_per_s"].values())
    knn = res["cifar10_knn"]
    assert knn["steps"] == 2 and set(knn["knn_top1"]) == {"1.0", "0.75", "0.5", "0.25"}  # the quick recipe's knn_widths
    assert 0 < res["us3l_vs_limit"] and 0 < res["p3_time_ratio"] and 0 < res["dspnet_p5"]
    assert "p4_224_ratio" in p.stdout and "wrote" in p.stdout
