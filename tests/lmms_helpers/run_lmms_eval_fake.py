"""Run the real lmms-eval CLI in this process with the fake model behind our wrappers.

Usage: python tests/lmms_helpers/run_lmms_eval_fake.py <lmms-eval args>   (also under torchrun)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vidcom2_lmms_eval.wrappers as wrappers  # noqa: E402
from fake_model import fake_loader  # noqa: E402

wrappers.load_video_llm = fake_loader

if __name__ == "__main__":
    from lmms_eval.__main__ import cli_evaluate

    if sys.argv[1:2] == ["lmms_eval"]:  # called as a launcher in place of `python -m`
        del sys.argv[1]

    cli_evaluate()
