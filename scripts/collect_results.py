"""lmms-eval output folders -> results CSVs (thin front end of vidcom2_lmms_eval.collect; same as `vidcom2 collect`).

    python scripts/collect_results.py logs/llava_ov --out results --name llava_ov \
        --paper results/paper/paper_accuracy.csv [--runs none_f32,vidcom2_r0.25_f32] [--paper-model LLaVA-OV-7B]
"""

import sys

from vidcom2_lmms_eval.collect import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
