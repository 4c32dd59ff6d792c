"""docs/scale.md's table is the one tools/scale_plan.py computes from the measured results."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("scale_plan", ROOT / "tools" / "scale_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scale_table_is_up_to_date():
    assert _tool().main(["--check"]) == 0


def test_the_projection_follows_its_formula():
    tool = _tool()
    x = tool.inputs()
    rows = [line for line in tool.block(x).splitlines() if line.startswith("| 10^")]
    assert len(rows) == len(tool.USERS) * len(tool.MACHINES)
    # one machine, 10^6 users at size 64: U / r_64, no Ray overhead
    assert rows[0].split("|")[3].strip() == tool._time(10**6 / x["rates"][64])
    # 16 machines: the Ray overhead is added once
    assert rows[2].split("|")[3].strip() == tool._time(10**6 / (16 * x["rates"][64]) + max(0.0, x["overhead_s"]) + x["ray_init_s"])
