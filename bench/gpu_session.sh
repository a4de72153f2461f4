#!/usr/bin/env bash
# The one prepared command for a short GPU slot (at most 10 minutes of wall time on a bare machine that
# has only this working tree, its own PyTorch, no internet): every step below has a hard time limit, a
# step that fails or times out is recorded and the next one runs, and OUT/summary.json is rewritten
# after every step (a session cut short still leaves one).
#
#   CIFAR10_TAR=carry/cifar10-jpg.tar.gz bash bench/gpu_session.sh      # the GPU slot; OUT=out/gpu_session
#   SMOKE=1 CIFAR10_TAR=T DATA_PATH=D OUT=O bash bench/gpu_session.sh    # every step at toy size, CPU (< 1 min)
#
# Steps (limit in seconds on the GPU; worst case 595 s in all, plus the summaries):
#   cuda_tests   60   the tests that skip with "needs CUDA" on a CPU (found by that reason in tests/), pytest;
#                     without pytest it is installed first from wheels in $WHEELS (carry/wheels) when there
#                     (tests/test_sync_bn.py's: torch's fused sync-BN kernels against the reference Function)
#   sync_debug   45   gpu_check.py --parts sync_debug: one warmed-up step of the quick recipe's hot loop under
#                     torch.cuda.set_sync_debug_mode("error"): does it make no host sync
#   knn_memory   60   gpu_check.py --parts knn_memory: peak GPU memory and seconds of knn.knn_accuracy on a
#                     random 1,281,167 x 2048 fp32 bank (ImageNet's size), 10k queries
#   devices      50   gpu_check.py --parts sync_bn,ffcv_contexts (bench/bench_devices.py): sync BN's fused kernels
#                     against the Function in ms, one process per GPU; with 2+ GPUs, whether a process on cuda:1
#                     reading FFCV opens a context on GPU 0 (1 GPU: checked false, it cannot show)
#   gpu_check    270  gpu_check.py --data_tar $CIFAR10_TAR --data_path $DATA_PATH --knn_minutes 0.5: its default
#                     parts (the tarball is extracted into DATA_PATH by its part `data`)
#   quick_fp16   110  the quick recipe with --precision=fp16 for 30 steps (train_subset 10240, kNN monitor on
#                     2000 / 500 images), killed with SIGKILL once it logged step 15, then the same command
#                     again: it resumes from its last checkpoint and finishes (OUT/quick_fp16.json)
# Inputs (environment): OUT (out/gpu_session), PYTHON (python), CIFAR10_TAR (else cifar10-jpg.tar.gz in carry/,
# shared/data/ or data/ of this tree, else data.py's default), DATA_PATH (data/cifar10: outside OUT, whose
# files travel back), WHEELS (carry/wheels), SMOKE=1 or --smoke. Checkpoints (*.pt) are deleted after each
# step: OUT keeps logs and JSON only.

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_session}
PY=${PYTHON:-python}
SMOKE=${SMOKE:-0}
[ "${1:-}" = "--smoke" ] && SMOKE=1
WHEELS=${WHEELS:-carry/wheels}
DATA_PATH=${DATA_PATH:-data/cifar10}
if [ -z "${CIFAR10_TAR:-}" ]; then
    for t in carry/cifar10-jpg.tar.gz shared/data/cifar10-jpg.tar.gz data/cifar10-jpg.tar.gz; do
        [ -f "$t" ] && CIFAR10_TAR=$t && break
    done
fi
export CIFAR10_TAR=${CIFAR10_TAR:-}
mkdir -p "$OUT"
rm -f "$OUT/steps.jsonl"
SMOKE_FLAG=()
[ "$SMOKE" = 1 ] && SMOKE_FLAG=(--smoke)

summarize() {  # OUT/summary.json from OUT/steps.jsonl and each step's own results
    "$PY" - "$OUT" "$SMOKE" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

out, smoke = sys.argv[1], sys.argv[2] == "1"

def read(path):
    try:
        with open(os.path.join(out, path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

steps = {}
with open(os.path.join(out, "steps.jsonl")) as f:
    for line in f:
        rec = json.loads(line)
        steps[rec.pop("step")] = rec
if "cuda_tests" in steps:
    try:
        suite = ET.parse(os.path.join(out, "cuda_tests.xml")).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        steps["cuda_tests"]["result"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except (OSError, ET.ParseError, AttributeError):
        steps["cuda_tests"]["result"] = None
for name, keys in (("sync_debug", ["sync_free_step", "sync_at"]), ("knn_memory", ["knn_memory"]),
                   ("devices", ["sync_bn", "ffcv_contexts"]), ("gpu_check", None)):
    res = read(f"{name}/gpu_check.json")
    if name in steps and res:
        rows = {k: res.get(k) for k in keys} if keys else {k: v for k, v in res.items() if k not in (
            "device", "torch", "cuda", "python", "precision", "cudnn_benchmark", "smoke", "parts", "seconds")}
        steps[name]["result"] = {**rows, "errors": res["errors"], "not_run": res["not_run"]}
if "quick_fp16" in steps:
    steps["quick_fp16"]["result"] = read("quick_fp16.json")
machine = next((read(f"{n}/gpu_check.json") for n in ("sync_debug", "knn_memory", "gpu_check")
                if read(f"{n}/gpu_check.json")), {})
summary = {"smoke": smoke, **{k: machine.get(k) for k in ("device", "torch", "cuda", "precision")},
           "ok": all(s["rc"] == 0 for s in steps.values()), "steps": steps}
with open(os.path.join(out, "summary.json.tmp"), "w") as f:
    json.dump(summary, f, indent=1)
os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
print(f"[{list(steps)[-1]}: rc {steps[list(steps)[-1]]['rc']}, {steps[list(steps)[-1]]['seconds']:.0f} s]", flush=True)
EOF
}

step() {  # step NAME LIMIT_S CMD...: CMD under a hard time limit (SIGTERM, SIGKILL 10 s later), output in OUT/NAME.log
    local name=$1 limit=$2 t0=$EPOCHREALTIME rc
    shift 2
    echo "== $name (limit $limit s): $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    find "$OUT" -name '*.pt' -delete  # checkpoints stay behind: only logs and JSON travel back
    printf '{"step": "%s", "rc": %d, "timed_out": %s, "seconds": %s, "limit_s": %d, "log": "%s.log"}\n' "$name" \
        "$rc" "$([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)" \
        "$(awk "BEGIN {print $EPOCHREALTIME - $t0}")" "$limit" "$name" >> "$OUT/steps.jsonl"
    summarize
}

# (a) the tests that need CUDA: each is marked skipif(..., reason="needs CUDA") right above its def
mapfile -t CUDA_TESTS < <(grep -A1 'reason="needs CUDA"' tests/test_*.py \
    | sed -n 's/^\(tests\/test_[A-Za-z0-9_]*\.py\)-def \([A-Za-z0-9_]*\)(.*/\1::\2/p')
step cuda_tests 60 bash -c '[ $# -ge 3 ] || { echo "no test marked reason=\"needs CUDA\" found in tests/"; exit 1; }
    if ! "$0" -c "import pytest" 2> /dev/null; then
        echo "no pytest here: installing it from the wheels in $1"
        "$0" -m pip install -q --no-index --find-links "$1" pytest || exit 1
    fi
    exec "$0" -m pytest -q -p no:cacheprovider --junitxml="$2" "${@:3}"' \
    "$PY" "$WHEELS" "$OUT/cuda_tests.xml" "${CUDA_TESTS[@]}"

# (d) no host sync in a warmed-up training step; (e) the kNN search's memory at ImageNet size
step sync_debug 45 "$PY" bench/gpu_check.py --parts sync_debug --out "$OUT/sync_debug" "${SMOKE_FLAG[@]}"
step knn_memory 60 "$PY" bench/gpu_check.py --parts knn_memory --out "$OUT/knn_memory" "${SMOKE_FLAG[@]}"
# (f) per-process device work: sync BN's fused kernels against the Function (A/B), FFCV's stray context on GPU 0
step devices 50 "$PY" bench/gpu_check.py --parts sync_bn,ffcv_contexts --out "$OUT/devices" "${SMOKE_FLAG[@]}"

# (b) the GPU check (smoke: its data part and the FFCV loader with its inputs; tests/test_gpu_check.py runs
# every part without FFCV)
TAR_FLAG=()
[ -n "$CIFAR10_TAR" ] && TAR_FLAG=(--data_tar "$CIFAR10_TAR")
PARTS_FLAG=()
[ "$SMOKE" = 1 ] && PARTS_FLAG=(--parts data,loader_ffcv)
step gpu_check 270 "$PY" bench/gpu_check.py --out "$OUT/gpu_check" --data_path "$DATA_PATH" --knn_minutes 0.5 \
    "${TAR_FLAG[@]}" "${PARTS_FLAG[@]}" "${SMOKE_FLAG[@]}"

# (c) fp16 quick recipe, killed mid-run and resumed by the same command
step quick_fp16 110 "$PY" - "$OUT" "$DATA_PATH" "$SMOKE" <<'EOF'
import json, os, subprocess, sys, time

import torch

import data

out, data_path, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
run_dir = os.path.join(out, "quick_fp16")
if not os.path.isdir(data_path):  # gpu_check's part data extracts it; without that step, here
    data.prepare_cifar10(data_path, tar=os.environ.get("CIFAR10_TAR") or None)
total, kill_at = (6, 3) if smoke else (30, 15)
cmd = [sys.executable, "train_us3l.py", "--config", "yaml/cifar10_quick.yaml", f"--data_path={data_path}",
       f"--out_dir={run_dir}", f"--max_steps={total}", "--log_every=1", "--resume=auto"]
if smoke:  # fp16 autocast is CUDA's: the CPU runs the same kill and resume in bf16
    cmd += ["--precision=bf16", "--save_every=2", "--batch_size=8", "--train_subset=64", "--knn_bank_subset=40",
            "--knn_test_subset=20", "--knn_batch_size=20", "--knn_k=5", "--proj_hidden=64", "--proj_dim=32",
            "--arch=resnet18_cifar_tiny"]
else:
    cmd += ["--precision=fp16", "--save_every=5", "--train_subset=10240", "--knn_bank_subset=2000",
            "--knn_test_subset=500"]
log_path, ckpt = os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "checkpoints", "last.pt")


def logged():
    try:
        with open(log_path) as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n")]
    except (OSError, ValueError):
        return []


res = {"command": " ".join(cmd), "steps": total}
print(res["command"], flush=True)
first = subprocess.Popen(cmd)
while first.poll() is None and max(logged(), default=0) < kill_at:
    time.sleep(0.05)
if first.poll() is None:
    first.kill()  # SIGKILL: no clean-up, as a lost machine
first.wait()
res["first_rc"], res["killed_after_step"] = first.returncode, max(logged(), default=0)
res["resumed_from"] = torch.load(ckpt, map_location="cpu", weights_only=True)["step"] if os.path.isfile(ckpt) else None
t0 = time.perf_counter()
res["second_rc"] = subprocess.run(cmd).returncode
res["second_s"] = time.perf_counter() - t0
steps = logged()
res["logged_steps_once"] = steps == list(range(1, total + 1))  # the killed run's records past its checkpoint trimmed
try:
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    res["knn_top1_init"], res["knn_top1"] = results.get("knn_top1_init"), results.get("knn_top1")
except (OSError, ValueError):
    res["knn_top1"] = None
with open(log_path) as f:
    last = [json.loads(line) for line in f][-1]
res["last_log"] = {k: last.get(k) for k in ("step", "loss/1.0", "img_per_s", "data_wait")}
res["ok"] = (res["first_rc"] != 0 and res["resumed_from"] is not None and res["second_rc"] == 0 and
             res["logged_steps_once"] and res["knn_top1"] is not None)
with open(os.path.join(out, "quick_fp16.json"), "w") as f:
    json.dump(res, f, indent=1)
print(json.dumps(res, indent=1))
sys.exit(0 if res["ok"] else 1)
EOF

echo "wrote $OUT/summary.json"
