"""launch/: the 2-node Accelerate config and the SLURM script run as written, here as 2 "nodes" of
one CPU process each on this machine: a stand-in `srun` starts the script's task once per node with
SLURM_NODEID 0 and 1, a stand-in `scontrol` names this host, ACCELERATE_USE_CPU runs it without GPUs."""

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

FAKE_SRUN = """#!/bin/bash
# stand-in srun: the command once per node, in parallel, each with its SLURM_NODEID
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
echo 127.0.0.1
"""


def test_accelerate_config_is_two_nodes():
    cfg = yaml.safe_load((REPO / "launch" / "accelerate_2nodes.yaml").read_text())
    assert cfg["num_machines"] == 2 and cfg["distributed_type"] == "MULTI_GPU" and "mixed_precision" not in cfg


def test_slurm_script_trains_on_two_nodes(image_folder, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    with socket.socket() as s:  # a free port for the 2 "nodes" to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())) // 2)  # ours, shared by the 2 nodes
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(REPO),
           "GPUS_PER_NODE": "1", "MAIN_PORT": str(port), "ACCELERATE_USE_CPU": "true",
           "OMP_NUM_THREADS": str(threads)}
    # the recipe as the script gets it, on a tiny network (ResNet-18's blocks at a quarter of its widths)
    args = [f"--data_path={image_folder}", f"--out_dir={out}", "--arch=resnet18_cifar_tiny", "--image_size=16",
            "--max_steps=2", "--batch_size=8", "--log_every=1", "--num_workers=0", "--knn_bank_subset=40",
            "--knn_test_subset=20", "--knn_batch_size=20", "--knn_k=5", "--proj_hidden=64", "--proj_dim=32"]
    p = subprocess.run(["bash", "launch/slurm_2nodes.sbatch", "--config", "yaml/cifar10_quick.yaml", *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "2 process(es)" in p.stdout
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2
