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
# stand-in srun: the command once per node, in parallel, each with its SLURM_NODEID; its options go to SRUN_LOG
opts=()
while [[ "$1" == --* ]]; do opts+=("$1"); shift; done
[ -z "${SRUN_LOG:-}" ] || echo "${opts[@]}" > "$SRUN_LOG"
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
echo 127.0.0.1
"""
FAKE_ACCELERATE = """#!/bin/bash
# stand-in accelerate: prints the node's arguments instead of training
echo "node $SLURM_NODEID: $*"
"""


def _fake_bin(tmp_path, names):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in names:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def _slurm_env(bin_dir, **slurm):
    """This environment less any SLURM_* / GPUS_PER_NODE of the machine running the tests, plus `slurm`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "GPUS_PER_NODE"}
    env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**env, "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(REPO), **slurm}


def test_accelerate_config_is_two_nodes():
    cfg = yaml.safe_load((REPO / "launch" / "accelerate_2nodes.yaml").read_text())
    assert cfg["num_machines"] == 2 and cfg["distributed_type"] == "MULTI_GPU" and "mixed_precision" not in cfg


def test_slurm_script_trains_on_two_nodes(image_folder, tmp_path):
    bin_dir = _fake_bin(tmp_path, (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)))
    with socket.socket() as s:  # a free port for the 2 "nodes" to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())) // 2)  # ours, shared by the 2 nodes
    # the counts come from the allocation as SLURM states it: 2 nodes, 1 "GPU" and `threads` CPUs each
    env = {**_slurm_env(bin_dir, SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="1",
                        SLURM_CPUS_PER_TASK=str(threads)),
           "MAIN_PORT": str(port), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(threads),
           "SRUN_LOG": str(tmp_path / "srun.log")}
    # the recipe as the script gets it, on a tiny network (ResNet-18's blocks at a quarter of its widths)
    args = [f"--data_path={image_folder}", f"--out_dir={out}", "--arch=resnet18_cifar_tiny", "--image_size=16",
            "--max_steps=2", "--batch_size=8", "--log_every=1", "--num_workers=0", "--knn_bank_subset=40",
            "--knn_test_subset=20", "--knn_batch_size=20", "--knn_k=5", "--proj_hidden=64", "--proj_dim=32"]
    p = subprocess.run(["bash", "launch/slurm_2nodes.sbatch", "--config", "yaml/cifar10_quick.yaml", *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "2 process(es)" in p.stdout
    assert f"--cpus-per-task={threads}" in (tmp_path / "srun.log").read_text().split()
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2


def test_slurm_script_counts_follow_the_allocation(tmp_path):
    """3 nodes x 4 typed GPUs, 32 CPUs per task: 12 processes, srun told the CPUs; no GPUs: a clear error."""
    bin_dir = _fake_bin(tmp_path, (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("accelerate", FAKE_ACCELERATE)))
    # submitted from tmp_path, which has no .venv whose `accelerate` would come before the stand-in on PATH
    script = str(REPO / "launch" / "slurm_2nodes.sbatch")
    env = _slurm_env(bin_dir, SLURM_NNODES="3", SLURM_JOB_NUM_NODES="3", SLURM_GPUS_PER_NODE="h100:4",
                     SLURM_CPUS_PER_TASK="32", SLURM_SUBMIT_DIR=str(tmp_path), SRUN_LOG=str(tmp_path / "srun.log"))
    p = subprocess.run(["bash", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    nodes = sorted(line for line in p.stdout.splitlines() if line.startswith("node "))
    assert [line.split(":")[0] for line in nodes] == ["node 0", "node 1", "node 2"]
    for rank, line in enumerate(nodes):
        assert f"--num_machines 3 --machine_rank {rank} --num_processes 12 " in line, line
    assert {"--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=32"} <= set((tmp_path / "srun.log").read_text().split())

    env = _slurm_env(bin_dir, SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_CPUS_PER_TASK="8",
                     SLURM_SUBMIT_DIR=str(tmp_path))
    p = subprocess.run(["bash", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and "--gpus-per-node" in p.stderr
