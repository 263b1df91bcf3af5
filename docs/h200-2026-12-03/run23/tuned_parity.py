"""Take the Triton FP8 rows of a --tune run (the rows format_tune prints), then run the fp8 parity with them."""
import json, sys
from mlakv.bench.fp8_bench import _parse_shape, _parse_parts
from mlakv.bench.report import table_steps
from mlakv.spec import tuning
from mlakv.bench import parity

res = json.load(open(sys.argv[1]))
for kind, by_n in res["triton"].items():
    best, parts = [], []
    for n in sorted(by_n, key=int):
        timed = sorted((v, k) for k, v in by_n[n].items() if not isinstance(v, str))
        best.append((int(n), _parse_shape(timed[0][1])))
        parts.append((int(n), (_parse_parts(timed[0][1]),)))
    rows = tuple(table_steps(best))
    print(f"FP8_TRITON_STEPS[{kind!r}] = {rows!r}  (was {tuning.FP8_TRITON_STEPS[kind]!r})", flush=True)
    tuning.FP8_TRITON_STEPS[kind] = rows
    if kind in tuning.FP8_TRITON_PARTS:
        prow = tuple(table_steps(parts))
        print(f"FP8_TRITON_PARTS[{kind!r}] = {prow!r}  (was {tuning.FP8_TRITON_PARTS[kind]!r})", flush=True)
        tuning.FP8_TRITON_PARTS[kind] = prow
sys.exit(parity.main(sys.argv[2:]))
