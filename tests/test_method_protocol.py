"""The method contract: registry, options at the boundary, signal checks, the merge splice, import layering."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llava.model.compression import (
    METHODS,
    CompressionSpec,
    get_method,
    is_method_option,
    method_options,
    options_for,
    register_method,
)
from llava.model.method_api import (
    VIT_KEYS,
    VIT_RECEIVED_ATTENTION,
    Method,
    VideoSelection,
    VideoTokens,
    check_range,
    parse_options,
)

_BROKEN = itertools.count()
ROOT = Path(__file__).resolve().parents[1]
METHOD_IMPORTS_ALLOWED = {
    "llava.model.method_api", "llava.model.dpc_knn", "llava.model.vidcom2", "llava.model.inllm_select",
    "llava.model.compiled_select", "llava.model.float32_products",
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _module_file(method: Method) -> Path:
    function = method.select or method.plan  # in-LLM-only methods have no select function
    module = sys.modules[function.__module__] if function else None
    assert module is not None and module.__file__
    return Path(module.__file__)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_methods_import_nothing_from_models_or_evaluation(method: Method) -> None:
    imports = _imports(_module_file(method))
    ours = {name for name in imports if name.split(".")[0] in ("llava", "transformers_patched", "vidcom2_lmms_eval")}
    assert ours <= METHOD_IMPORTS_ALLOWED, f"{method.name} imports {sorted(ours - METHOD_IMPORTS_ALLOWED)}"
    assert not {n for n in imports if n.split(".")[0] in ("transformers", "lmms_eval")}


def test_no_import_circle_through_runtime() -> None:
    """llava.runtime imports no family; families never import the index that lists them."""
    runtime = _imports(ROOT / "llava/runtime.py")
    assert not {n for n in runtime if n.startswith(("llava.model.families", "transformers"))}
    for path in [*ROOT.glob("llava/model/*.py"), *ROOT.glob("transformers_patched/*.py")]:
        assert "llava.families_index" not in _imports(path), path
    code = "import sys, llava.runtime; assert not [m for m in sys.modules if m.startswith('llava.model.families')]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class _Knobs:
    ratio: float = 0.5
    count: int = 3
    flag: bool = False
    sizes: tuple[float, ...] = (1.0, 2.0)
    mode: str = "a"
    seed: int | None = None

    def __post_init__(self) -> None:
        check_range("knobs", "ratio", self.ratio, 0.0, 1.0, low_open=True)


def test_parse_options_converts_command_line_strings() -> None:
    got = parse_options("knobs", _Knobs, {"ratio": "0.25", "count": "7", "flag": "true", "sizes": "0.5/1", "seed": "3"})
    assert got == _Knobs(ratio=0.25, count=7, flag=True, sizes=(0.5, 1.0), seed=3)
    assert parse_options("knobs", _Knobs, {"seed": "none"}).seed is None
    assert parse_options("knobs", _Knobs, None) == _Knobs()


@pytest.mark.parametrize(
    "options,match",
    [
        ({"ratoi": 0.1}, r"unknown knobs option\(s\) \['ratoi'\]; valid options: ratio, count, flag, sizes, mode"),
        ({"count": "2.5"}, "count expects an integer"),
        ({"flag": "maybe"}, "flag expects true/false"),
        ({"ratio": "x"}, "ratio expects a number"),
        ({"ratio": "0"}, r"ratio must be in \(0.0, 1.0\]"),
    ],
)
def test_parse_options_errors_name_the_option(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        parse_options("knobs", _Knobs, options)


def test_namespaced_options_reach_their_method_only() -> None:
    assert method_options("vidcom2", {"vidcom2.temperature": "0.02", "exact_count": "1"}) == {
        "temperature": "0.02",
        "exact_count": "1",
    }
    spec = CompressionSpec("vidcom2", 0.25, {"vidcom2.temperature": "0.02"})
    assert spec.config.temperature == 0.02 and spec.options == {"temperature": "0.02"}
    with pytest.raises(ValueError, match="option 'random.seed' is a 'random' knob, but the compressor is 'vidcom2'"):
        CompressionSpec("vidcom2", 0.25, {"random.seed": 1})
    with pytest.raises(ValueError, match="unknown compressor 'visionzap'"):
        CompressionSpec("vidcom2", 0.25, {"visionzap.x": 1})
    with pytest.raises(ValueError, match="given twice"):
        CompressionSpec("vidcom2", 0.25, {"temperature": 0.1, "vidcom2.temperature": 0.2})
    assert is_method_option("vidcom2.temperature") and not is_method_option("temperature")
    assert not is_method_option("nosuch.knob") and not is_method_option("vidcom2.")
    assert options_for("random", {"random.seed": 2, "vidcom2.temperature": 1, "seed": 5}) == {"seed": 2}


# ------------------------------------------------------------------------------ signals and splice


def _merge_first_two(video: VideoTokens, retention: float, options) -> VideoSelection:
    """Per frame: token 0 becomes the sum of tokens 0 and 1 (anchor 0); tokens 1.. dropped but the last."""
    f, p, _ = video.features.shape
    x = video.features.float()
    merged = (x[:, 0] + x[:, 1] + video.signal(VIT_RECEIVED_ATTENTION)[:, :1]).to(video.features.dtype)
    last = x[:, p - 1]
    source = torch.stack([torch.arange(f) * p, torch.arange(f) * p + p - 1], dim=1).reshape(-1)
    features = torch.stack([merged, last], dim=1).reshape(2 * f, -1)
    return VideoSelection(source.to(video.features.device), features)


TEST_MERGE = Method(
    "_test_merge", _Knobs, signals=frozenset({VIT_RECEIVED_ATTENTION}), select=_merge_first_two, merges=True
)
try:
    register_method(TEST_MERGE)
except ValueError:  # registered by an earlier import of this module
    pass


def test_unsupported_signal_fails_naming_method_family_and_signal() -> None:
    spec = CompressionSpec("_test_merge", 0.25)
    with pytest.raises(ValueError, match=r"'_test_merge' needs the signal\(s\) \['vit_received_attention'\], which "
                       r"model family 'toy' cannot supply \(it supplies: vit_keys\)"):
        spec.check_supported("toy", {VIT_KEYS})
    spec.check_supported("toy", {VIT_RECEIVED_ATTENTION})
    CompressionSpec("_test_merge", 1.0).check_supported("toy", set())  # identity: nothing is needed


def test_select_videos_writes_merged_values_at_their_sources() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g)
    attention = torch.rand(3, 4, generator=g)
    spec = CompressionSpec("_test_merge", 0.5)
    [choice] = spec.select_videos([VideoTokens(x, (3, 2, 2), {VIT_RECEIVED_ATTENTION: attention})])
    assert choice.mask.tolist() == [[True, False, False, True]] * 3
    expected = x.reshape(12, 5).clone()
    expected[[0, 4, 8]] = x[:, 0] + x[:, 1] + attention[:, :1]
    torch.testing.assert_close(choice.table, expected)
    with pytest.raises(ValueError, match=r"video 0: compressor '_test_merge' needs signal\(s\)"):
        spec.select_videos([VideoTokens(x, (3, 2, 2))])


def _padded_method(source: torch.Tensor, count: int, valid: torch.Tensor | None = None) -> Method:
    """A merging method returning ``source`` padded, with ``count`` on the device (features: row i = i + 1)."""
    features = torch.arange(1, len(source) + 1, dtype=torch.float32)[:, None].expand(-1, 5)
    method = Method(
        f"_test_padded_{next(_BROKEN)}",
        _Knobs,
        select=lambda video, r, o: VideoSelection(source, features, valid, count=torch.tensor(count)),
        merges=True,
    )
    register_method(method)
    return method


def test_padded_selection_is_cut_at_its_count() -> None:
    """Padding past ``count`` (sources >= F * P, or anything) never reaches the mask or the table."""
    x = torch.zeros(3, 4, 5)
    method = _padded_method(torch.tensor([2, 7, 12, 12, 12]), 2)
    [choice] = CompressionSpec(method.name, 0.5).select_videos([VideoTokens(x, (3, 2, 2))])
    assert choice.mask.reshape(-1).nonzero().squeeze(1).tolist() == [2, 7]
    expected = torch.zeros(12, 5)
    expected[2], expected[7] = 1.0, 2.0
    assert torch.equal(choice.table, expected)
    assert choice.rank[[2, 7]].tolist() == [0, 1] and int(choice.rank[-1]) == 5  # compact rows: values[rank]
    assert torch.equal(choice.values[:2], expected[[2, 7]])


@pytest.mark.parametrize(
    "source,count,valid",
    [
        (torch.tensor([3, 1, 12]), 2, None),  # real entries not ascending
        (torch.tensor([0, 12, 12]), 2, None),  # a real entry out of range
        (torch.tensor([0, 12, 12]), 0, None),  # nothing kept
        (torch.tensor([0, 5, 12]), 2, torch.tensor(False)),  # refused input
    ],
)
def test_invalid_padded_output_gives_an_empty_mask(source, count, valid) -> None:
    method = _padded_method(source, count, valid)
    [choice] = CompressionSpec(method.name, 0.5).select_videos([VideoTokens(torch.zeros(3, 4, 5), (3, 2, 2))])
    assert not choice.mask.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the splice compiles there)")
@pytest.mark.parametrize("merged", [True, False])
def test_compiled_splice_of_padded_selections_equals_the_plain_one(merged) -> None:
    from llava.model.compression import _padded_splicer, splice

    g = torch.Generator().manual_seed(0)
    features = torch.randn(4, 6, 8, generator=g).to(torch.bfloat16).cuda()
    cases = [(torch.tensor([1, 5, 9, 23, 24, 24]), 4, True), (torch.tensor([3, 1, 24, 24, 24, 24]), 2, True),
             (torch.tensor([0, 2, 24, 24, 24, 24]), 2, False), (torch.tensor([0, 2, 30, 24, 24, 24]), 3, True)]
    for source, count, valid in cases:
        new = torch.randn(6, 8, generator=g).cuda() if merged else None
        args = (features, source.cuda(), new, torch.tensor(count).cuda(), torch.tensor(valid).cuda())
        plain, fused = splice(*args), _padded_splicer(True)(*args)
        for a, b in zip(plain, fused, strict=True):  # mask, sources, values, rank
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.parametrize(
    "source,valid",
    [
        (torch.tensor([3, 1]), None),  # not ascending
        (torch.tensor([1, 1]), None),  # not unique
        (torch.tensor([0, 12]), None),  # out of range
        (torch.tensor([-1, 2]), None),
        (torch.tensor([0, 5]), torch.tensor(False)),  # refused input (e.g. NaN), read with the kept counts
    ],
)
def test_invalid_output_gives_an_empty_mask_that_the_count_check_reports(source, valid) -> None:
    """Checked on the device (no host sync in the selection): the adapters' one count read raises."""
    broken = Method(
        f"_test_broken_{next(_BROKEN)}",
        _Knobs,
        select=lambda video, r, o: VideoSelection(source, torch.ones(2, 5), valid),
        merges=True,
    )
    register_method(broken)
    spec = CompressionSpec(broken.name, 0.5)
    [choice] = spec.select_videos([VideoTokens(torch.zeros(3, 4, 5), (3, 2, 2))])
    assert not choice.mask.any()
    with pytest.raises(ValueError, match="kept no video token: features or signals contain NaN or Inf, or the "
                       "method returned sources that are not unique, ascending and within the video"):
        spec.check_kept([int(choice.mask.sum())])


@pytest.mark.parametrize(
    "source,features,match",
    [
        (torch.tensor([0.0, 1.0]), None, "expected a \\(K,\\) int64 tensor"),
        (torch.zeros(0, dtype=torch.int64), None, "kept no video token"),
        (torch.tensor([0, 1]), torch.zeros(3, 5), r"returned features \(3, 5\) for 2 sources"),
    ],
)
def test_malformed_method_output_fails_loudly(source, features, match) -> None:
    broken = Method(
        f"_test_broken_{next(_BROKEN)}",
        _Knobs,
        select=lambda video, r, o: VideoSelection(source, features),
        merges=True,
    )
    register_method(broken)
    with pytest.raises(ValueError, match=match):
        CompressionSpec(broken.name, 0.5).select_videos([VideoTokens(torch.zeros(3, 4, 5), (3, 2, 2))])


def test_registry_lists_methods_with_their_declarations() -> None:
    assert get_method("vidcom2").masks is not None and not get_method("vidcom2").merges
    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("vidcom2"))
    with pytest.raises(ValueError, match="cannot contain '.'"):
        register_method(Method("a.b", _Knobs, select=_merge_first_two))
    with pytest.raises(ValueError, match="unknown signal"):
        Method("x", _Knobs, signals=frozenset({"attention"}), select=_merge_first_two)
    with pytest.raises(TypeError, match="options must be a dataclass"):
        Method("x", dict, select=_merge_first_two)
