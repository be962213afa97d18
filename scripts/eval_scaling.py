"""The same lmms-eval stream at 1, 2, 4, 8 processes (GPUs) -> results/eval_scaling_h200.csv (one row per
finished run; thin front end of vidcom2_lmms_eval.scaling).

    python scripts/eval_scaling.py --model llava_onevision \
        --model-args pretrained=lmms-lab/llava-onevision-qwen2-7b-ov,conv_template=qwen_1_5,max_frames_num=32 \
        --tasks mvbench --compressors none,vidcom2 --retention 0.25 --gpus 1,2,4,8
    python scripts/eval_scaling.py --cpu --gpus 1,2 --out /tmp/scaling_cpu.csv ...   # a CPU smoke run
"""

import sys

from vidcom2_lmms_eval.scaling import main

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, RuntimeError) as exc:  # bad options, a failed run: one line, no traceback
        print(f"eval_scaling: error: {exc}", file=sys.stderr)
        sys.exit(2)
