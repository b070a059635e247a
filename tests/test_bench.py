"""bench.py's memory measurement (memtrack.py): the live-bytes tracker, and meta runs that reproduce real CPU runs
exactly; bench.py's tables."""
import pytest
import torch

import bench
import defences
from memtrack import LiveBytes, peak_memory, without_profiler_notes
from model import ModelArgs
from reference import make_batch, public_repnoise_terms

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames called by peft


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: no thread barriers
    yield
    torch.set_num_threads(before)


def test_live_bytes_counts_each_storage_once_until_it_is_freed():
    with LiveBytes() as mem:
        a = torch.ones(1000)         # 4000 B
        v = a.view(10, 100)          # a view: the same storage, not counted again
        b = a * 2                    # 8000 B live
        del a
        assert mem.now == 8000       # the view keeps a's storage alive
        del v
        c = b + 1                    # a's storage freed first: 8000 B again
        assert mem.now == 8000 and mem.peak == 8000
        del b, c
    assert mem.now == 0


def test_meta_sees_real_shapes_through_data_dependent_ops():
    with LiveBytes() as mem:
        labels = torch.tensor([[-100, 5, 7], [-100, -100, 3]]).to("meta")
        keep = labels != -100
        assert bool(keep.any()) and int(keep.sum().item()) == 3    # read from the CPU shadow
        x = torch.empty(2, 3, 16, device="meta")
        assert x[keep].shape == (3, 16)                             # boolean indexing: shape from the shadow
    assert mem.peak > 0


@pytest.mark.parametrize("stack,method", [("ours", "tvaccine"), ("ours-nockpt", "vaccine"), ("ref", "sft"),
                                          ("ours", "repnoise"), ("ours-nockpt", "tar")])
def test_meta_run_reproduces_the_real_cpu_peak(one_thread, stack, method):
    if stack == "ref":
        pytest.importorskip("peft")
    args = ModelArgs(vocab_size=256, dim=64, n_layers=3, n_heads=4, hidden_dim=96)
    batch, harm = make_batch(3, 24, 256, 0), make_batch(3, 24, 256, 1)
    S = [1, 2] if method == "tvaccine" else [0, 1, 2]
    real = peak_memory(stack, args, method, "cpu", S, batch, harm, torch.float32, profile=True)
    meta = peak_memory(stack, args, method, "meta", S, batch, harm, torch.float32)
    assert meta["peak"] == real["peak"]
    assert real["peak"] > real["weights"]
    assert abs(real["peak"] / real["allocator"] - 1) < 0.05  # the CPU allocator (+ kernel scratch) agrees
    if method == "tvaccine":
        assert set(real) >= {"importance", "step"}


def test_freeze_attention_keeps_the_graph_below_min_s_and_meta_still_matches(one_thread):
    """S = [1, 2]: with --freeze attention, layer 0's MLP LoRA trains, so pass 2 keeps layer 0's activations
    (no checkpointing): a higher step peak than --freeze layers, and meta still equals the real CPU run."""
    args = ModelArgs(vocab_size=256, dim=64, n_layers=3, n_heads=4, hidden_dim=96)
    batch, harm = make_batch(3, 24, 256, 0), make_batch(3, 24, 256, 1)
    peaks = {}
    for freeze in ("layers", "attention"):
        real, meta = (peak_memory("ours-nockpt", args, "tvaccine", d, [1, 2], batch, harm, torch.float32, steps=1,
                                  importance=False, freeze=freeze)["peak"] for d in ("cpu", "meta"))
        assert meta == real
        peaks[freeze] = real
    assert peaks["attention"] > peaks["layers"]


def test_profiler_notes_are_kept_out_of_the_output_and_other_stderr_lines_are_not(capfd):
    import os
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with without_profiler_notes(), prof:
        torch.ones(8).sum()
        os.write(2, b"a real warning\n")
    err = capfd.readouterr().err
    assert "a real warning" in err
    assert "USDT" not in err and "profiler_start" not in err


def test_gamma_table_without_section_2_prints_only_what_was_measured(capsys, monkeypatch):
    monkeypatch.setattr(bench, "peak_memory", lambda *a, **kw: {"peak": 3 * 2**30})  # the table layout only
    a = type("A", (), {"batch": 2, "seq_len": 8, "device": "cpu"})()
    bench.gamma_table(a, [2, 64], None)
    out = capsys.readouterr().out
    assert "nan" not in out and "0 layers" not in out and "Section 2 was not run" in out
    header, rule, *rows = [l for l in out.splitlines() if l.startswith("|")]
    assert "step (s)" not in header and len(rows) == 2
    assert all(len(r.split("|")) == len(header.split("|")) for r in rows)
    assert rows[1].startswith("| all | 3.00 | 3.00 | all |")


def test_meta_reproduces_the_public_repnoise_recipe_and_the_tar_weight_copy(one_thread):
    args = ModelArgs(vocab_size=256, dim=64, n_layers=3, n_heads=4, hidden_dim=96)
    batch, harm = make_batch(3, 24, 256, 0), make_batch(3, 24, 256, 1)
    with bench.patched(defences, repnoise_terms=public_repnoise_terms):
        real, meta = (peak_memory("ours", args, "repnoise", d, [0, 1, 2], batch, harm, torch.float32, steps=1)
                      for d in ("cpu", "meta"))
    assert meta["peak"] == real["peak"]
    ours = peak_memory("ours", args, "repnoise", "meta", [0, 1, 2], batch, harm, torch.float32, steps=1)
    assert ours["peak"] < real["peak"]  # the explicit-difference MMD and full-position softmaxes cost memory
    plain = peak_memory("ours", args, "tar", "meta", [0, 1, 2], batch, harm, torch.float32, steps=1)
    copied = peak_memory("ours", args, "tar", "meta", [0, 1, 2], batch, harm, torch.float32, steps=1,
                         copy_weights=True)
    assert copied["peak"] - plain["peak"] == plain["weights"]  # exactly one more copy of the base weights


def test_bf16_section_prints_each_precision_against_our_fp32_step(capsys, monkeypatch):
    """Section 5's table from known step and generation times: every ratio is worked out here by hand."""
    tiny = ModelArgs(vocab_size=64, dim=32, n_layers=4, n_heads=4, hidden_dim=48)
    from reference import build_ours
    models = {(stack, name): (build_ours(tiny, "cpu", torch.float32, False), None)
              for stack, name in [("ours", "fp32"), ("ours", "bf16"), ("ours", "bf16 + LoRA math bf16"),
                                  ("ref", "fp32"), ("ref", "bf16")]}
    seconds = {id(m): s for (m, _), s in zip(models.values(), (10.0, 6.0, 5.0, 12.0, 8.0))}
    monkeypatch.setattr(bench, "precision_models", lambda: (models, None))
    monkeypatch.setattr(bench, "timed", lambda step, model, *rest: seconds[id(model)])
    monkeypatch.setattr(bench, "build_hf", lambda *a, **kw: torch.nn.Linear(1, 1))
    gen = iter([{"ours_s": 4.0, "hf_s": 5.0}, {"ours_s": 2.0, "hf_s": 4.0}])  # fp32, then bf16
    monkeypatch.setattr(bench, "generation_times", lambda *a, **kw: next(gen))
    a = type("A", (), {"batch": 2, "seq_len": 8, "steps": 1, "methods": ["sft", "tvaccine", "tar"],
                       "new_tokens": 4, "gen_rounds": 1})()
    bench.section5(a)
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
    assert rows[1] == "| sft | 10.00 s (1.00x) | 6.00 s (0.60x) | 5.00 s (0.50x) | 12.00 s (1.20x) | 8.00 s (0.80x) |"
    assert rows[2].startswith("| tvaccine | 10.00 s") and len(rows) == 6  # tar: no reference step, no row
    n = len(bench.PROMPTS) * 4
    assert rows[4] == f"| fp32 | {n / 4:.1f} | {n / 5:.1f} | 1.25x | 1.25x |"
    assert rows[5] == f"| bf16 | {n / 2:.1f} | {n / 4:.1f} | 2.00x | 2.50x |"
