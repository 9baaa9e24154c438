import json
import math

import pytest

from splitaudit.errors import DataError
from splitaudit.results import AuditResult, CutInfo, ResultRow


def make_result(**over) -> AuditResult:
    cut = CutInfo(name="conv1", shape=(6, 28, 28), bytes_per_sample=18816, head_flops=235200, head_latency_ms=0.1, aliases=("x",))
    rows = (
        ResultRow(cut="conv1", defense="none", attack="decoder", adaptive=False, ssim=0.9, ssim_ci=(0.89, 0.91), psnr=30.0,
                  psnr_ci=(29.0, 31.0), baseline_ssim=0.1, n_eval=1000, accuracy=0.95, agreement=1.0, flags=("f",)),
        ResultRow(cut="conv1", defense="noise:sigma=1,kind=gaussian", attack="decoder", adaptive=True, ssim=0.5,
                  ssim_ci=(0.49, 0.51), psnr=math.inf, psnr_ci=(20.0, 21.0), baseline_ssim=0.1, n_eval=1000, epsilon=None),
        ResultRow(cut="conv1", defense="noise:sigma=1,kind=gaussian", attack="decoder", adaptive=False, ssim=0.3,
                  ssim_ci=(0.29, 0.31), psnr=15.0, psnr_ci=(14.0, 16.0), baseline_ssim=0.1, n_eval=1000),
    )
    kw = dict(created="2026-01-01T00:00:00+00:00", seed=0, model={"spec": "builtin:lenet"}, data={"spec": "builtin:mnist"},
              environment={"python": "3.11"}, cuts=(cut,), results=rows)
    kw.update(over)
    return AuditResult(**kw)


def test_json_round_trip(tmp_path):
    r = make_result()
    path = r.save(tmp_path / "results.json")
    back = AuditResult.load(path)
    assert back.cuts == r.cuts
    assert back.results[0] == r.results[0]
    # inf is not strict JSON: it is written as null and read back as NaN
    assert json.loads(path.read_text())["results"][1]["psnr"] is None
    assert math.isnan(back.results[1].psnr) and back.results[1].ssim_ci == (0.49, 0.51)


def test_headline_is_the_strongest_attack():
    r = make_result()
    h = r.headline("conv1", "noise:sigma=1,kind=gaussian")
    assert h.adaptive is True and h.ssim == 0.5
    assert r.headline("conv1", "dropout:p=0.5") is None


def test_load_rejects_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(DataError, match="schema"):
        AuditResult.load(p)
    p.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        AuditResult.load(p)


def test_save_is_atomic(tmp_path, monkeypatch):
    r = make_result()
    path = tmp_path / "results.json"
    r.save(path)
    before = path.read_text()

    import splitaudit.results as mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        make_result(seed=5).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind
