"""Time gmar's output bookkeeping on many files: what `gmar explain` asks of OutputFolder, writers aside.

    python docs/scripts/output_bookkeeping.py 6000                  # this checkout's gmar.outputs
    git show 9dbe572:src/gmar/outputs.py > /tmp/old_outputs.py
    python docs/scripts/output_bookkeeping.py 1000 /tmp/old_outputs.py  # another outputs.py (before)

For each of N images it calls ``reserve`` and writes two files (the figure and the GMAR heads, as
``gmar explain`` does by default) with a writer that puts 3 bytes; then ``close`` when there is
one. The writer's own time is subtracted, so what is printed is the bookkeeping alone.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    count = int(sys.argv[1])
    if len(sys.argv) > 2:
        spec = importlib.util.spec_from_file_location("outputs_under_test", sys.argv[2])
        outputs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(outputs)
    else:
        import gmar.outputs as outputs
    writing = 0.0

    def writer(path: Path) -> None:
        nonlocal writing
        start = time.perf_counter()
        path.write_bytes(b"png")
        writing += time.perf_counter() - start

    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        folder = outputs.OutputFolder(Path(scratch) / "out")
        for i in range(count):
            base = folder.reserve(f"im{i:05d}.png", [".png", "_gmar_heads.png"], f"im{i:05d}.png")
            folder.write(base + ".png", writer)
            folder.write(base + "_gmar_heads.png", writer)
        getattr(folder, "close", lambda: None)()
        total = time.perf_counter() - start
        listed = len(outputs.read_manifest(Path(scratch) / "out"))
    bookkeeping = total - writing
    print(
        f"{count} images, {2 * count} files ({listed} listed): bookkeeping {bookkeeping:.2f} s "
        f"({1000 * bookkeeping / (2 * count):.2f} ms per file), writers {writing:.2f} s"
    )


if __name__ == "__main__":
    main()
