"""lmms-eval integration for VidCom2: model wrappers, efficiency meter, synthetic task and result collector.

The wrappers are registered through lmms-eval's ``lmms_eval.models`` entry points (see
:mod:`vidcom2_lmms_eval.manifests`), so ``python -m lmms_eval --model llava_onevision ...`` picks
them up after ``pip install`` without forking lmms-eval.
"""
