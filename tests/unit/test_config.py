"""params.yaml → typed config: bad keys, types and ranges fail early with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from real_config import default_raw, merge

from visiontune.config import Params, ParamsError, flatten, load_params, parse_params

# Keys whose value is itself a mapping (URL → local copies), not a section.
MAPPING_KEYS = {"data.mirrors"}


def flatten_yaml(raw: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in MAPPING_KEYS:
            flat.update(flatten_yaml(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _error(overrides) -> str:
    """The message for params.yaml with `overrides` merged in (every other key valid)."""
    with pytest.raises(ParamsError) as info:
        parse_params(merge(default_raw(), overrides))
    return str(info.value)


def _with(section: str, key: str, value):
    """params.yaml with one key replaced outright (a mapping value is not merged)."""
    raw = default_raw()
    raw[section][key] = value
    return raw


def _schema_keys(model: type[BaseModel] = Params, prefix: str = "") -> dict[str, object]:
    """Every leaf key of the schema (dotted) → its FieldInfo; data.mirrors is one key."""
    keys: dict[str, object] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys[f"{prefix}{name}"] = field  # the section itself must be written too
            keys.update(_schema_keys(annotation, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = field
    return keys


def test_the_repo_params_file_is_valid_and_complete(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert set(raw) == set(Params.model_fields), "every section is written out"
    written = set(flatten_yaml(raw))
    assert written == set(flatten(params)), "every key is written out (DVC tracks what it sees)"
    leaves = {key for key, field in _schema_keys().items() if key not in _sections()}
    assert written == leaves, "params.yaml and config.py's schema have the same keys"
    assert params.data.source.startswith("https://")


def _sections(model: type[BaseModel] = Params, prefix: str = "") -> set[str]:
    found = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found |= {f"{prefix}{name}"} | _sections(field.annotation, f"{prefix}{name}.")
    return found


def test_the_schema_has_no_defaults_of_its_own() -> None:
    """params.yaml is the one place a value is written: a second copy in code drifts."""
    defaulted = [key for key, field in _schema_keys().items() if not field.is_required()]
    assert not defaulted, f"config.py gives these keys a default: {defaulted}"


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        (("lr_find", "num_iter"), "lr_find.num_iter: required key missing; set it to an integer"),
        (("finetune", "augment"), "finetune.augment: required section missing; add"),
        (("runtime",), "runtime: required section missing; add `runtime:` with keys huge_pages,"),
    ],
)
def test_a_missing_key_is_named_with_what_to_write(drop, expected: str) -> None:
    raw = default_raw()
    node = raw
    for part in drop[:-1]:
        node = node[part]
    del node[drop[-1]]
    message = _error_of(raw)
    assert expected in message and "docs/parameters.md" in message
    assert len(message.splitlines()) == 2, message  # one line for the one missing key


def test_a_moved_key_names_its_new_place() -> None:
    raw = default_raw()
    raw["base"]["num_workers"] = raw["runtime"].pop("num_workers")
    message = _error_of(raw)
    assert "base.num_workers: unknown key; it moved to runtime.num_workers" in message
    assert "runtime.num_workers: required key missing" in message


def _error_of(raw) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"dataa": {}},
            "dataa: unknown key; allowed keys: audit, base, data, distributed, finetune,",
        ),
        ({"data": {"sourse": "x"}}, "data.sourse: unknown key; allowed keys: download_retries"),
        (
            {"finetune": {"augment": {"flipp": True}}},
            "finetune.augment.flipp: unknown key; allowed keys: brightness, contrast, flip,",
        ),
    ],
)
def test_unknown_keys_name_the_key_and_the_allowed_ones(raw, expected: str) -> None:
    assert expected in _error(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"base": {"seed": "abc"}}, "base.seed: Input should be a valid integer"),
        ({"base": {"deterministic": "maybe"}}, "allowed: true or false"),
        ({"split": {"valid_pct": 1.5}}, "split.valid_pct: Input should be less than 1 (got 1.5)"),
        ({"data": {"max_per_class": 0}}, "allowed: an integer >= 1 or null"),
        ({"data": {"download_retries": 99}}, "allowed: an integer >= 0 and <= 20"),
        ({"model": {"interpolation": "cubic"}}, "(got 'cubic'); allowed: 'bilinear' or"),
        ({"finetune": {"augment": {"rotate_deg": 500}}}, "finetune.augment.rotate_deg:"),
        ({"data": {"sha256": "xyz"}}, "data.sha256: must be a 64-character hex"),
        ({"model": {"mean": [0.5, 0.5]}}, "model.mean: too few values (got [0.5, 0.5])"),
        ({"head": {"hidden": [0]}}, "head.hidden.0: Input should be greater than or equal to 1"),
        ({"distributed": {"backend": "mpi"}}, "(got 'mpi'); allowed: 'auto' or 'gloo' or 'nccl'"),
        ({"distributed": {"timeout_s": 0}}, "distributed.timeout_s: Input should be greater"),
        ({"distributed": {"launcher": ""}}, "distributed.launcher: String should have at least"),
    ],
)
def test_wrong_types_and_ranges_name_key_value_and_what_is_allowed(raw, expected: str) -> None:
    assert expected in _error(raw)


def test_union_branches_read_as_one_line() -> None:
    message = _error({"head": {"lr": -1}})
    assert "head.lr: invalid value -1; allowed: a number > 0 or 'auto'" in message
    assert "constrained-float" not in message and "literal" not in message
    assert message.count("head.lr") == 1
    message = _error({"runtime": {"num_workers": "many"}})
    assert "runtime.num_workers: invalid value 'many'; allowed: an integer or 'auto'" in message


def test_every_bad_key_is_reported_at_once() -> None:
    message = _error({"base": {"seed": -1}, "split": {"valid_pct": 0}, "data": {"x": 1}})
    assert "base.seed" in message and "split.valid_pct" in message and "data.x" in message


def test_cross_field_checks() -> None:
    assert "end_lr (0.1) must be greater than start_lr (1.0)" in _error(
        {"lr_find": {"start_lr": 1.0, "end_lr": 0.1}}
    )
    assert "lr_ratios has 2 entries but layer_groups is 3" in _error(
        {"finetune": {"lr_ratios": [0.1, 1.0]}}
    )
    for init in ("source", "logreg"):
        assert f"init: {init} fits a single Linear; use hidden: []" in _error(
            {"head": {"init": init, "hidden": [64]}}
        )


def test_yaml_exponent_strings_are_read_as_numbers(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `1e-2` as the string '1e-2'; DVC reads a float.
    text = "head:\n  lr: 1e-2\n  weight_decay: 5e-4\nlr_find:\n  start_lr: 1e-7\n"
    assert yaml.safe_load(text)["head"]["lr"] == "1e-2"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(merge(default_raw(), yaml.safe_load(text))))
    params = load_params(tmp_path / "p.yaml")
    assert params.head.lr == pytest.approx(1e-2) and isinstance(params.head.lr, float)
    assert params.head.weight_decay == pytest.approx(5e-4)
    assert params.lr_find.start_lr == pytest.approx(1e-7)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping of sections"):
        load_params(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ParamsError, match="base: required section missing"):
        load_params(tmp_path / "empty.yaml")


def test_config_is_frozen_and_flattens_to_dotted_keys() -> None:
    params = parse_params(_with("data", "mirrors", {"https://h/a.zip": ["a", "b"]}))
    with pytest.raises(ValueError, match="frozen"):
        params.data.source = "elsewhere"  # type: ignore[misc]
    flat = flatten(params)
    assert flat["data.mirrors"] == {"https://h/a.zip": ["a", "b"]}
    assert flat["finetune.augment.flip"] == "auto"


@pytest.mark.parametrize(
    ("mirrors", "expected"),
    [
        (["../shared/data/dogscats"], "a list of mirrors is no longer accepted"),
        (["x"], "give a mapping from that URL to its local copies, e.g. mirrors: {https://"),
        ({"../photos": ["../copy"]}, "each key must be the http(s) URL"),
        ("../copy", "data.mirrors: Input should be a valid dictionary"),
        ({"https://h/a.zip": [1]}, "data.mirrors.https://h/a.zip.0: Input should be a valid"),
    ],
)
def test_mirrors_are_a_mapping_from_url_to_local_copies(mirrors, expected: str) -> None:
    assert expected in _error_of(_with("data", "mirrors", mirrors))
    one = parse_params(_with("data", "mirrors", {"https://h/a.zip": "../copy"})).data.mirrors
    assert one == {"https://h/a.zip": ("../copy",)}
    assert parse_params(_with("data", "mirrors", {})).data.mirrors == {}


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzzed_values_give_params_errors_never_tracebacks(data) -> None:
    section = data.draw(st.sampled_from(sorted(Params.model_fields)))
    fields = sorted(Params.model_fields[section].annotation.model_fields)
    key = data.draw(st.sampled_from([*fields, "unknown_key"]))
    value = data.draw(_VALUES)
    try:
        parse_params(_with(section, key, value))
    except ParamsError as exc:
        first = str(exc).splitlines()[1].strip()
        assert first.startswith(f"{section}"), first
