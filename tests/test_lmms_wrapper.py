"""Wrapper behaviour in process (fake model): answers, token counts, failure paths, resume, chat API."""

import sys
from pathlib import Path

import pytest
import vidcom2_lmms_eval.wrappers as wrappers
from lmms_eval.api.instance import Instance
from vidcom2_lmms_eval.synthetic_task import build_task, doc_to_text, doc_to_visual

from llava.synthetic_videos import make_videos

sys.path.insert(0, str(Path(__file__).resolve().parent / "lmms_helpers"))
from fake_model import FakeVideoLLM, fake_loader  # noqa: E402

GEN = {"max_new_tokens": 4, "temperature": 0, "until": ["\n"]}


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("synth")
    make_videos(root / "videos")
    task = build_task(root / "task", root / "videos", broken=True)
    return [json.loads(line) for line in (task / "docs.jsonl").read_text().splitlines()]


def _wrapper(monkeypatch, tmp_path, chat=False, **args):
    monkeypatch.setattr(wrappers, "load_video_llm", fake_loader)
    cls = wrappers.Qwen3VLChat if chat else wrappers.LlavaOneVision
    w = cls(pretrained="fake", meter_dir=str(tmp_path / "meter"), **args)
    return w


def _requests(w, docs, ids, chat=False, visual=doc_to_visual):
    w.task_dict = {"synth": {"test": {d["doc_id"]: d for d in docs}}}
    reqs = []
    for i in ids:
        if chat:

            def to_messages(doc):
                return [
                    {
                        "role": "user",
                        "content": [{"type": "video", "url": doc["video"]}, {"type": "text", "text": doc_to_text(doc)}],
                    }
                ]

            args = ("ctx", to_messages, dict(GEN), i, "synth", "test")
        else:
            args = (doc_to_text(docs[i]), dict(GEN), visual, i, "synth", "test")
        reqs.append(Instance("generate_until", args, 0, metadata={"task": "synth", "doc_id": i, "repeats": 1}))
    return reqs


def test_answers_with_token_counts_and_meter(monkeypatch, tmp_path, docs):
    w = _wrapper(monkeypatch, tmp_path, compressor="vidcom2", retention=0.25, max_frames_num=4)
    out = w.generate_until(_requests(w, docs, [0, 3]))
    assert [o.text for o in out] == ["A", "A"]
    assert out[0].token_counts.input_tokens == 16 and out[0].token_counts.output_tokens == 1  # 4 frames*16*0.25
    assert len(w.meter.records) == 2 and w.meter.records[0].tokens_before == 64
    path = w.finalize_meter()
    assert path is not None and path.parent == tmp_path / "meter"


def test_missing_and_corrupt_video_raise_with_doc_id_and_path(monkeypatch, tmp_path, docs):
    w = _wrapper(monkeypatch, tmp_path)
    missing, corrupt = len(docs) - 2, len(docs) - 1
    with pytest.raises(
        wrappers.VideoSampleError, match=f"synth doc_id={missing}: cannot read video .*does_not_exist.mp4"
    ):
        w.generate_until(_requests(w, docs, [0, missing]))
    with pytest.raises(wrappers.VideoSampleError, match=f"synth doc_id={corrupt}: cannot read video .*corrupt.mp4"):
        w.generate_until(_requests(w, docs, [corrupt]))


def test_on_video_error_record_counts_failed_samples(monkeypatch, tmp_path, docs):
    w = _wrapper(monkeypatch, tmp_path, on_video_error="record", batch_size=2)
    ids = [0, len(docs) - 2, len(docs) - 1, 1]
    out = w.generate_until(_requests(w, docs, ids))
    assert [o.text for o in out] == ["A", "", "", "A"]  # nothing dropped, order kept
    statuses = [(r.doc_id, r.status) for r in w.meter.records]
    assert sorted(statuses) == sorted([(0, "ok"), (ids[1], "failed"), (ids[2], "failed"), (1, "ok")])
    assert all(r.error and str(r.doc_id) in r.error for r in w.meter.records if r.status == "failed")


def test_resume_skips_finished_samples(monkeypatch, tmp_path, docs):
    w = _wrapper(monkeypatch, tmp_path, resume_dir=str(tmp_path / "resume"))
    w.generate_until(_requests(w, docs, [0, 1]))
    w2 = _wrapper(monkeypatch, tmp_path, resume_dir=str(tmp_path / "resume"))
    out = w2.generate_until(_requests(w2, docs, [0, 1, 2]))
    assert [o.text for o in out] == ["A", "A", "A"]
    assert len(w2.model.calls) == 1  # only doc 2 ran
    assert [r.status for r in w2.meter.records] == ["cached", "cached", "ok"]
    w3 = _wrapper(monkeypatch, tmp_path, resume_dir=str(tmp_path / "resume"), compressor="vidcom2", retention=0.5)
    w3.generate_until(_requests(w3, docs, [0]))
    assert len(w3.model.calls) == 1  # another compression is another run signature
    w4 = _wrapper(monkeypatch, tmp_path, resume_dir=str(tmp_path / "resume"), decode_mode="static")
    w4.generate_until(_requests(w4, docs, [0]))
    assert len(w4.model.calls) == 1  # so is another decode mode


def test_padding_requests_are_not_metered(monkeypatch, tmp_path, docs):
    w = _wrapper(monkeypatch, tmp_path)
    reqs = _requests(w, docs, [0, 0])
    reqs[1].metadata["__padding_only__"] = True
    assert len(w.generate_until(reqs)) == 2 and len(w.meter.records) == 1


def test_chat_api_and_batch_without_answer_batch(monkeypatch, tmp_path, docs):
    w = _wrapper(monkeypatch, tmp_path, chat=True)
    out = w.generate_until(_requests(w, docs, [4], chat=True))
    assert out[0].text == "A" and w.model.calls[0][0] == docs[4]["video"]
    monkeypatch.delattr(FakeVideoLLM, "answer_batch")
    with pytest.raises(ValueError, match="batch_size=2.*no answer_batch"):
        _wrapper(monkeypatch, tmp_path, batch_size=2)


def test_adapter_mismatch_is_an_error(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="conv_template='vicuna_v1'"):
        _wrapper(monkeypatch, tmp_path, conv_template="vicuna_v1")


def test_preprocess_device_reaches_an_adapter_that_has_one(monkeypatch, tmp_path):
    monkeypatch.setattr(FakeVideoLLM, "preprocess_device", None, raising=False)
    w = _wrapper(monkeypatch, tmp_path, preprocess_device="cuda")
    assert w.model.preprocess_device == "cuda"
    monkeypatch.delattr(FakeVideoLLM, "preprocess_device")
    with pytest.raises(ValueError, match="preprocess_device"):
        _wrapper(monkeypatch, tmp_path, preprocess_device="cuda")


def test_pool_mode_is_applied_like_the_builtin_wrappers(monkeypatch, tmp_path):
    """lmms-eval's LLaVA wrappers override the checkpoint's pooling with their default or the given value."""
    paper_args = {"conv_template": "qwen_1_5", "model_name": "llava_qwen", "mm_spatial_pool_mode": "average"}
    w = _wrapper(monkeypatch, tmp_path, **paper_args)
    assert w.model.mm_spatial_pool_mode == "average"
    monkeypatch.setattr(FakeVideoLLM, "mm_spatial_pool_mode", "max")
    assert _wrapper(monkeypatch, tmp_path).model.mm_spatial_pool_mode == "bilinear"  # llava_onevision's default


def _exiting_visual(doc):
    """lmms-eval 0.7.3's videomme / mlvu_dev doc_to_visual on a missing file."""
    if doc["video_name"] == "missing":
        raise SystemExit(f"video path:{doc['video']} does not exist, please check")
    return [doc["video"]]


def test_a_task_that_calls_sys_exit_names_task_doc_and_path(monkeypatch, tmp_path, docs):
    w = _wrapper(monkeypatch, tmp_path)
    missing = len(docs) - 2
    reqs = _requests(w, docs, [0, missing], visual=_exiting_visual)
    with pytest.raises(wrappers.VideoSampleError, match=f"synth doc_id={missing}: .*sys.exit.*does_not_exist.mp4"):
        w.generate_until(reqs)


def test_a_task_that_calls_sys_exit_is_a_recorded_failure_with_record(monkeypatch, tmp_path, docs):
    w = _wrapper(monkeypatch, tmp_path, on_video_error="record")
    missing = len(docs) - 2
    reqs = _requests(w, docs, [0, missing, 1], visual=_exiting_visual)
    out = w.generate_until(reqs)
    assert [o.text for o in out] == ["A", "", "A"]
    failed = [r for r in w.meter.records if r.status == "failed"]
    assert [(r.task, r.doc_id) for r in failed] == [("synth", missing)] and "does_not_exist.mp4" in failed[0].error


def test_a_task_bug_in_doc_to_visual_is_not_a_video_failure(monkeypatch, tmp_path, docs):
    w = _wrapper(monkeypatch, tmp_path, on_video_error="record")
    reqs = _requests(w, docs, [0], visual=lambda doc: [doc["no_such_field"]])
    with pytest.raises(ValueError, match="synth doc_id=0: the task's doc_to_visual raised KeyError"):
        w.generate_until(reqs)


@pytest.mark.parametrize("arch", ["llava_ov", "qwen2_5_vl"])
def test_batch_size_batches_real_models_each_video_on_its_budget(tmp_path, docs, arch):
    """--batch_size N: a tiny checkpoint of each family answers N requests per answer_batch call, with the
    answers and per-video kept counts of one-by-one runs (each video compressed on its own budget)."""
    from llava.families_index import tiny_builders

    path = tiny_builders()[arch](tmp_path / arch, seed=3)
    cls = wrappers.LlavaOneVision if arch == "llava_ov" else wrappers.Qwen25VL
    ids = [0, 3, 6, 9, 12]  # five different videos
    runs = {}
    for batch in (1, 3):
        w = cls(pretrained=str(path), compressor="vidcom2", retention=0.5, max_frames_num=4, batch_size=batch,
                meter_dir=str(tmp_path / f"meter{batch}"), prefetch_workers=0)
        sizes = []
        for name in ("answer", "answer_batch", "answer_prepared"):  # the wrapper's read-ahead uses the last

            def counting(*args, _original=getattr(w.model, name), _sizes=sizes, **kwargs):
                out = _original(*args, **kwargs)
                _sizes.append(len(out) if isinstance(out, list) else 1)
                return out

            setattr(w.model, name, counting)
        texts = [o.text for o in w.generate_until(_requests(w, docs, ids))]
        kept = {r.doc_id: (r.tokens_before, r.tokens_after, r.batch_size) for r in w.meter.records}
        runs[batch] = (texts, kept, sizes)
    assert runs[3][2] == [3, 2] and runs[1][2] == [1] * 5  # two calls: 3 + 2 requests
    assert runs[3][0] == runs[1][0]
    assert {d: k[:2] for d, k in runs[3][1].items()} == {d: k[:2] for d, k in runs[1][1].items()}
    assert all(0 < after < before for before, after, _ in runs[3][1].values())
    assert sorted(k[2] for k in runs[3][1].values()) == [2, 2, 3, 3, 3]


@pytest.mark.parametrize("arch", ["llava_ov", "qwen2_vl"])
def test_device_map_splits_the_model_and_answers_as_unsplit(tmp_path, docs, arch):
    """model_args device_map=<JSON file> with the second half of the LM on disk (accelerate's hooks load it
    per layer): the wrapper's answers and kept counts equal the unsplit wrapper's; several processes with a
    split map are refused."""
    import json

    from llava.families_index import load_video_llm, tiny_builders

    path = tiny_builders()[arch](tmp_path / arch, seed=3)
    whole = load_video_llm(path)
    if arch == "llava_ov":
        body, layers = "language_model.model.", whole.model.language_model.model.layers
        rest = {"vision": "cpu", "projector": "cpu", "image_newline": "cpu", "language_model.lm_head": "cpu"}
    else:
        body, layers = "model.language_model.", whole.model.model.language_model.layers
        rest = {"model.visual": "cpu", "lm_head": "cpu"}
    rest.update({f"{body}{n}": "cpu" for n in ("embed_tokens", "norm", "rotary_emb")})
    half = {f"{body}layers.{i}": "cpu" if i < len(layers) // 2 else "disk" for i in range(len(layers))}
    device_map = tmp_path / "map.json"
    device_map.write_text(json.dumps({**rest, **half}))
    cls = wrappers.LlavaOneVision if arch == "llava_ov" else wrappers.Qwen2VL
    common = {"pretrained": str(path), "compressor": "vidcom2", "retention": 0.5, "max_frames_num": 4,
              "prefetch_workers": 0, "device": "cpu", "dtype": "float32"}  # fmt: skip
    runs = []
    for extra in ({}, {"device_map": str(device_map), "offload_dir": str(tmp_path / "offload")}):
        w = cls(**common, **extra, meter_dir=str(tmp_path / f"meter{len(runs)}"))
        texts = [o.text for o in w.generate_until(_requests(w, docs, [0, 3]))]
        runs.append((texts, [(r.tokens_before, r.tokens_after) for r in w.meter.records]))
    assert "disk" in w.model.model.hf_device_map.values()
    offloaded = (w.model.model.language_model.model if arch == "llava_ov" else w.model.model.model.language_model)
    assert offloaded.layers[-1].mlp.down_proj.weight.device.type == "meta"  # loaded by the hook per call
    assert runs[1] == runs[0]


def test_a_split_device_map_needs_one_process(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"splits one model over this host's devices; 2 processes .* \(GPUS=1\)"):
        wrappers.LlavaOneVision(pretrained="fake", device_map="auto", meter_dir=str(tmp_path))
