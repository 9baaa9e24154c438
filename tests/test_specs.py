import pytest

from splitaudit.errors import SpecError
from splitaudit.specs import build_config, canonical_spec, parse_model_spec, parse_plugin_spec
from splitaudit.defenses import make_defense


@pytest.mark.parametrize(
    "spec,kind,target,attr",
    [
        ("builtin:lenet", "builtin", "lenet", None),
        ("models/net.py:build", "file", "models/net.py", "build"),
        ("net.py:build", "file", "net.py", "build"),
        ("pkg.mod:make_model", "module", "pkg.mod", "make_model"),
    ],
)
def test_model_spec_forms(spec, kind, target, attr):
    p = parse_model_spec(spec)
    assert (p.kind, p.target, p.attr) == (kind, target, attr)


@pytest.mark.parametrize("spec", ["net.py", "pkg.mod", "builtin:", "net.py:", ":build", "pkg.mod:1bad", "bad name:x"])
def test_model_spec_rejects(spec):
    with pytest.raises(SpecError):
        parse_model_spec(spec)


def test_plugin_spec_parses_params_in_order():
    p = parse_plugin_spec("noise:sigma=0.5,kind=laplace")
    assert p.name == "noise" and p.params == {"sigma": "0.5", "kind": "laplace"}
    assert parse_plugin_spec(" None ").name == "none"


@pytest.mark.parametrize("spec", ["", "noise:", "noise:sigma", "noise:sigma=1,sigma=2", "no-ise:sigma=1", "noise:=1"])
def test_plugin_spec_rejects(spec):
    with pytest.raises(SpecError):
        parse_plugin_spec(spec)


def test_canonical_spec_is_stable():
    assert canonical_spec("noise", {"sigma": 0.50, "kind": "gaussian"}) == "noise:sigma=0.5,kind=gaussian"
    assert make_defense("noise:sigma=0.50").spec == make_defense("noise:kind=gaussian,sigma=.5").spec


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("noise:sigma=-1", "[0, 1e+06]"),
        ("dropout:p=1", "[0, 1)"),
        ("dropout:p=-0.1", "[0, 1)"),
        ("quant:bits=0", "[1, 16]"),
        ("quant:bits=17", "[1, 16]"),
        ("noise:sigma=abc", "not a float"),
        ("noise:kind=uniform", "one of gaussian, laplace"),
        ("noise:scale=1", "allowed keys: sigma, kind"),
        ("blur:r=1", "known defenses:"),
        ("dpsgd:epsilon=0", "epsilon=0 is out of range; allowed: (0,"),
        ("dpsgd:epsilon=-1", "epsilon=-1 is out of range"),
        ("dpsgd:delta=0", "delta=0 is out of range; allowed: (0, 1)"),
        ("dpsgd:delta=1", "delta=1 is out of range; allowed: (0, 1)"),
        ("dpsgd:epochs=0", "epochs=0 is out of range"),
        ("dpsgd:epsilon=eight", "is not a float"),
        ("dpsgd:sigma=1", "unknown key 'sigma'"),
        ("nopeek:weight=-0.5", "weight=-0.5 is out of range; allowed: [0,"),
        ("nopeek:lambda=1", "unknown key 'lambda'"),
    ],
)
def test_bad_defense_params_name_the_allowed_range(spec, needle):
    with pytest.raises(SpecError) as e:
        make_defense(spec)
    assert needle in str(e.value)


def test_build_config_converts_types():
    from dataclasses import dataclass

    from splitaudit.specs import param

    @dataclass(frozen=True)
    class C:
        n: int = param(1, lo=1)
        flag: bool = param(False)

    c = build_config(C, {"n": "3", "flag": "true"}, what="x")
    assert c.n == 3 and c.flag is True
    with pytest.raises(SpecError, match="not a int"):
        build_config(C, {"n": "3.5"}, what="x")
