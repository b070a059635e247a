"""bench_pipeline.py: the scaling of a slice's CPU time, and that every stage's command is one the scripts accept."""
from pathlib import Path

import pytest

import bench_pipeline as bp


def test_a_slice_scales_to_the_full_stage_by_its_work_start_up_once():
    # 10 s of start-up and 30 s of work for 10 of 40 steps: 10 + 30 x 4 (hand-computed)
    assert bp.scaled(40.0, 10.0, 4.0) == pytest.approx(130.0)
    assert bp.scaled(5.0, 10.0, 4.0) == pytest.approx(10.0)  # a slice cheaper than the start-up adds no work
    assert bp.EVAL_FACTOR == pytest.approx(200 / 48) == pytest.approx(100 / 24)


@pytest.mark.parametrize("arm", list(bp.ARMS))
def test_every_stage_is_a_command_its_script_accepts(arm):
    import attack
    import evaluate
    import tvaccine
    scripts = {"tvaccine.py": tvaccine, "attack.py": attack, "evaluate.py": evaluate}
    for run in bp.ALIGN:
        for stage, cmd in bp.stages(arm, run, Path("/tmp/p"), "/data", Path("/runs")).items():
            args = scripts[cmd[1]].parse_args(cmd[2:])
            assert args.seed == 1 and args.dtype == bp.ARMS[arm][int(stage.startswith("eval"))].split()[1]
