"""lmms-eval output folders -> results CSVs (thin front end of vidcom2_lmms_eval.collect; same as `vidcom2 collect`).

    python scripts/collect_results.py logs/llava_ov --out results --name llava_ov \
        --paper results/paper/paper_accuracy.csv --expect-runs 3
"""

import sys

from llava.cli import main

if __name__ == "__main__":
    sys.exit(main(["collect", *sys.argv[1:]]))
