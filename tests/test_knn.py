"""knn.py: the weighted kNN equals a brute-force reference, is perfect on separable data, knn_eval
leaves the backbone as it found it, and 2 processes (unequal and padded shards) give exactly the
1-process features, order and accuracies."""

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import knn
from data import build_dataset, eval_transform
from knn import (build_knn_loaders, calibration_batches, calibration_shard, collapse_eval, extract_features, knn_accuracy,
                 knn_eval, knn_predict)
from losses import collapse_std
from models import ARCHS, BasicBlock, ResNet, calibrate_bn, projection_mlp, set_active
from slim import SlimConv2d


def brute_force_scores(train, train_y, test, num_classes, k, T):
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for i, q in enumerate(test.double()):
        sims = [(float(q @ t.double()), int(y)) for t, y in zip(train, train_y)]
        for s, y in sorted(sims, reverse=True)[:k]:
            scores[i, y] += torch.exp(torch.tensor(s / T, dtype=torch.float64))
    return scores


def test_knn_predict_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    test = F.normalize(torch.randn(11, 8, generator=g), dim=1)
    train_y, test_y = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (11,), generator=g)
    ks = [1, 5, 20, 60, 100]  # 100 > bank size: all neighbours
    for k in ks:
        ref = brute_force_scores(train, train_y, test, 4, k, 0.1)
        got = knn_predict(train, train_y, test, 4, k=k, temperature=0.1, chunk=4)  # 3 chunks, last short
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    top1, top5 = knn_accuracy(train, train_y, test, test_y, 4, ks=ks, temperature=0.1, chunk=4)
    for k in ks:
        pred = brute_force_scores(train, train_y, test, 4, k, 0.1).argmax(1)
        assert top1[k] == pytest.approx((pred == test_y).double().mean().item())
        assert top5[k] == 1.0  # 4 classes: the top 5 holds every class


def test_knn_separable_is_perfect():
    g = torch.Generator().manual_seed(0)
    C, D = 10, 32
    train_y, test_y = torch.arange(300) % C, torch.arange(50) % C
    train = F.normalize(F.one_hot(train_y, D).float() + 0.05 * torch.randn(300, D, generator=g), dim=1)
    test = F.normalize(F.one_hot(test_y, D).float() + 0.05 * torch.randn(50, D, generator=g), dim=1)
    top1, top5 = knn_accuracy(train, train_y, test, test_y, C, ks=[1, 10, 20, 30], chunk=16)
    assert top1 == {1: 1.0, 10: 1.0, 20: 1.0, 30: 1.0} and top5 == top1


def test_knn_eval_tiny_resnet(image_folder):
    torch.manual_seed(0)
    model = ARCHS["resnet18_cifar_tiny"]().train()
    params = {n: p.clone() for n, p in model.named_parameters()}
    bank, test = build_knn_loaders(image_folder, "cifar10", 32, bank_subset=60, test_subset=30)
    calib = calibration_batches(bank, 40)
    assert [len(x) for x in calib] == [32, 8]
    calibrate_bn(model, calib)
    feats, labels, idx = extract_features(model, test, torch.device("cpu"))
    assert feats.dtype == torch.float32 and feats.shape == (30, 128) and model.training
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(30))
    assert torch.equal(idx, torch.arange(30)) and torch.equal(labels, torch.as_tensor(test.dataset.labels))
    raw, raw_labels, raw_idx = extract_features(model, test, torch.device("cpu"), normalize=False)  # eval_linear's
    assert not torch.allclose(raw.norm(dim=1), torch.ones(30)) and torch.equal(raw_idx, idx)
    torch.testing.assert_close(F.normalize(raw, dim=1), feats)

    buffers = {n: b.clone() for n, b in model.named_buffers()}
    details = {}
    acc = knn_eval(model, bank, test, calib, [1.0, 0.25], torch.device("cpu"), k=20, ks=[5, 20], details=details)
    assert set(acc) == {1.0, 0.25} and all(0.0 <= a <= 1.0 for a in acc.values())
    for w in acc:  # more k from the same search: k=20's row is the plain result
        assert details[w]["top1_k"][20] == acc[w] and set(details[w]["top5_k"]) == {5, 20}
        assert all(details[w]["top5_k"][k] >= details[w]["top1_k"][k] for k in (5, 20))
    assert model.training and all(m.width == 1.0 for m in model.modules() if isinstance(m, SlimConv2d))
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    model.eval()
    knn_eval(model, bank, test, iter(calib), [0.25, 0.5], torch.device("cpu"), k=20)  # a one-shot iterator
    assert not model.training


def batches(loader):
    return [tuple(t.cpu() for t in b) for b in loader]


def test_knn_loaders_upsample_cifar_to_the_networks_size(image_folder):
    """image_size (a network's fixed input size): every path serves CIFAR at it, each image as
    data.eval_transform(image_size) makes it alone: the 32 px images are decoded (and cached, or kept on the
    device) and each batch is upsampled as it is served (knn.Upsampled); calibration images too."""
    def reference(split, n):  # per image, at 48 px
        return DataLoader(build_dataset(image_folder, split, eval_transform("cifar10", 48), subset=n,
                                        return_index=True), batch_size=8)

    ref = [reference("train", 30), reference("test", 20)]
    ref_calib = calibration_batches(ref[0], 12, seed=1)
    for kw in ({}, {"cache": True}, {"loader": "device"}):
        got = build_knn_loaders(image_folder, "cifar10", 8, bank_subset=30, test_subset=20, image_size=48, **kw)
        for loader, ref_loader in zip(got, ref, strict=True):
            assert isinstance(loader, knn.Upsampled) and len(loader) == len(ref_loader) and loader.batch_size == 8
            for b, r in zip(batches(loader), batches(ref_loader), strict=True):
                assert b[0].shape[1:] == (3, 48, 48) and all(torch.equal(x, y) for x, y in zip(b, r)), kw
        calib = calibration_batches(got[0], 12, seed=1)  # drawn at 32 px, upsampled when used
        assert isinstance(calib, knn.Upsampled) and [c.shape for c in calib] == [(8, 3, 48, 48), (4, 3, 48, 48)]
        assert all(torch.equal(a, b) for a, b in zip(calib, ref_calib, strict=True))
    # the CLIs' calibration set (the same for any process count), likewise
    fixed = knn.fixed_calibration_batches(image_folder, "cifar10", 30, 12, 8, seed=1, image_size=48)
    want = calibration_shard(build_dataset(image_folder, "train", eval_transform("cifar10", 48), subset=30,
                                           subset_seed=1), 12, 8, seed=1)
    assert isinstance(fixed, knn.Upsampled) and all(torch.equal(a, b) for a, b in zip(fixed, want, strict=True))


def test_ffcv_batches_upsampled_to_the_networks_size(image_folder, monkeypatch):
    """loader=ffcv at a network's size: FFCV's 32 px CIFAR batches (faked here by the device path's, which
    tests/test_eval_knn_cli.py shows equal to FFCV's) are upsampled on the device as the torch path's images."""
    asked = []

    def fake_ffcv(ffcv_path, dataset_name, batch_size, bank_subset, test_subset, device, rows, image_size=None,
                  mean_std=None):
        asked.append(image_size)
        return build_knn_loaders(image_folder, dataset_name, batch_size, loader="device", device=device,
                                 mean_std=mean_std)

    monkeypatch.setattr(knn, "_ffcv_eval_loaders", fake_ffcv)
    got = build_knn_loaders("", "cifar10", 50, loader="ffcv", image_size=48)
    ref = build_knn_loaders(image_folder, "cifar10", 50, image_size=48)
    assert asked == [48] and all(isinstance(loader, knn.Upsampled) for loader in got)
    for loader, ref_loader in zip(got, ref, strict=True):
        for b, r in zip(batches(loader), batches(ref_loader), strict=True):
            assert b[0].shape[1:] == (3, 48, 48) and all(torch.equal(x, y) for x, y in zip(b, r))


def test_knn_loaders_of_a_cnn_are_unchanged(image_folder):
    """A network without a fixed input size (image_size None, a CNN) and image_size=32 get CIFAR as stored on every
    path, without Upsampled: the tensors of the per-sample 32 px eval transform."""
    want = batches(DataLoader(build_dataset(image_folder, "train", eval_transform("cifar10"), subset=30,
                                            return_index=True), batch_size=8))
    for kw in ({}, {"cache": True}, {"loader": "device"}, {"image_size": 32, "loader": "device"}):
        bank, _ = build_knn_loaders(image_folder, "cifar10", 8, bank_subset=30, test_subset=20, **kw)
        assert not isinstance(bank, knn.Upsampled)
        got = batches(bank)
        assert len(got) == len(want) and all(torch.equal(x, y) for b, r in zip(got, want) for x, y in zip(b, r)), kw


def test_us3l_monitor_asks_for_the_networks_size(image_folder, tmp_path, monkeypatch, fresh_accelerate):
    """train_us3l.py's kNN monitor: image_size from the architecture (read on the meta device): the ViT's
    img_size, None for a CNN (its loaders as before), whatever the training's image_size."""
    import functools

    import train_us3l
    from config import parse_config
    from models import ViT

    class Built(Exception):
        pass

    seen = []

    def spy(*args, **kw):
        seen.append(kw["image_size"])
        raise Built

    monkeypatch.setattr(train_us3l, "build_knn_loaders", spy)
    monkeypatch.setitem(ARCHS, "vit_48_test", functools.partial(ViT, 32, 1, 2, img_size=48, patch_size=16,
                                                                 slim="input"))
    for arch in ("resnet18_cifar_tiny", "vit_48_test"):
        args = [f"--data_path={image_folder}", f"--out_dir={tmp_path / arch}", f"--arch={arch}", "--image_size=16",
                "--batch_size=8", "--num_workers=0", "--precision=no"]
        with pytest.raises(Built):
            train_us3l.main(parse_config(train_us3l.Config, args))
        fresh_accelerate()
    assert seen == [None, 48]


class Indexed(Dataset):
    """Sample i is the image tensor([i]): a calibration batch shows which samples it holds."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return torch.tensor([i]), 0


def test_calibration_shard_same_batches_for_any_process_count(monkeypatch):
    """The calibration set of the CLIs: one seeded draw (within a pool of indices if given), cut into
    batches; rank r of N takes batches r, r + N, ... so N processes forward 1 process's batches."""
    pool = list(range(10, 40, 2))  # 15 indices
    one = [b.flatten().tolist() for b in calibration_shard(Indexed(), 11, 3, seed=0, pool=pool)]
    assert [len(b) for b in one] == [3, 3, 3, 2]
    flat = sum(one, [])
    assert flat == sorted(set(flat)) and set(flat) <= set(pool)  # 11 distinct pool indices, in order
    assert flat != sum([b.flatten().tolist() for b in calibration_shard(Indexed(), 11, 3, seed=1, pool=pool)], [])
    for world in (2, 3):
        shares = []
        for rank in range(world):
            monkeypatch.setattr(knn, "rank_world", lambda rank=rank, world=world: (rank, world))
            shares.append([b.flatten().tolist() for b in calibration_shard(Indexed(), 11, 3, seed=0, pool=pool)])
        assert shares == [one[r::world] for r in range(world)]
    monkeypatch.setattr(knn, "rank_world", lambda: (0, 5))
    with pytest.raises(ValueError, match="4 calibration batch"):  # every rank raises: none hangs
        calibration_shard(Indexed(), 11, 3, pool=pool)
    # without a pool: the whole dataset, as calibration_batches draws on 1 process
    monkeypatch.setattr(knn, "rank_world", lambda: (0, 1))
    ref = calibration_batches(DataLoader(Indexed(), batch_size=8), 20, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(calibration_shard(Indexed(), 20, 8, seed=3), ref, strict=True))


# -----------------------------------------------------------------------------------------------
# 2 processes (gloo on 127.0.0.1) against 1


class Synthetic(Dataset):
    """13 random 8x8 images in 3 classes, yielding (x, y, idx)."""

    def __init__(self, n=13):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i


def tiny_resnet():
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1], widths=(8, 16), stem="cifar")


def run_all(data_path):
    """What the test compares between 1 and 2 processes, on every rank."""
    cpu, model = torch.device("cpu"), tiny_resnet()
    out = {}
    # DistributedSampler pads 13 samples to 2 x 7: rank 1 repeats sample 0
    ds = Synthetic()
    sampler = DistributedSampler(ds, shuffle=False) if dist.is_initialized() else None
    calibrate_bn(model, [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))])
    loader = DataLoader(ds, batch_size=4, sampler=sampler)
    out["padded"] = extract_features(model, loader, cpu, autocast=False)
    out["raw"] = extract_features(model, loader, cpu, autocast=False, normalize=False)  # eval_linear's features
    # build_knn_loaders' rank slices: 51 test images -> shards of 26 and 25
    bank, test = build_knn_loaders(data_path, "cifar10", 16, bank_subset=60, test_subset=51)
    out["test"] = extract_features(model, test, cpu, autocast=False)
    out["shard"] = len(test.dataset)
    # the same 4 calibration batches in all: rank r forwards batches r, r + 2 (train-mode BN depends
    # on the batch composition), knn_eval pools the statistics over ranks
    calib = [x for x, _ in DataLoader(build_dataset(data_path, "train", eval_transform("cifar10"), 60), 15)]
    rank, world = (dist.get_rank(), 2) if dist.is_initialized() else (0, 1)
    calib = calib[rank::world]
    out["acc"] = knn_eval(model, bank, test, calib, [1.0, 0.5], cpu, k=10, autocast=False)
    # k beyond a bank shard (30 rows per rank) and beyond the whole bank (60): padded candidates
    details = {}
    out["acc_big_k"] = knn_eval(model, bank, test, calib, [0.5], cpu, k=40, ks=[5, 200], autocast=False,
                                details=details)
    out["details"] = details
    # the sharded bank: each rank keeps its rows, minus the padded repeat a lower rank holds
    out["own"] = extract_features(model, loader, cpu, autocast=False, gather=False)
    return out


def _worker(rank, port, data_path, result_path):
    torch.set_num_threads(1)  # also keeps the forked child out of the parent's OpenMP pool (not fork-safe)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(run_all(data_path), f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(image_folder, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork, not spawn: the children skip re-importing torch and torchvision (about 4 s here)
    mp.start_processes(_worker, args=(port, str(image_folder), str(tmp_path / "out")), nprocs=2,
                       start_method="fork")
    ref = run_all(image_folder)
    assert len(ref["padded"][0]) == 13 and len(ref["test"][0]) == 51
    ranks = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    assert [got["shard"] for got in ranks] == [26, 25]  # unequal shards
    for got in ranks:
        for key in ("padded", "raw", "test"):
            feats, labels, idx = got[key]
            torch.testing.assert_close(feats, ref[key][0], rtol=0, atol=1e-6)
            assert torch.equal(labels, ref[key][1]) and torch.equal(idx, ref[key][2])
        assert got["acc"] == ref["acc"] and got["acc_big_k"] == ref["acc_big_k"]  # sharded bank: exact
        assert got["details"] == ref["details"]
    # the shards of gather=False partition the dataset: every sample on exactly one rank
    feats, labels, idx = (torch.cat(t) for t in zip(*(got["own"] for got in ranks)))
    assert sorted(idx.tolist()) == list(range(13))
    order = idx.argsort()
    torch.testing.assert_close(feats[order], ref["padded"][0], rtol=0, atol=1e-6)
    assert torch.equal(labels[order], ref["padded"][1])


def test_merge_topk_of_shards_is_the_whole_banks_topk():
    g = torch.Generator().manual_seed(0)
    sim, labels = torch.randn(7, 50, generator=g), torch.randint(0, 10, (7, 50), generator=g)
    ref_sim, ref_pos = sim.topk(12, dim=1)
    parts = [slice(0, 20), slice(20, 23), slice(23, 50)]  # a shard (3 rows) shorter than k, padded with -inf
    sims, labs = [], []
    for p in parts:
        s, i = sim[:, p].topk(min(12, sim[:, p].shape[1]), dim=1)
        sims.append(F.pad(s, (0, 12 - s.shape[1]), value=float("-inf")))
        labs.append(F.pad(labels[:, p].gather(1, i), (0, 12 - s.shape[1])))
    got_sim, got_labels = knn.merge_topk(sims, labs, 12)
    assert torch.equal(got_sim, ref_sim) and torch.equal(got_labels, labels.gather(1, ref_pos))


def test_half_bank_and_bounded_chunks_search_what_fp32_searches(monkeypatch):
    """The bank filled in place (a loader without len(): grown by doubling) and kept in fp16 equals the
    fp32 bank rounded; searched block by block (SIM_BYTES tiny: 8-row chunks, 16-row upcast blocks),
    it gives the scores of the fp32 search of those same rounded rows."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 8, generator=g), torch.randint(0, 4, (100,), generator=g)
    batches = [(x[i:i + 16], y[i:i + 16], torch.arange(i, min(i + 16, 100))) for i in range(0, 100, 16)]
    model = torch.nn.Identity()
    model.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))  # extract_features reads a dtype
    cpu = torch.device("cpu")
    full, labels, _ = extract_features(model, iter(batches), cpu, autocast=False)
    half, half_labels, idx = extract_features(model, iter(batches), cpu, autocast=False, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.shape == (100, 8) and torch.equal(idx, torch.arange(100))
    assert torch.equal(half, full.half()) and torch.equal(half_labels, labels)
    test = F.normalize(torch.randn(30, 8, generator=g), dim=1)
    expect = knn_predict(half.float(), labels, test, 4, k=10)
    monkeypatch.setattr(knn, "SIM_BYTES", 4 * 8 * 16)  # upcast blocks of 16 rows, 8 test rows per chunk
    torch.testing.assert_close(knn_predict(half, labels, test, 4, k=10), expect, rtol=0, atol=0)
    torch.testing.assert_close(knn_predict(full, labels, test, 4, k=10, chunk=1024),
                               knn_predict(full, labels, test, 4, k=10, chunk=3), rtol=0, atol=0)


def test_collapse_eval_per_slice_and_restores_state():
    """The end-of-run collapse statistic: losses.collapse_std of the projector output over all calibration
    images, each batch in train-mode BN (as in pretraining), per slice; near 0 for a collapsed projector;
    BN buffers, modes and the active width left as found."""
    model, cpu = tiny_resnet(), torch.device("cpu")
    torch.manual_seed(1)
    proj = projection_mlp(16, 32, 8)
    g = torch.Generator().manual_seed(3)
    calib = [(torch.randn(12, 3, 8, 8, generator=g), torch.zeros(12)) for _ in range(3)]
    model.eval(), proj.eval()
    before = {n: b.clone() for n, b in [*model.named_buffers(), *proj.named_buffers()]}
    got = collapse_eval(model, proj, calib, {"1.0": (1.0, None), "0.5": (0.5, None)}, cpu, autocast=False)
    assert not model.training and not proj.training
    for n, b in [*model.named_buffers(), *proj.named_buffers()]:
        assert torch.equal(b, before[n]), n
    for name, w in (("1.0", 1.0), ("0.5", 0.5)):
        model.train(), proj.train()
        set_active(model, w)
        with torch.no_grad():
            z = torch.cat([proj(model(x)) for x, _ in calib])
        assert got[name] == pytest.approx(collapse_std(z).item(), abs=1e-5) and got[name] > 0.05
    set_active(model, 1.0)
    with torch.no_grad():  # a collapsed projector: every output the same vector
        proj[-1].weight.zero_()
        proj[-1].bias.fill_(1.0)
    collapsed = collapse_eval(model, proj, calib, {"1.0": (1.0, None)}, cpu, autocast=False)
    assert collapsed["1.0"] < 1e-3
