"""Check a table's planned runs before any is launched: ``python -m vidcom2_lmms_eval.plan_check ID NAME ARGS ...``.

Why: a table script plans rows for methods that may not be in the installed registry yet (the in-LLM
baselines) or with knobs a method does not have. lmms-eval only meets such an error when it builds the
model, logs it and exits 0, perhaps after hours of earlier runs. Here every planned run's exact
``--model_args`` string goes through the wrappers' own parser (:func:`vidcom2_lmms_eval.args.parse_model_args`:
method names, retention, every option) without loading a model; all problems are listed at once and
the exit status is 2 when there is any.
"""

from __future__ import annotations

import sys


def parse_args_string(text: str) -> dict[str, str]:
    """``k=v,k=v`` as lmms-eval splits --model_args (values stay strings; the wrappers' parser types them)."""
    out: dict[str, str] = {}
    for item in (p for p in text.split(",") if p.strip()):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model_args item {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def check_runs(model_id: str, runs: list[tuple[str, str]]) -> list[str]:
    """[(run name, model_args)] -> one problem line per run that the wrappers would refuse."""
    from vidcom2_lmms_eval.args import parse_model_args

    problems = []
    for name, model_args in runs:
        try:
            parse_model_args(model_id, parse_args_string(model_args), environ={})
        except ValueError as exc:
            problems.append(f"planned run {name}: {exc}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) < 3 or len(argv) % 2 == 0:
        print("usage: python -m vidcom2_lmms_eval.plan_check MODEL_ID NAME MODEL_ARGS [NAME MODEL_ARGS ...]")
        return 2
    runs = list(zip(argv[1::2], argv[2::2], strict=True))
    problems = check_runs(argv[0], runs)
    for line in problems:
        print(f"eval: {line}", file=sys.stderr)
    if problems:
        print(
            "eval: nothing was launched; leave those rows out with METHODS=... / RETENTIONS=..., or install a "
            "version whose registry has them",
            file=sys.stderr,
        )
        return 2
    print(f"eval: {len(runs)} planned runs checked against the installed registry")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
