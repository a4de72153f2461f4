"""Shared pytest fixtures: a generated image folder (every test that does not need real images) and
real CIFAR-10 (the few tests whose point is real data), and one thread per xdist worker."""

import os
import tarfile
from pathlib import Path

# `make test` runs 2 xdist workers on a 2-core machine: one thread each, set before torch is imported
# (OpenMP reads it once). A run without xdist keeps whatever the caller set. Subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TAR = Path(os.environ.get("CIFAR10_TAR", REPO / ".." / "shared" / "data" / "cifar10-jpg.tar.gz"))


def make_image_folder(out, per_class={"train": 20, "test": 10}, size=32, seed=0):
    """A deterministic stand-in for CIFAR-10's JPEG folders: split/<class>/NNNN.jpg, 32 px RGB, the
    ten CIFAR class names. Each class has its own hue and stripe direction; each image its own
    phase, frequency, brightness and noise, so crops, jitter and kNN see varied, class-dependent
    pixels (a random net's kNN is well above chance on them)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            (out / split / name).mkdir(parents=True, exist_ok=True)
            angle = np.pi * c / len(CLASSES)
            hue = np.array([np.cos(2 * np.pi * c / 10), np.cos(2 * np.pi * (c / 10 + 1 / 3)),
                            np.cos(2 * np.pi * (c / 10 + 2 / 3))]) * 0.35 + 0.5
            for i in range(n):
                freq, phase = rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
                wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
                img = hue * (0.6 + 0.4 * wave[..., None]) * rng.uniform(0.6, 1.2)
                img = img + rng.normal(0, 0.08, img.shape)
                Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(out / split / name / f"{i:04d}.jpg",
                                                                              quality=90)
    return out


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that changes torch's thread count leaves it as it found it. FFCV's loader sets it to its
    num_workers (all cores by default): left so, an xdist worker then runs every later test with 2
    threads against the other worker's 1, and both crawl (a 2 s test took 59 s)."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Generated train/ (20 per class) and test/ (10 per class) JPEG folders, as CIFAR-10's (0.3 s)."""
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture
def cifar_real(_cifar_real_folder):
    """Real CIFAR-10 (see _cifar_real_folder); marks the test for the real-data line of the summary."""
    return _cifar_real_folder


def _prepared_cifar10():
    """A CIFAR-10 made by `python data.py extract-cifar10 [--download]`: $DATA_DIR/cifar10 or data/cifar10."""
    for root in (Path(os.environ.get("DATA_DIR", REPO / "data")) / "cifar10", REPO / "data" / "cifar10"):
        if (root / ".extracted").is_file() or (root / "cifar-10-batches-py").is_dir():
            return root
    return None


@pytest.fixture(scope="session")
def _cifar_real_folder(tmp_path_factory):
    """A real CIFAR-10 image folder: train/<class>/ with 20 images per class, test/<class>/ with 10,
    taken member by member from the tarball ($CIFAR10_TAR or ../shared/data, about 1.5 s), else from
    a CIFAR-10 that `python data.py extract-cifar10` prepared. Only for tests whose point is real data;
    without either they skip with one reason."""
    want, count = {"train": 20, "test": 10}, {}
    out = tmp_path_factory.mktemp("cifar_real")
    if CIFAR10_TAR.is_file():
        with tarfile.open(CIFAR10_TAR, "r|gz") as tf:  # streaming: one pass, extract only what we keep
            for m in tf:
                parts = m.name.split("/")  # cifar10/<split>/<class>/NNNN.jpg
                if not m.isfile() or len(parts) != 4 or parts[1] not in want:
                    continue
                key = (parts[1], parts[2])
                if count.get(key, 0) < want[parts[1]]:
                    count[key] = count.get(key, 0) + 1
                    m.name = "/".join(parts[1:])
                    tf.extract(m, out, filter="data")
        return out
    if (prepared := _prepared_cifar10()) is None:
        pytest.skip(f"real-data test: no CIFAR-10 tarball at {CIFAR10_TAR.resolve()} and no prepared CIFAR-10 "
                    "(set CIFAR10_TAR=PATH, or run `python data.py extract-cifar10 --download`)")
    import data  # the repository's loader reads both layouts (JPEG folders, torchvision's batches)

    for split, n in want.items():
        ds = data.build_dataset(prepared, split)
        for i in data.subset_indices(ds.labels, n * ds.num_classes, seed=None):  # the first n of each class
            img, y = ds[int(i)]
            (out / split / ds.classes[y]).mkdir(parents=True, exist_ok=True)
            img.save(out / split / ds.classes[y] / f"{int(i):05d}.png")  # lossless: the images as stored
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if "cifar_real" in item.fixturenames:  # user_properties travel with the reports (xdist workers too)
        item.user_properties.append(("real_data", True))


def pytest_terminal_summary(terminalreporter):
    real = sorted({r.nodeid for reports in terminalreporter.stats.values() for r in reports
                   if getattr(r, "when", None) == "setup" and ("real_data", True) in getattr(r, "user_properties", ())})
    if real:
        where = "found" if CIFAR10_TAR.is_file() or _prepared_cifar10() else "NOT found: they skipped"
        terminalreporter.write_line(f"{len(real)} test(s) use real CIFAR-10 ({where}): "
                                    + " ".join(real))


# --- shared trained runs (tests/test_train_us3l.py, test_dspnet.py, test_tracking.py) --------------
# One tiny run per trainer, trained in this process (no interpreter start-up, about 4 s a run) and
# shared by every test that only reads its outputs. A run also records what its files do not show:
# the EMA momentum of each step, the modules and optimizer it resumed into, the weight decay it
# applied by hand, and each kNN monitor's result with the step it ran at.


def reset_accelerate():
    """Forget Accelerate's process-wide state: the first Accelerator of a process fixes the mixed
    precision of all later ones (another one is an error), and an in-process run must leave none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_accelerate():
    """For a test that runs a trainer's main() in this process: a fresh Accelerate state before and
    after; call it (it is reset_accelerate) between two runs of other mixed precisions."""
    reset_accelerate()
    yield reset_accelerate
    reset_accelerate()


def recorded_run(trainer, cfg):
    """trainer.main(cfg) in this process, with recorders around what it calls; returns what they saw."""
    from types import SimpleNamespace

    import losses

    seen = SimpleNamespace(out=Path(cfg.out_dir), cfg=cfg, taus=[], state=None, decay=[], knn=[])

    def ema_update_(target, online, tau, **kw):  # once per step, after the optimizer's
        seen.taus.append(tau)
        return ema_update(target, online, tau, **kw)

    def load_resume(cfg, path, state, *args, **kw):
        seen.state = state  # {student/online, teacher/target, optimizer}: the live objects
        return resume(cfg, path, state, *args, **kw)

    def add_group_reg_grad_(params, weight_decay, **kw):  # US3L's weight decay by hand
        seen.decay.append((list(params), weight_decay, kw.get("alpha")))
        return add_reg(params, weight_decay, **kw)

    def knn_eval(*args, **kw):
        acc = knn(*args, **kw)
        seen.knn.append((len(seen.taus), acc))  # (steps trained so far, top-1 per width)
        return acc

    ema_update, resume, knn, add_reg = (trainer.ema_update_, trainer.load_resume, trainer.knn_eval,
                                        losses.add_group_reg_grad_)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "ema_update_", ema_update_)
        mp.setattr(trainer, "load_resume", load_resume)
        mp.setattr(trainer, "knn_eval", knn_eval)
        mp.setattr(losses, "add_group_reg_grad_", add_group_reg_grad_)
        reset_accelerate()
        try:
            trainer.main(cfg)
        finally:
            reset_accelerate()
    return seen


# Both runs: 4 epochs of 2 steps (train_subset 40, batch 16), the kNN monitor every 2 epochs (at
# step 4, besides the random init and the end), TensorBoard on (tests/test_tracking.py reads it).
SHARED_RUN = {"max_steps": 8, "train_subset": 40, "eval_every": 2, "tracker": "tensorboard"}


@pytest.fixture(scope="session")
def us3l_run(image_folder, tmp_path_factory):
    """A tiny train_us3l.py run (tests/test_train_us3l.py's tiny_args, SHARED_RUN): .out, .cfg and the records."""
    import train_us3l
    from config import parse_config
    from tests.test_train_us3l import tiny_args

    out = tmp_path_factory.mktemp("us3l_run")
    return recorded_run(train_us3l, parse_config(train_us3l.Config, tiny_args(image_folder, out, **SHARED_RUN)))


@pytest.fixture(scope="session")
def dspnet_run(image_folder, tmp_path_factory):
    """A tiny train_dspnet.py run (tests/test_dspnet.py's tiny_args, SHARED_RUN, every DN monitored)."""
    import train_dspnet
    from config import parse_config
    from tests.test_dspnet import tiny_args

    out = tmp_path_factory.mktemp("dspnet_run")
    args = tiny_args(image_folder, out, knn_dns="all", **SHARED_RUN)
    return recorded_run(train_dspnet, parse_config(train_dspnet.Config, args))

# --- end of the shared trained runs ---------------------------------------------------------------
