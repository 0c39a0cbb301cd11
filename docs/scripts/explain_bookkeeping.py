"""`gmar explain` end to end, with the time spent in OutputFolder (its writers' own time excluded).

    python docs/scripts/explain_bookkeeping.py explain img6000 --model reference --method rollout --out out6000

Wraps OutputFolder.reserve, .write and .close with timers, runs the command in this process and
prints the total, the bookkeeping's share and the writers' time on stderr.
"""
import sys, time
import gmar.outputs as O

spent = {"bookkeeping": 0.0, "writers": 0.0}
original_write, original_reserve, original_close = O.OutputFolder.write, O.OutputFolder.reserve, O.OutputFolder.close

def write(self, name, writer):
    def timed(path):
        start = time.perf_counter()
        try:
            return writer(path)
        finally:
            spent["writers"] += time.perf_counter() - start
    start, before = time.perf_counter(), spent["writers"]
    try:
        return original_write(self, name, timed)
    finally:
        spent["bookkeeping"] += (time.perf_counter() - start) - (spent["writers"] - before)

def timed_method(original):
    def method(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent["bookkeeping"] += time.perf_counter() - start
    return method

O.OutputFolder.write = write
O.OutputFolder.reserve = timed_method(original_reserve)
O.OutputFolder.close = timed_method(original_close)
from gmar.frontends.cli import main

start = time.perf_counter()
code = main(sys.argv[1:])
total = time.perf_counter() - start
print(f"exit {code}: total {total:.1f} s, bookkeeping {spent['bookkeeping']:.2f} s ({100 * spent['bookkeeping'] / total:.2f} %), writers {spent['writers']:.1f} s", file=sys.stderr)
