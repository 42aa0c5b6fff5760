"""Malformed params never give a traceback: nested junk at any key through `parse_params`, and
whole bad params files through a real stage (`main(argv)` and `python stages/split.py`), end in
a ParamsError naming the key / exit code 2 with the key on stderr.

(tests/unit/test_config.py fuzzes one flat value per key; this adds nested and non-YAML junk,
whole-file junk and the stage boundary.)
"""

from __future__ import annotations

import copy
import importlib.util
import math
import subprocess
import sys
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from visiontune.config import Params, ParamsError, parse_params

REPO = Path(__file__).resolve().parents[2]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.append((*prefix, name))  # the section itself, replaced by junk
            paths += _leaf_paths(annotation, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


PATHS = _leaf_paths(Params)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: 10**30 and friends
    st.floats(),  # nan, inf, -0.0, subnormals
    st.text(max_size=12),
    st.binary(max_size=6),
    st.just(Decimal("1e400")),
    st.just(date(2020, 1, 1)),
    st.just(object()),
)
JUNK = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(
            st.one_of(st.text(max_size=6), st.integers(), st.none()), inner, max_size=3
        ),
    ),
    max_leaves=8,
)
YAML_JUNK = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from(["1e-2", "auto", "", "~", "NaN", "0x10", "-.inf", "yes", "1_000"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _with(path: tuple[str, ...], value, base=None) -> dict:
    raw = copy.deepcopy(RAW if base is None else base)
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return raw


def _names_the_key(message: str, path: tuple[str, ...]) -> bool:
    """The message has a line for this key, or for an enclosing section (cross-field checks
    such as `finetune: lr_ratios has 2 values for 3 layer_groups`)."""
    lines = [line.strip() for line in message.splitlines()]
    return any(
        line.startswith(f"{'.'.join(path[:n])}:") or line.startswith(f"{'.'.join(path[:n])}.")
        for line in lines
        for n in range(len(path), 0, -1)
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=JUNK)
def test_nested_junk_at_any_key_is_a_params_error_naming_it(path, value) -> None:
    try:
        parse_params(_with(path, value))
    except ParamsError as exc:
        assert _names_the_key(str(exc), path), (path, str(exc))


@settings(max_examples=60, deadline=None)
@given(
    path=st.lists(st.sampled_from([*Params.model_fields, "augment", "x", "0"]), min_size=1,
                  max_size=3).map(tuple).filter(lambda p: tuple(p) not in PATHS),
    value=JUNK,
)  # fmt: skip
def test_unknown_keys_at_any_depth_are_named(path, value) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(_with(path, value))
    assert "unknown key" in str(info.value) or "mapping" in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [[], [1, 2], "base", 42, 3.5, True, b"\x00", {1: {}}, {None: 1}, {"base": []}, {"base": 7}],
    ids=repr,
)
def test_whole_file_junk_is_a_params_error(raw) -> None:
    with pytest.raises(ParamsError):
        parse_params(raw)


def _split_stage():
    spec = importlib.util.spec_from_file_location("stage_split", REPO / "stages" / "split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


SPLIT = _split_stage()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=st.sampled_from(PATHS), value=YAML_JUNK)
def test_a_stage_exits_2_naming_the_key(tmp_path: Path, capsys, path, value) -> None:
    # (never valid params here, so no stage opens a tracking run, in any store)
    raw = _with(path, value)
    try:
        parse_params(yaml.safe_load(yaml.safe_dump(raw)))
    except ParamsError:
        pass
    else:
        assume(False)  # valid after all: the stage would do real work
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    out = tmp_path / "split"
    code = SPLIT(["--params", str(params), "--prepared", str(tmp_path / "none"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert _names_the_key(err.split("\n", 1)[-1], path), (path, err)
    assert "Traceback" not in err and not out.exists()


BAD_FILES = {
    "not yaml": "base: [1, 2\n",
    "tab indent": "base:\n\tseed: 1\n",
    "a list": "- base\n- data\n",
    "a scalar": "42\n",
    "binary": "\x00\x01\x02",
    "exponent string": "head:\n  lr: 1e-2x\n",
    "duplicate anchors": "base: &a {seed: 1}\ndata: *a\n",
    "nan seed": "base:\n  seed: .nan\n",
    # torch.manual_seed overflows on it: once accepted, then a traceback deep in the run
    "huge seed": f"base:\n  seed: {10**40}\n",
    "negative seed": "split:\n  seed: -1\n",
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_params_files_through_the_stage(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative tracking store, if any, lands here
    params = tmp_path / "params.yaml"
    params.write_text(BAD_FILES[name])
    code = SPLIT(
        ["--params", str(params), "--prepared", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.strip() and "Traceback" not in err, (name, err)


def test_the_stage_script_as_dvc_runs_it(tmp_path: Path) -> None:
    """`python stages/split.py` from the repo root: exit 2, one clear message, no traceback."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_with(("split", "valid_pct"), [math.pi, {"x": None}])))
    result = subprocess.run(
        [sys.executable, "stages/split.py", "--params", str(params), "--prepared", str(tmp_path),
         "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "split.valid_pct:" in result.stderr and "Traceback" not in result.stderr
