"""Peak RSS of streamed scoring by batch size (RESULTS.md, issue 13): python benchmarks/stream_peak_by_batch.py 8 on a folder
written by `python benchmarks/make_nemotron_8b.py --out benchmarks/out/nemotron-h-8b-first4 --layers 4 --shard-gb 1`."""
import sys
import time
from pathlib import Path

from hyprune.data import calibration_windows
from hyprune.models import load_tokenizer
from hyprune.stream.score import stream_activation_scores
REPO = Path(__file__).resolve().parents[1]
path = str(REPO / "benchmarks" / "out" / "nemotron-h-8b-first4")
bs = int(sys.argv[1])
w = calibration_windows(load_tokenizer(path), str(REPO / ".." / "shared" / "data" / "pystdlib" / "train.txt.gz"), 256, 16, seed=0)
t = time.time()
stream_activation_scores(path, w, batch_size=bs, dtype="bfloat16", progress=False)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(f"batch {bs}: {time.time()-t:.0f} s, VmHWM {int(hwm)/1024:.0f} MiB", flush=True)
