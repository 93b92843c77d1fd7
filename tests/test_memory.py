"""The driver's memory figures in the run summary: resident memory measured from /proc, and freed heap
handed back to the OS after a training job (issue 27)."""
from restpg import pipeline
from restpg.runtime import peak_rss_bytes, rss_bytes


def test_resident_memory_follows_an_allocation_and_the_peak_keeps_it():
    before = rss_bytes()
    block = bytearray(300 * 2**20)  # zero-filled: every page touched
    during = rss_bytes()
    assert during - before > 250 * 2**20
    assert peak_rss_bytes() >= 0.99 * during  # the kernel updates its high-water mark lazily
    del block


_FRAGMENT = """
import gc, json
from restpg.runtime import release_memory, rss_bytes
base = rss_bytes()
blocks = [bytearray(4000) for _ in range(60_000)]
grown = rss_bytes() - base
kept = blocks[::50]  # one live block in fifty pins the heap
del blocks
gc.collect()
freed = rss_bytes() - base
release_memory()
print(json.dumps({"grown": grown, "freed": freed, "released": rss_bytes() - base, "kept": len(kept)}))
"""


def test_release_hands_the_holes_of_a_fragmented_heap_back():
    """Freed blocks between live ones stay resident after `free` (the heap cannot shrink past a live block);
    `release_memory` returns their pages. Measured in a fresh interpreter: a test worker's own heap (gigabytes,
    full of holes from earlier tests) would serve the blocks from its holes and hide both effects."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True, check=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    assert m["grown"] > 200 * 2**20
    assert m["freed"] > 0.8 * m["grown"]  # freed, yet resident
    assert m["released"] < 0.3 * m["grown"]
    assert m["kept"] == 1200


def test_memory_line_names_each_training_job():
    line = pipeline.memory_line({"train [variant=sft/iteration=0]": 3 * 2**30, "train [variant=rest_em/iteration=1]": 2**30})
    assert line.startswith("Driver memory (GB): peak ")
    assert line.endswith("after each training job: sft/0 3.00; rest_em/1 1.00")
    assert "after each" not in pipeline.memory_line({})
