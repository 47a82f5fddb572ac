"""vdit bench: the FLOP formula against XLA, the peer is the same network, result schemas, docs.

Benchmarks are commands, not timed tests: nothing here asserts a speed. Every
benchmark runs once on the tiny config (module fixture) and the tests read its JSON.
"""

import gzip
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from vdit.bench import flops as F
from vdit.bench import report
from vdit.bench.attention import memory_exponent
from vdit.bench.floor import Matmul, matmul_floor, step_matmuls
from vdit.bench.profile import hlo_ops
from vdit.bench.timing import gemm_peak, measure, measure_interleaved
from vdit.cli import main
from vdit.config import load_config, override
from vdit.dit import DiT
from vdit.models import build_models, param_counts
from vdit.sharding import unbox

# Under xdist (`--dist loadgroup`, pyproject.toml) one worker runs the benchmarks of the `results` fixture once.
pytestmark = pytest.mark.xdist_group("bench")

REPO = pathlib.Path(__file__).parent.parent
COMMANDS = {
    "train": ["--config", "tiny", "--batch", "2", "--remat", "none,full", "--peer", "--floor"],
    "sample": ["--config", "tiny", "--steps", "2"],
    "vae": ["--config", "tiny", "--frames", "9"],
    "attention": ["--config", "tiny", "--seq", "1024,2048"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for kind, args in COMMANDS.items():
        path = tmp_path_factory.mktemp("bench") / f"{kind}.json"
        assert main(["bench", kind, *args, "--repeats", "1", "--warmup", "0", "--json", str(path)]) == 0
        out[kind] = json.loads(path.read_text())
    return out


def _wide_tiny():
    return build_models(override(load_config("tiny"), ["dit.width=256", "dit.num_heads=4", "dit.mlp_dim=1024"]))


@pytest.mark.parametrize("train", [False, True])
def test_flop_formula_matches_xla_cost_analysis(train):
    models = _wide_tiny()
    check = F.cross_check(models.dit, (2, 8, 8, 4), models.text.max_length, batch=2, train=train)
    # XLA also counts elementwise ops (norms, softmax, GELU): a few percent at width 256.
    assert 1.0 <= check["ratio"] < 1.05, check


@pytest.mark.parametrize("scan", [False, True])
def test_step_matmuls_run_the_analytic_flops_and_show_what_remat_recomputes(scan):
    models = _wide_tiny()
    shape, text_len, batch = (2, 8, 8, 4), models.text.max_length, 2
    args = [jax.ShapeDtypeStruct(s, d) for s, d in [((batch, *shape), np.float32), ((batch,), np.float32),
                                                     ((batch, text_len, models.dit.text_dim), np.float32),
                                                     ((batch, text_len), bool)]]
    analytic = F.TRAIN_FACTOR * sum(F.dit_forward_flops(models.dit, shape, text_len, batch).values())
    run = {}
    for remat in ("none", "dots", "full"):
        dit = models.dit.clone(remat=remat, scan_layers=scan)
        params = unbox(jax.eval_shape(dit.init, jax.random.PRNGKey(0), *args)["params"])
        grad = jax.grad(lambda p, *a: jax.numpy.mean(jax.numpy.square(dit.apply({"params": p}, *a))))
        counts = step_matmuls(grad, params, *args)
        run[remat] = (sum(counts.values()), sum(m.flops * n for m, n in counts.items()))
    depth = models.dit.depth
    assert run["none"][1] == analytic  # a scan body counts once per layer
    # `dots` keeps every projection but recomputes the attention's two matmuls, self and cross, per block.
    assert run["dots"][0] == run["none"][0] + 2 * 2 * depth and analytic < run["dots"][1] < run["full"][1]


def test_matmul_floor_refuses_a_step_without_matmuls():
    with pytest.raises(ValueError, match="no matmul"):
        matmul_floor(lambda x: x * 2, np.ones(3, np.float32))


def test_flop_formula_counts_adaln_per_example():
    models = _wide_tiny()
    short = F.dit_forward_flops(models.dit, (2, 8, 8, 4), 40)
    long = F.dit_forward_flops(models.dit, (4, 8, 8, 4), 40)  # twice the tokens
    assert long["adaln"] == short["adaln"] and long["text_embed"] == short["text_embed"]
    assert long["mlp"] == 2 * short["mlp"] and long["self_attn_scores"] == 4 * short["self_attn_scores"]
    assert F.dit_forward_flops(models.dit, (2, 8, 8, 4), 40, batch=3)["adaln"] == 3 * short["adaln"]


@pytest.mark.parametrize("scan", [False, True])
def test_peer_is_the_same_network(scan):
    pytest.importorskip("diffusers")
    from vdit.bench.peer import build_peer, peer_parity

    dit = DiT(in_channels=6, patch_size=(2, 2, 2), width=48, depth=2, num_heads=3, mlp_dim=80, text_dim=24,
              freq_dim=64, cross_attn_norm=False, scan_layers=scan, attention_impl="chunked")
    parity = peer_parity(dit, build_peer(dit, seed=3))
    assert parity["params_vdit"] == parity["params_peer"] > 0
    assert parity["max_abs_out"] > 0.1  # a real output, not zeros
    assert parity["max_abs_diff"] <= 1e-4 * max(1.0, parity["max_abs_out"]), parity


def test_peer_config_refuses_what_diffusers_cannot_express():
    from vdit.convert.wan_dit import dit_kwargs_from_config, wan_config_from_dit

    dit = DiT(width=64, depth=2, num_heads=2, mlp_dim=128, text_dim=32, freq_dim=32, in_channels=4, out_channels=8)
    kwargs = dit_kwargs_from_config(wan_config_from_dit(dit))
    assert all(kwargs[k] == getattr(dit, k) for k in ("width", "depth", "num_heads", "mlp_dim", "out_channels"))
    with pytest.raises(ValueError, match="timestep_scale=1.0 has no diffusers Wan equivalent"):
        wan_config_from_dit(dit.clone(timestep_scale=1.0))
    with pytest.raises(ValueError, match="theta=10000"):
        wan_config_from_dit(dit.clone(rope_theta=500.0))


def test_bench_cpu_config_is_20m_parameters_at_1024_tokens_per_step():
    for arg in ("256", "1024"):
        config = load_config(f"bench_cpu:{arg}")
        models = build_models(config)
        res = config.data.resolution
        shape = models.vae.latent_shape((1, config.data.frames, res, res, 3))[1:]
        assert config.data.batch_size * F.tokens_per_example(models.dit, shape) == 1024
        assert 19e6 < param_counts(models)["dit"] < 21e6


def _check_stamp(result, kind):
    assert result["schema"] == report.SCHEMA and result["kind"] == kind and result["section"] == kind
    assert result["command"].startswith(f"vdit bench {kind} --config tiny")
    m = result["machine"]
    assert m["backend"] == "cpu" and m["cores"] >= 1 and m["cpu"] and m["date"].endswith("UTC")
    assert m["versions"]["jax"] == jax.__version__ and "load_after" in m and isinstance(m["busy"], bool)
    assert m["busy_cores_before"] is None or 0 <= m["busy_cores_before"] <= m["cores"] + 0.5
    assert m["code"] is None or m["code"].split("+")[0] in report.render(result)


def test_matmul_einsum_spec_computes_the_dot_general():
    # The torch floor runs each matmul as this einsum: it must be the same product, axes in the same order.
    models = _wide_tiny()
    args = [jax.ShapeDtypeStruct(s, d) for s, d in [((2, 2, 8, 8, 4), np.float32), ((2,), np.float32),
                                                     ((2, models.text.max_length, models.dit.text_dim), np.float32),
                                                     ((2, models.text.max_length), bool)]]
    params = unbox(jax.eval_shape(models.dit.init, jax.random.PRNGKey(0), *args)["params"])
    grad = jax.grad(lambda p, *a: jax.numpy.mean(jax.numpy.square(models.dit.apply({"params": p}, *a))))
    dims = lambda c, b: (c, b)  # noqa: E731
    odd = [Matmul(((3, 5, 2), "float32"), ((2, 3, 7), "float32"), dims(((2,), (0,)), ((0,), (1,))), None),
           Matmul(((4, 6, 2, 3), "float32"), ((6, 3, 4), "float32"), dims(((3,), (1,)), ((0, 1), (2, 0))), None)]
    rng = np.random.default_rng(0)
    for mm in [*step_matmuls(grad, params, *args), *odd]:
        a, b = (rng.standard_normal(s).astype(np.float32) for s, _ in (mm.lhs, mm.rhs))
        want = np.asarray(jax.lax.dot_general(a, b, mm.dimension_numbers, precision="highest"))
        np.testing.assert_allclose(np.einsum(mm.einsum_spec(), a, b), want, rtol=1e-4, atol=1e-4, err_msg=mm.label())


def test_train_result(results):
    r = results["train"]
    _check_stamp(r, "train")
    s = r["setup"]
    assert s["params"] == 37_744 and s["tokens_per_step"] == 2 * s["tokens_per_example"] == 16
    assert s["train_flops_per_step"] == 3 * sum(s["forward_flops"].values())
    assert set(s["gemm"]) == {"xla", "torch"} and s["gemm_peak"] == max(g["flops_per_s"] for g in s["gemm"].values())
    assert [c["mode"] for c in r["flop_check"]] == ["forward", "train"]
    assert [(row["remat"], row["scan_layers"]) for row in r["rows"]] == [("none", False), ("full", False)]
    for row in r["rows"]:
        assert len(row["timing"]["times_s"]) == 1 and row["step_s"] == row["timing"]["median_s"] > 0
        assert row["model_flops_per_s"] == pytest.approx(s["train_flops_per_step"] / row["step_s"])
        assert row["frac_gemm_peak"] == pytest.approx(row["model_flops_per_s"] / s["gemm_peak"])
        assert row["vs_peer"] == pytest.approx(row["step_s"] / r["peer"]["step_s"])
        assert row["state_ratio"] == pytest.approx(1.0, abs=0.01)  # params + 2 moments + EMA, exactly
        assert row["memory"]["temp_bytes"] > 0 and row["mfu_spec"] is None
    assert r["rows"][1]["estimate"]["activation_bytes"] < r["rows"][0]["estimate"]["activation_bytes"]
    none, full = (row["matmul_floor"] for row in r["rows"])
    assert none["flops"] == s["train_flops_per_step"] and full["flops"] > none["flops"]  # full recomputes
    for f in (none, full):
        share = [t["seconds"] * t["count"] for t in f["top"]]
        assert 0 < sum(share) <= f["seconds"] * (1 + 1e-9) and share == sorted(share, reverse=True)
        # --peer: torch ran the same matmuls
        torch_share = sum(t["torch_seconds"] * t["count"] for t in f["top"])
        assert 0 < torch_share <= f["torch_seconds"] * (1 + 1e-9)
        # the tiny DiT's attention is its only batched matmul
        assert 0 < f["batched_seconds"] < f["seconds"] and 0 < f["batched_torch_seconds"] < f["torch_seconds"]
    peer = r["peer"]
    assert peer["parity"]["params_peer"] == peer["parity"]["params_vdit"] == s["params"]
    assert peer["threads"] == s["cores"] and peer["step_s"] > 0


def test_train_profile_splits_op_time_by_phase_and_kind(tmp_path):
    # remat=full recomputes the forward pass in the backward: every phase x matmul shows up.
    args = ["bench", "train", "--config", "tiny", "--batch", "2", "--remat", "full", "--no_xcheck",
            "--repeats", "0", "--profile", str(tmp_path)]
    assert main(args) == 0
    prof = json.loads((tmp_path / "ops_full_scanFalse.json").read_text())
    assert pathlib.Path(prof["trace"]).is_file() and prof["steps"] == 3
    for key in ("forward matmul", "backward matmul", "remat matmul", "other loop"):
        assert prof["split"][key] > 0, (key, prof["split"])
    assert {op["kind"] for op in prof["ops"]} <= {"matmul", "loop", "control"} and prof["ops"]
    assert prof["ops"] == sorted(prof["ops"], key=lambda op: -op["ms"])


def test_trace_op_times_counts_device_events_by_hlo_op(tmp_path):
    from vdit.bench.profile import run_split, trace_op_times

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0 (NVIDIA H200)"}},
        # the host's launch of the kernel below
        {"ph": "X", "pid": 1, "name": "fusion.1", "dur": 5.0, "ts": 0.0,
         "args": {"hlo_op": "fusion.1", "run_id": "7", "device_ordinal": "0"}},
        {"ph": "X", "pid": 2, "name": "loop_add_fusion", "dur": 7.0, "args": {"hlo_op": "fusion.1"}},
        {"ph": "X", "pid": 2, "name": "loop_add_fusion", "dur": 3.0, "args": {"hlo_op": "fusion.1"}},
        {"ph": "X", "pid": 2, "name": "sm90_gemm", "dur": 4.0, "args": {"hlo_op": "dot.2"}},
    ]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    total, count = trace_op_times(path)
    assert total == {"fusion.1": 10.0, "dot.2": 4.0} and count["fusion.1"] == 2
    # A CPU trace has no device process: every op event counts under its own name.
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": [e for e in events if e["pid"] == 1]}, f)
    assert trace_op_times(path)[0] == {"fusion.1": 5.0}
    # Per-step, per-device lines read a CPU trace's op events; an accelerator trace's host
    # events time launches, not work, so it has none.
    ops = {"fusion.1": {"kind": "loop"}, "dot.2": {"kind": "matmul"}}
    assert run_split(path, ops) == [{"run": 0, "device": "0", "span_ms": 0.005, "loop": 0.005}]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert run_split(path, ops) == []


def test_device_kernel_split_groups_gpu_kernels_by_kind(tmp_path):
    from vdit.bench.profile import device_kernel_split, kernel_kind

    names = {"cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16": "attention",
             "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>": "attention",
             "nvjet_sm90_tss_128x160_64x5_2x4_h_bz_NTT": "matmul", "gemm_fusion_dot_7": "matmul",
             "memcpy128": "copy", "loop_dynamic_update_slice_fusion_39": "copy", "wrapped_transpose": "copy",
             "input_add_reduce_fusion_1": "reduce", "triton_softmax_5": "reduce", "loop_add_fusion_1": "loop"}
    assert {n: kernel_kind(n) for n in names} == names
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 9, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 9, "name": "memcpy128", "dur": 1000.0}]
    events += [{"ph": "X", "pid": 1, "name": n, "dur": 2000.0} for n in names]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert device_kernel_split(path, steps=2) == {"copy": 3.0, "attention": 2.0, "matmul": 2.0, "reduce": 2.0,
                                                  "loop": 1.0}


def test_hlo_ops_classifies_fusions():
    hlo = """%fused_dot (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %ynn_fusion.3 = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="REMAT"}
  %add_fusion = f32[4,2]{1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%fused_add, metadata={op_name="FWD"}
  ROOT %while.2 = f32[4,2]{1,0} while(%add_fusion), condition=%c, body=%b2, metadata={op_name="jit(step)/adam/while"}
}
""".replace("REMAT", "jit(step)/transpose(jvp(DiT))/checkpoint/rematted_computation/mlp/dot_general").replace(
        "FWD", "jit(step)/jvp(DiT)/add")
    ops = hlo_ops(hlo)
    assert ops["ynn_fusion.3"]["kind"] == "matmul" and ops["ynn_fusion.3"]["phase"] == "remat"
    assert (ops["add_fusion"]["kind"], ops["add_fusion"]["phase"]) == ("loop", "forward")
    assert (ops["while.2"]["kind"], ops["while.2"]["phase"]) == ("control", "other")


def test_sample_result(results):
    r = results["sample"]
    _check_stamp(r, "sample")
    assert [row["guidance"] for row in r["rows"]] == ["none", "batched", "two_pass"]
    assert [row["dit_calls_per_step"] * row["dit_batch"] for row in r["rows"]] == [1, 2, 2]
    for row in r["rows"]:
        assert row["model_calls"] == 2 and row["step_s"] == pytest.approx(row["loop_s"] / 2)
    assert r["setup"]["batched_over_two_pass"] == pytest.approx(r["rows"][1]["step_s"] / r["rows"][2]["step_s"])


def test_vae_result(results):
    r = results["vae"]
    _check_stamp(r, "vae")
    assert r["setup"]["video_shape"] == [1, 9, 16, 16, 3] and r["setup"]["pixel_frames"] == 9 * 16 * 16
    whole, chunked = r["rows"]
    assert (whole["mode"], chunked["mode"]) == ("whole", "chunked")
    for row in r["rows"]:
        assert row["temp_per_pixel_frame"] == row["memory"]["temp_bytes"] / r["setup"]["pixel_frames"]
        assert row["decode_s"] > 0


def test_attention_result(results):
    r = results["attention"]
    _check_stamp(r, "attention")
    assert {(row["impl"], row["mode"], row["seq"]) for row in r["rows"]} == {
        (i, m, s) for i in ("xla", "chunked") for m in ("forward", "train") for s in (1024, 2048)}
    exps = r["setup"]["memory_exponent"]
    for impl in ("xla", "chunked"):
        for mode in ("forward", "train"):
            rows = [row for row in r["rows"] if (row["impl"], row["mode"]) == (impl, mode)]
            assert exps[impl][mode] == memory_exponent([x["seq"] for x in rows],
                                                       [x["memory"]["temp_bytes"] for x in rows])
    assert exps["chunked"]["train"] < 1.3  # the requirement: linear memory (XLA's own varies with fusion)
    train = {(row["impl"], row["seq"]): row for row in r["rows"] if row["mode"] == "train"}
    assert train["xla", 1024]["flops"] == 3 * 4 * 2 * 1024**2 * 16


def test_report_renders_results_and_fills_doc_regions(results, tmp_path):
    doc = "# perf\n" + "".join(f"<!-- bench:{k} -->\nold\n<!-- /bench:{k} -->\n" for k in ("train", "vae", "other"))
    filled = report.update_docs(doc, [results["train"], results["vae"]])
    assert "old" in filled.split("bench:other")[1] and filled.count("old") == 1
    train = filled.split("<!-- bench:train -->")[1].split("<!-- /bench:train -->")[0]
    assert results["train"]["machine"]["date"] in train and results["train"]["machine"]["cpu"] in train
    assert train.count("\n| vdit |") == 2 and train.count("\n| diffusers |") == 1
    assert "Matmul floor" in train and train.count("\n| none | False |") == 1 and "same matmuls in torch s" in train
    assert "of which batched (attention), s: XLA / torch" in train
    assert report.update_docs(filled, [results["train"], results["vae"]]) == filled  # idempotent
    with pytest.raises(ValueError, match="no <!-- bench:sample -->"):
        report.update_docs(doc, [results["sample"]])
    for kind in ("sample", "attention"):
        assert results[kind]["machine"]["date"] in report.render(results[kind])
    path = tmp_path / "perf.md"
    path.write_text(doc)
    json_path = tmp_path / "vae.json"
    json_path.write_text(json.dumps(results["vae"]))
    assert main(["bench", "report", str(json_path), "--docs", str(path)]) == 0
    assert "temp B per pixel-frame" in path.read_text()


def test_docs_figures_are_the_committed_results():
    # docs/performance.md shows exactly what its JSON results render to: no hand-edited figure.
    doc = (REPO / "docs" / "performance.md").read_text()
    for section in ("train", "remat", "sample", "vae", "attention", "train-gpu", "attention-gpu"):
        assert f"<!-- bench:{section} -->" in doc and f"<!-- /bench:{section} -->" in doc
    paths = sorted((REPO / "docs" / "bench").glob("*.json"))
    assert report.update_docs(doc, report.load_results(paths)) == doc


def test_code_version_comes_from_the_environment_when_set(monkeypatch):
    # A copied tree (a lent GPU machine's copy, whose .git can be stale) stamps results with the commit it was sent.
    from vdit.bench import machine

    monkeypatch.delenv("VDIT_CODE_VERSION", raising=False)
    here = machine.code_version()
    assert here and re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?", here)
    monkeypatch.setenv("VDIT_CODE_VERSION", "abc1234")
    assert machine.code_version() == "abc1234"

    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(machine.subprocess, "run", no_git)
    monkeypatch.delenv("VDIT_CODE_VERSION")
    assert machine.code_version() is None


def test_one_line_errors(capsys, tmp_path):
    assert main(["bench", "train", "--config", "tiny", "dit.attention_impl=cudnn"]) == 2
    assert capsys.readouterr().err.strip() == ("vdit bench: error: attention impl 'cudnn' needs a GPU, but JAX runs "
                                               "on 'cpu'; use 'xla' or 'chunked'")
    assert main(["bench", "train", "--config", "tiny", "--remat", "most"]) == 2
    assert "unknown remat policies ['most']" in capsys.readouterr().err
    assert main(["bench", "train", "--config", "tiny", "--floor", "--repeats", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("vdit bench: error: --floor times each matmul of the step: it needs "
                                               "--repeats >= 1")
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert main(["bench", "report", str(bad)]) == 2
    assert capsys.readouterr().err.strip().endswith("is not a vdit benchmark result (schema 'vdit.bench/1')")
    assert main(["bench", "train", "--config", "tiny", "--batch", "3", "--cpu_devices", "1,2"]) == 2
    assert capsys.readouterr().err.strip() == ("vdit bench: error: --cpu_devices 2 does not divide the batch of 3: "
                                               "pass --batch a multiple of 2")
    assert main(["bench", "train", "--config", "tiny", "--cpu_devices", "2", "--floor"]) == 2
    assert "--floor times each matmul alone on one device" in capsys.readouterr().err


def test_train_on_several_devices_is_a_variant_with_per_device_memory(tmp_path):
    # conftest gives the tests 8 CPU devices; the step splits its batch of 4 over the first 1 and 2
    from vdit.bench.report import _render_train
    from vdit.bench.train import bench_train

    # compiled and profiled only (memory needs no timing): the suite's time is for behaviour, not speed
    config = override(load_config("tiny"), ["dit.depth=1"])
    logs = []
    r = bench_train(config, batch=4, devices=[1, 2], xcheck=False, repeats=0, profile=str(tmp_path), log=logs.append)
    # the profile splits each traced step by device: both devices ran it, and each took part in the
    # gradient all-reduce; one device has no collective and no per-device lines
    runs = json.loads((tmp_path / "ops_none_scanFalse_devices2.json").read_text())["runs"]
    assert [(row["run"], row["device"]) for row in runs] == [(i, d) for i in range(3) for d in ("0", "1")]
    assert all(row["collective"] > 0 and row["matmul"] > 0 and row["span_ms"] > 0 for row in runs)
    single = json.loads((tmp_path / "ops_none_scanFalse.json").read_text())
    assert [row["run"] for row in single["runs"]] == [0, 1, 2] and not any("collective" in k for k in single["split"])
    printed = [line for line in logs if "devices=2: op time" in line]
    assert len(printed) == 1 and "step device   span ms" in printed[0]
    assert not any("step device" in line for line in logs if "devices=2" not in line)
    one, two = r["rows"]
    assert (one["devices"], two["devices"]) == (1, 2) and one["step_s"] is None
    # the same state on each device, the activations of half the batch
    assert one["state_ratio"] == pytest.approx(1.0, abs=0.01) and two["state_ratio"] == pytest.approx(1.0, abs=0.01)
    assert two["estimate"]["activation_bytes"] == one["estimate"]["activation_bytes"] // 2
    assert two["memory"]["temp_bytes"] < one["memory"]["temp_bytes"]
    rows = [line for line in _render_train(r).splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| step | remat | scan | devices |")
    assert rows[1].startswith("| vdit | none | False | 1 |") and rows[2].startswith("| vdit | none | False | 2 |")


def test_timer_and_gemm_peak():
    calls = []
    timing = measure(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(timing.times) == 3 and timing.min <= timing.median <= timing.max
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure(lambda: None, repeats=0)
    peak = gemm_peak("float32", repeats=1, sizes=(64, 128))
    assert set(peak["by_size"]) == {64, 128} and peak["flops_per_s"] == max(peak["by_size"].values()) > 0


def test_interleaved_timer_runs_round_robin():
    calls = []
    timings = measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                  warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4  # every round calls each run once, in order
    assert set(timings) == {"a", "b"} and all(len(t.times) == 3 for t in timings.values())
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_interleaved({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        measure_interleaved({"a": lambda: None}, warmup=-1)
    with pytest.raises(ValueError, match="at least one run"):
        measure_interleaved({})


def test_memory_exponent():
    seqs = [1024, 2048, 4096]
    assert memory_exponent(seqs, [3 * s for s in seqs]) == pytest.approx(1.0)
    assert memory_exponent(seqs, [s * s + 7 for s in seqs]) == pytest.approx(2.0, abs=0.01)
    assert memory_exponent([1024], [5]) is None
    assert np.isfinite(memory_exponent(seqs, [0, 10, 20]))
