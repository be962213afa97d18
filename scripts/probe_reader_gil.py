"""Do prefetch threads hold the GIL? And how many samples/s can the host stage deliver? (CPU only)

Why: the prefetching reader (llava.prefetch) runs the adapters' host stage (decode, tokenise, Qwen's HF
processor) on threads beside the launch-bound GPU loop. A thread that held the GIL would delay every
kernel launch of that loop. The probe: the main thread releases and re-takes the GIL in a tight loop
(``time.sleep(0)``) and records how long each re-take waits, beside a worker that

- idles (floor), computes in numpy without the GIL (CPU contention only), runs pure Python (holds
  the GIL: the ceiling), or runs ``prepare_batch`` of a tiny LLaVA-OV / a Qwen2.5-VL adapter with the
  full-size video processor (448 x 448 pixels per frame) on a 32-frame 384 x 384 mp4.

A prepare worker close to the numpy row and far from the Python row releases the GIL while it works.
Then the host stage alone is timed with 1..W threads (samples/s it can feed the GPU loop).

    python scripts/probe_reader_gil.py [--workers 1,2,4] [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _adapters(work: Path) -> dict[str, Callable[[], object]]:
    from llava.bench.efficiency import write_bench_video
    from llava.families_index import load_video_llm
    from llava.model.tiny import write_tiny_llava
    from llava.runtime import FrameSampling
    from transformers_patched.qwen_adapter import QwenVideoLLM
    from transformers_patched.qwen_tiny import build_tiny_qwen, full_size_processor

    video = write_bench_video(work / "probe_32f.mp4", 32)
    llava = load_video_llm(write_tiny_llava(work / "ov", arch="llava_ov", seed=0))
    processor, _ = full_size_processor("qwen2_5_vl")
    qwen = QwenVideoLLM(load_video_llm(build_tiny_qwen("qwen2_5_vl", work / "q", seed=0)).model, processor)
    llava_sampling = FrameSampling(num_frames=32)
    qwen_sampling = FrameSampling(num_frames=32, min_pixels=448 * 448, max_pixels=448 * 448)
    return {
        "llava_prepare": lambda: llava.prepare_batch([video], ["Describe the video."], llava_sampling),
        "qwen_prepare": lambda: qwen.prepare_batch([video], ["Describe the video."], qwen_sampling),
    }


def _reacquire_ms(seconds: float) -> np.ndarray:
    waits = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        time.sleep(0)
        waits.append(time.perf_counter() - t)
    return np.asarray(waits) * 1e3


def _beside(work: Callable[[], object] | None, seconds: float) -> np.ndarray:
    if work is None:
        return _reacquire_ms(seconds)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.2)
    try:
        return _reacquire_ms(seconds)
    finally:
        stop.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    data = np.ones(2_000_000)

    def python_loop() -> None:
        total = 0
        for i in range(200_000):
            total += i

    with tempfile.TemporaryDirectory(prefix="probe_reader_") as tmp:
        prepares = _adapters(Path(tmp))
        workers: dict[str, Callable[[], object] | None] = {
            "idle": None,
            "numpy (no GIL)": lambda: np.sqrt(data, out=data),
            "pure Python": python_loop,
            **prepares,
        }
        print("main thread's wait to re-take the GIL, beside one worker:")
        for name, work in workers.items():
            waits = _beside(work, args.seconds)
            print(f"  {name:16s} p50 {np.percentile(waits, 50):6.3f} ms  p99 {np.percentile(waits, 99):6.2f} ms")
        from concurrent.futures import ThreadPoolExecutor

        print("host stage alone, samples/s:")
        for name, prepare in prepares.items():
            prepare()
            for n in [int(x) for x in args.workers.split(",")]:
                count = 4 * n
                with ThreadPoolExecutor(n) as pool:
                    start = time.perf_counter()
                    for future in [pool.submit(prepare) for _ in range(count)]:
                        future.result()
                    rate = count / (time.perf_counter() - start)
                print(f"  {name:16s} {n} thread(s): {rate:6.2f} samples/s")


if __name__ == "__main__":
    main()
