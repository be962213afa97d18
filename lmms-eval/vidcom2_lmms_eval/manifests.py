"""Entry-point payload: our wrappers take over the lmms-eval ids that task prompts are keyed on.

lmms-eval 0.7.3 merges entry-point manifests with ``overwrite=True`` *field by field*: a manifest
without ``chat_class_path`` would leave the built-in chat class of qwen2_5_vl / qwen3_vl in place,
and the CLI resolves chat first. So every id whose built-in has a chat class gets ours too.
"""

from __future__ import annotations

from typing import Any

_MODULE = "vidcom2_lmms_eval.wrappers"

# model id -> (simple class, chat class or None); chat classes only where lmms-eval 0.7.3 has one
# (AVAILABLE_CHAT_TEMPLATE_MODELS in lmms_eval/models/__init__.py: qwen2_5_vl, qwen3_vl).
WRAPPED_IDS: dict[str, tuple[str, str | None]] = {
    "llava_onevision": ("LlavaOneVision", None),
    "llava_vid": ("LlavaVid", None),
    "qwen2_vl": ("Qwen2VL", None),
    "qwen2_5_vl": ("Qwen25VL", "Qwen25VLChat"),
    "qwen3_vl": ("Qwen3VL", "Qwen3VLChat"),
}


def manifests() -> list[Any]:
    """Called by lmms-eval when it builds its model registry (a list of ModelManifest).

    ModelManifest is imported here, not at module level: importing lmms_eval.models builds the
    registry, which loads this module; a module-level import would make that a circular import
    whenever this module is imported first (the failure is only logged by lmms-eval).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=model_id,
            simple_class_path=f"{_MODULE}.{simple}",
            chat_class_path=f"{_MODULE}.{chat}" if chat else None,
        )
        for model_id, (simple, chat) in WRAPPED_IDS.items()
    ]
