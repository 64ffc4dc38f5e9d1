"""benchmarks/rlvr_seeds.py's fresh problems (none in the bundled pool, the same every time) and their table."""

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script():
    sys.path.insert(0, str(REPO / "benchmarks"))  # (it imports benchmarks/seeds.py)
    try:
        spec = importlib.util.spec_from_file_location("rlvr_seeds", REPO / "benchmarks" / "rlvr_seeds.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def test_fresh_problems_are_outside_the_bundled_pool_and_the_same_every_time(tmp_path):
    from lit_rlhf.data.arithmetic import arithmetic_splits

    script = load_script()
    rows = [json.loads(line) for line in script.write_fresh_problems(tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == script.FRESH == len({r["prompt"] for r in rows})
    pool = {row["prompt"] for split in arithmetic_splits().values() for row in split}
    assert not pool & {r["prompt"] for r in rows}
    assert all(str(eval(r["prompt"][:-1])) == r["answer"] for r in rows)  # (digits, + and - only)
    assert (tmp_path / "a.jsonl").read_text() == script.write_fresh_problems(tmp_path / "b.jsonl").read_text()


def test_the_fresh_table_has_each_seed_and_the_mean_and_sd():
    script = load_script()
    table = script.render_fresh({0: {"before": 20.0, "after": 30.0, "change": 10.0},
                                 1: {"before": 20.0, "after": 34.0, "change": 14.0}})
    assert "| 0 | 20.0 | 30.0 | +10.0 |" in table and "| 1 | 20.0 | 34.0 | +14.0 |" in table
    assert "| mean ± sd | 20.0 ± 0.0 | 32.0 ± 2.8 | +12.0 ± 2.8 |" in table  # sample sd of 10 and 14: 2.83
