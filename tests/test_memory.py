"""The driver's memory figures in the run summary: resident memory measured from /proc, and freed heap
handed back to the OS after a training job (issue 27)."""
from restpg import pipeline
from restpg.runtime import peak_rss_bytes, release_memory, rss_bytes


def test_resident_memory_follows_an_allocation_and_the_peak_keeps_it():
    before = rss_bytes()
    block = bytearray(300 * 2**20)  # zero-filled: every page touched
    during = rss_bytes()
    assert during - before > 250 * 2**20
    assert peak_rss_bytes() >= 0.99 * during  # the kernel updates its high-water mark lazily
    del block


def test_release_hands_the_holes_of_a_fragmented_heap_back():
    """Freed blocks between live ones stay resident after `free` (the heap cannot shrink past a live block);
    `release_memory` returns their pages."""
    base = rss_bytes()
    blocks = [bytearray(4000) for _ in range(60_000)]
    grown = rss_bytes() - base
    kept = blocks[::50]  # one live block in fifty pins the heap
    del blocks
    import gc

    gc.collect()
    assert rss_bytes() - base > 0.8 * grown  # freed, yet resident
    release_memory()
    assert rss_bytes() - base < 0.3 * grown
    assert len(kept) == 1200


def test_memory_line_names_each_training_job():
    line = pipeline.memory_line({"train [variant=sft/iteration=0]": 3 * 2**30, "train [variant=rest_em/iteration=1]": 2**30})
    assert line.startswith("Driver memory (GB): peak ")
    assert line.endswith("after each training job: sft/0 3.00; rest_em/1 1.00")
    assert "after each" not in pipeline.memory_line({})
