"""ONNX export and the ONNX Runtime backend (issue 7), on tiny random Qwen3-MoE models.

Parity tolerance: 1e-4 max abs on logits, ONNX fp32 vs transformers fp32, after the prefill
and after every cached decode step; measured about 1e-6 on these models. Quantized exports
are not compared against a tolerance (random tiny weights flip experts): their divergence
and size are recorded in the export config and printed here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from converters.onnx.check import compare_with_transformers, empty_past, open_session, run_graph
from converters.onnx.errors import OnnxExportError
from converters.onnx.export import DATA_FILE, MODEL_FILE, export_onnx
from converters.onnx.quantize import dequantize_rows, quantize_rows
from packager import load_pruned
from packager.core.errors import OutputExistsError, UnsupportedArchitecture
from packager.core.fingerprint import model_fingerprint
from packager.masking import expert_mask
from packager.core.plan_file import Plan
from packager.prune import prune_checkpoint
from runtime.backends import export_config_path, open_backend
from runtime.backends.onnx_backend import OnnxBackend, past_names
from runtime.errors import BackendError
from runtime.schema import ExportConfig
from import_blocker import run_blocked
from tiny_models import WORDS, build_tiny, byte_bpe

REPO = Path(__file__).resolve().parents[1]
HARVEST = REPO / "data" / "harvest"
TOLERANCE = 1e-4
VOCAB = 320
# layer 1 is a dense MLP: MoE layers need not be contiguous
MODEL_KW = dict(num_hidden_layers=3, mlp_only_layers=[1], vocab_size=VOCAB, max_position_embeddings=96)
KEEP_UNIFORM = {0: [1, 3, 4, 6], 2: [0, 2, 5, 7]}
KEEP_NONUNIFORM = {0: [0, 2, 3, 5, 6, 7], 2: [1, 4, 6]}
TEMPLATE = "<|bos|><|{{ source_lang }}|><|{{ target_lang }}|>{{ messages[0]['content'] }}<|sep|>"
FALLBACK_TEXTS = ["Open the file", "Save the new window?", "The red cat is on the blue house.", "x", "Datei öffnen"]


# ------------------------------------------------------------------------------ helpers
def harvest_sources(limit: int) -> list[str]:
    path = HARVEST / "test.jsonl"
    if not path.is_file():
        return FALLBACK_TEXTS[:limit]
    texts = []
    with path.open(encoding="utf-8") as handle:
        for raw in handle:
            record = json.loads(raw)
            if record["src_lang"] == "en" and 3 <= len(record["src"]) <= 60:
                texts.append(record["src"])
            if len(texts) >= limit:
                break
    return texts or FALLBACK_TEXTS[:limit]


@lru_cache(maxsize=1)
def bpe_json() -> str:
    """Byte-level BPE with the tiny models' special tokens, trained on real sentences."""
    corpus = harvest_sources(2000) * 2 + [" ".join(WORDS)]
    return byte_bpe(corpus, VOCAB).to_str()


def build_parent(out_dir: Path, **overrides) -> Path:
    build_tiny("qwen3_moe", out_dir, **{**MODEL_KW, **overrides})
    (out_dir / "tokenizer.json").write_text(bpe_json())
    (out_dir / "chat_template.jinja").write_text(TEMPLATE)
    return out_dir


def prune(parent: Path, keep: dict[int, list[int]], out_dir: Path) -> Path:
    plan = Plan(model_fingerprint(parent), keep, {"ranker": "test", "drop_ratio": 0.5, "languages": ["de"]})
    return prune_checkpoint(parent, plan, out_dir)


@lru_cache(maxsize=4)
def hf(model_dir: str):
    return load_pruned(model_dir, dtype=torch.float32).eval()


def reference_greedy(model, prompt: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding by full transformers forwards (no cache): the reference."""
    tokens, produced = list(prompt), []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
        if token in stop:
            break
        produced.append(token)
        tokens.append(token)
    return produced


def moe_fc1_experts(model_path: Path) -> dict[str, int]:
    """Expert count of every MoE/QMoE node, read from its weight shapes."""
    model = onnx.load(str(model_path))
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    return {node.name: shapes[node.input[2]][0] for node in model.graph.node if node.op_type in ("MoE", "QMoE")}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def parent(work) -> Path:
    return build_parent(work / "parent")


@pytest.fixture(scope="module")
def uniform(parent, work) -> Path:
    return prune(parent, KEEP_UNIFORM, work / "uniform")


@pytest.fixture(scope="module")
def nonuniform(parent, work) -> Path:
    return prune(parent, KEEP_NONUNIFORM, work / "nonuniform")


@pytest.fixture(scope="module")
def exports(parent, uniform, nonuniform, work) -> dict[str, Path]:
    return {
        "parent": export_onnx(parent, work / "parent.onnx.d", hash_inputs=False),
        # forced external data: the small model still goes through the large-model path
        "uniform": export_onnx(uniform, work / "uniform.onnx.d", hash_inputs=False, external_data_threshold_bytes=1),
        "nonuniform": export_onnx(nonuniform, work / "nonuniform.onnx.d", hash_inputs=False),
        "nonuniform_sparse": export_onnx(nonuniform, work / "nonuniform.sparse.d", formulation="sparse", hash_inputs=False),
    }


@pytest.fixture(scope="module")
def quantized(nonuniform, work) -> dict[str, Path]:
    return {q: export_onnx(nonuniform, work / f"nonuniform.{q}.d", q, hash_inputs=False) for q in ("int8", "int4")}


MODELS = {"parent": "parent", "uniform": "uniform", "nonuniform": "nonuniform", "nonuniform_sparse": "nonuniform"}


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_parity_prefill_and_cached_decode(name, exports, request):
    model_dir = request.getfixturevalue(MODELS[name])
    out = exports[name]
    with open_backend(out, n_threads=1) as backend:
        prompts = [backend.prompt_ids(text, "en", "de") for text in harvest_sources(3)]
    prompts.append(list(range(5, 40)))  # a longer one
    report = compare_with_transformers(open_session(out / MODEL_FILE), hf(str(model_dir)), prompts,
                                       3, 1, 16, decode_steps=4)
    print(f"{name}: prefill {report.prefill_max_abs:.2e}, decode {report.decode_max_abs:.2e}")
    assert report.prefill_max_abs <= TOLERANCE and report.decode_max_abs <= TOLERANCE
    assert report.argmax_agreement == 1.0
    recorded = ExportConfig.load(export_config_path(out / MODEL_FILE)).extra["export_check"]["fp32"]
    assert recorded["max_abs"] <= TOLERANCE and recorded["positions"] == 23


def test_per_layer_expert_counts_in_graph_and_config(exports, parent, nonuniform):
    counts = {"parent": {0: 8, 2: 8}, "uniform": {0: 4, 2: 4}, "nonuniform": {0: 6, 2: 3}}
    for name, expected in counts.items():
        config = ExportConfig.load(export_config_path(exports[name] / MODEL_FILE))
        assert config.n_experts == expected
        assert sorted(moe_fc1_experts(exports[name] / MODEL_FILE).values()) == sorted(expected.values())
        assert config.top_k == 2 and config.format == "onnx" and config.tokenizer == "tokenizer.json"
        assert config.extra["contrib_ops"] == ["MoE"] and "reduced or mobile" in config.extra["portability"]
    config = ExportConfig.load(export_config_path(exports["nonuniform"] / MODEL_FILE))
    assert config.parent_fingerprint == model_fingerprint(parent)
    assert config.provenance["model_fingerprint"] == model_fingerprint(nonuniform)
    assert config.plan["keep"] == {str(k): v for k, v in KEEP_NONUNIFORM.items()}
    assert config.languages == ["de"] and config.parent_n_experts is None
    sparse = ExportConfig.load(export_config_path(exports["nonuniform_sparse"] / MODEL_FILE))
    assert sparse.extra["contrib_ops"] == [] and sparse.extra["portability"] == "standard ONNX operators only"


def test_pruned_export_equals_masked_parent(exports, parent):
    """The pruning invariant after export: pruned ONNX == parent with dropped experts masked."""
    model = hf(str(parent))
    session = open_session(exports["nonuniform"] / MODEL_FILE)
    ids = np.arange(3, 30)[None] % VOCAB
    logits, _ = run_graph(session, ids, empty_past(3, 1, 16), 3)
    with torch.no_grad(), expert_mask(model, KEEP_NONUNIFORM):
        masked = model(torch.tensor(ids)).logits[0].numpy()
    unmasked = model(torch.tensor(ids)).logits[0].detach().numpy()
    assert np.abs(logits[0] - masked).max() <= TOLERANCE
    assert np.abs(logits[0] - unmasked).max() > 0.1  # the mask matters: this comparison can fail


def test_routing_is_exact_for_many_inputs_not_frozen_to_the_example(exports, parent):
    """Tracing a data-dependent expert loop (which experts run depends on the router's choice) can
    bake the example input's routing into the graph as constants. Twenty inputs of other lengths and
    batch sizes, whose routing differs, must all match transformers."""
    model = hf(str(parent))
    session = open_session(exports["parent"] / MODEL_FILE)
    rng = np.random.default_rng(7)
    chosen = set()

    def record(module, args, output):
        chosen.add(tuple(sorted(output[2].reshape(-1, 2)[0].tolist())))

    hook = model.get_submodule("model.layers.0.mlp.gate").register_forward_hook(record)
    try:
        for trial in range(20):
            batch, seq = 1 + trial % 3, 1 + (trial * 7) % 23
            ids = rng.integers(0, VOCAB, size=(batch, seq))
            logits, _ = run_graph(session, ids, empty_past(3, 1, 16, batch), 3)
            with torch.no_grad():
                reference = model(torch.tensor(ids)).logits.numpy()
            assert np.abs(logits - reference).max() <= TOLERANCE, (batch, seq)
    finally:
        hook.remove()
    assert len(chosen) >= 4  # the first tokens of these inputs really route to different experts


@pytest.mark.parametrize("formulation", ["contrib", "dense"])
def test_routing_without_top_k_renormalisation(formulation, tmp_path):
    """norm_topk_prob=False: the contrib op's normalize_routing_weights=0 and the standard-op
    path both keep the softmax weights over all experts, as transformers does."""
    model_dir = build_parent(tmp_path / "model", num_hidden_layers=2, mlp_only_layers=[], norm_topk_prob=False)
    out = export_onnx(model_dir, tmp_path / "onnx", formulation=formulation, hash_inputs=False, check=False)
    moe = [n for n in onnx.load(str(out / MODEL_FILE)).graph.node if n.op_type == "MoE"]
    assert len(moe) == (2 if formulation == "contrib" else 0)
    assert all(onnx.helper.get_attribute_value(a) == 0 for n in moe for a in n.attribute if a.name == "normalize_routing_weights")
    report = compare_with_transformers(open_session(out / MODEL_FILE), hf(str(model_dir)), [list(range(3, 20)), [7]], 2, 1, 16)
    assert report.max_abs <= TOLERANCE


def test_batch_with_left_padding_matches_transformers(exports, nonuniform):
    model = hf(str(nonuniform))
    session = open_session(exports["nonuniform"] / MODEL_FILE)
    ids = np.array([[11, 12, 13, 14, 15, 16], [0, 0, 0, 21, 22, 23]])
    mask = np.array([[1] * 6, [0, 0, 0, 1, 1, 1]])
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    feeds.update(zip(past_names(3), empty_past(3, 1, 16, 2)))
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        reference = model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits.numpy()
    assert np.abs(logits[0] - reference[0]).max() <= TOLERANCE
    assert np.abs(logits[1, 3:] - reference[1, 3:]).max() <= TOLERANCE


@pytest.mark.parametrize("name", ["parent", "nonuniform"])
def test_greedy_generation_identical_to_transformers(name, exports, request):
    model = hf(str(request.getfixturevalue(name)))
    with open_backend(exports[name], n_threads=1) as backend:
        assert isinstance(backend, OnnxBackend)
        stop = backend.stop_ids
        assert stop == {backend.token_id("<|eos|>")}
        for text in harvest_sources(6):
            prompt = backend.prompt_ids(text, "en", "de")
            ours = list(backend.generate_ids(prompt, max_new_tokens=10))
            assert ours == reference_greedy(model, prompt, 10, stop), text
        assert backend.timings.prefill_tokens > 0 and backend.timings.decode_tokens > 0


def test_sampling_and_stop_tokens(exports):
    from runtime.backends.base import Sampling

    with open_backend(exports["parent"], n_threads=1) as backend:
        prompt = backend.prompt_ids("Open the file", "en", "de")
        a = list(backend.generate_ids(prompt, 12, Sampling(temperature=1.0, seed=3), stop_ids=set()))
        b = list(backend.generate_ids(prompt, 12, Sampling(temperature=1.0, seed=3), stop_ids=set()))
        c = list(backend.generate_ids(prompt, 12, Sampling(temperature=1.0, seed=4), stop_ids=set()))
        assert a == b and len(a) == 12 and a != c
        greedy = list(backend.generate_ids(prompt, 12, stop_ids=set()))
        # stopping on the third greedy token yields exactly the two before it
        assert list(backend.generate_ids(prompt, 12, stop_ids={greedy[2]})) == greedy[:greedy.index(greedy[2])]
        # logits() of a fresh sequence equals the cached path's last step
        full = backend.logits(prompt + greedy[:3])
        assert np.abs(full[len(prompt) - 1].argmax() - greedy[0]) == 0


def test_threads_setting(exports):
    with open_backend(exports["parent"], n_threads=2) as backend:
        assert backend.n_threads == 2
        assert backend.session.get_session_options().intra_op_num_threads == 2


def test_external_data_export(exports, uniform):
    out = exports["uniform"]
    config = ExportConfig.load(export_config_path(out / MODEL_FILE))
    assert config.model_files == [MODEL_FILE, DATA_FILE]
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    external = {init.name: int(np.prod(init.dims)) * 4 for init in graph.initializer
                if init.data_location == onnx.TensorProto.EXTERNAL}
    assert {"layers.0.mlp.fc1", "layers.2.mlp.fc2", "layers.0.attention.q_weight", "embed", "lm_head"} <= set(external)
    assert (out / DATA_FILE).stat().st_size >= sum(external.values())
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE, DATA_FILE, "tokenizer.json", "model.export.json"])


# ------------------------------------------------------------------------------ quantization
def test_int8_and_int4_load_translate_and_record(quantized, exports, nonuniform):
    fp32_bytes = sum(ExportConfig.load(export_config_path(exports["nonuniform"] / MODEL_FILE)).quantization["bytes"].values())
    sizes = {"fp32": fp32_bytes}
    for quant, out in quantized.items():
        config = ExportConfig.load(export_config_path(out / MODEL_FILE))
        record = config.quantization
        assert record["type"] == quant
        bits = 8 if quant == "int8" else 4
        for layer_idx in KEEP_NONUNIFORM:
            for role in ("fc1", "fc2"):
                assert record["tensors"][f"layers.{layer_idx}.mlp.{role}"]["op"] == "QMoE"
                assert record["tensors"][f"layers.{layer_idx}.mlp.{role}"]["bits"] == bits
        assert record["tensors"]["layers.0.attention.q_weight"]["op"] == ("MatMulInteger+Mul" if bits == 8 else "MatMulNBits")
        assert record["kept_fp32"] == ["layers.0.mlp.router", "layers.2.mlp.router"]
        model = onnx.load(str(out / MODEL_FILE))
        floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
        assert {"layers.0.mlp.router", "layers.2.mlp.router"} <= floats  # routers stay fp32
        assert sorted(moe_fc1_experts(out / MODEL_FILE).values()) == [3, 6]
        sizes[quant] = sum(record["bytes"].values())
        divergence = config.extra["export_check"][quant]
        print(f"{quant}: {sizes[quant]} bytes (fp32 {fp32_bytes}), max |logit diff| {divergence['max_abs']:.3f}, "
              f"greedy agreement {divergence['argmax_agreement']:.2f}")
        assert divergence["positions"] == 23
        with open_backend(out, n_threads=1) as backend:
            text = backend.translate("Open the file", "en", "de", max_new_tokens=6)
            assert isinstance(text, str) and backend.timings.prefill_tokens > 0
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]


@pytest.mark.parametrize("bits, block_size", [(8, None), (4, 16), (4, 32)])
def test_qmoe_matches_dequantized_reference(bits, block_size, tmp_path):
    """Our QMoE packing against ONNX Runtime: the quantized op equals the fp32 MoE op run on
    the dequantized weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits)
    n_experts, hidden, inter, tokens = 5, 64, 32, 9
    fc1 = rng.normal(0, 0.3, (n_experts, 2 * inter, hidden)).astype(np.float32)
    fc2 = rng.normal(0, 0.3, (n_experts, hidden, inter)).astype(np.float32)
    q1, s1 = quantize_rows(fc1, bits, block_size)
    q2, s2 = quantize_rows(fc2, bits, block_size)
    assert q1.shape == (n_experts, 2 * inter, hidden * bits // 8)
    deq1, deq2 = dequantize_rows(q1, s1, bits, block_size), dequantize_rows(q2, s2, bits, block_size)
    assert np.abs(deq1 - fc1).max() <= s1.max() / 2 + 1e-6  # rounding error at most half a step
    attrs = dict(k=2, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                 activation_alpha=1.0, activation_beta=0.0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, hidden])
    r = helper.make_tensor_value_info("r", TensorProto.FLOAT, [tokens, n_experts])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, hidden])
    extra = {"block_size": block_size} if block_size else {}
    graphs = {
        "q": helper.make_graph([helper.make_node("QMoE", ["x", "r", "q1", "s1", "", "q2", "s2"], ["y"], domain="com.microsoft",
                                                 expert_weight_bits=bits, weights_prepacked=0, **attrs, **extra)],
                               "q", [x, r], [y], [numpy_helper.from_array(a, n) for a, n in ((q1, "q1"), (s1, "s1"), (q2, "q2"), (s2, "s2"))]),
        "f": helper.make_graph([helper.make_node("MoE", ["x", "r", "w1", "", "w2"], ["y"], domain="com.microsoft", **attrs)],
                               "f", [x, r], [y], [numpy_helper.from_array(deq1, "w1"), numpy_helper.from_array(deq2, "w2")]),
    }
    feeds = {"x": rng.normal(size=(tokens, hidden)).astype(np.float32), "r": rng.normal(size=(tokens, n_experts)).astype(np.float32)}
    outputs = {}
    for name, graph in graphs.items():
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        outputs[name] = open_session(tmp_path / f"{name}.onnx").run(None, feeds)[0]
    assert np.abs(outputs["q"] - outputs["f"]).max() <= 1e-4
    assert np.abs(outputs["f"]).max() > 0.1


# ------------------------------------------------------------------------------ without torch
def test_runtime_loop_runs_without_torch(exports, tmp_path):
    code = textwrap.dedent(
        """
        import json, sys
        from runtime.backends import open_backend
        with open_backend(sys.argv[1], n_threads=1) as backend:
            ids = list(backend.generate_ids(backend.prompt_ids("Open the file", "en", "de"), 8))
            text = backend.translate("Open the file", "en", "de", max_new_tokens=8)
        banned = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "onnx", "packager", "converters"})
        print(json.dumps({"ids": ids, "text": text, "banned": banned, "backend": type(backend).__name__}))
        """
    )
    blocked = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "packager", "converters")
    result = run_blocked(tmp_path, blocked, code, str(exports["nonuniform"]))
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    with open_backend(exports["nonuniform"], n_threads=1) as backend:
        expected_ids = list(backend.generate_ids(backend.prompt_ids("Open the file", "en", "de"), 8))
        expected_text = backend.translate("Open the file", "en", "de", max_new_tokens=8)
    assert got == {"ids": expected_ids, "text": expected_text, "banned": [], "backend": "OnnxBackend"}


# ------------------------------------------------------------------------------ bad inputs
def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_and_corrupt_model_file(exports, tmp_path):
    missing = copy_export(exports["parent"], tmp_path / "missing")
    (missing / MODEL_FILE).unlink()
    with pytest.raises(BackendError, match=r"model file 'model\.onnx' is missing"):
        open_backend(missing)
    corrupt = copy_export(exports["parent"], tmp_path / "corrupt")
    data = (corrupt / MODEL_FILE).read_bytes()
    (corrupt / MODEL_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(BackendError, match=r"model\.onnx: ONNX Runtime cannot load the model: the file is corrupt or truncated"):
        open_backend(corrupt)
    no_data = copy_export(exports["uniform"], tmp_path / "no_data")
    (no_data / DATA_FILE).unlink()
    with pytest.raises(BackendError, match="external-data file is missing"):
        open_backend(no_data)


def test_tokenizer_mismatch(exports, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = copy_export(exports["parent"], tmp_path / "tok")
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB + 50)}, unk_token="w0"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(out / "tokenizer.json"))
    with pytest.raises(BackendError, match=rf"tokenizer has {VOCAB + 50} tokens but the model's vocabulary has {VOCAB}"):
        open_backend(out)
    (out / "tokenizer.json").write_text("{not json")
    with pytest.raises(BackendError, match="not a valid tokenizers JSON file"):
        open_backend(out)


def test_wrong_input_names(exports, tmp_path):
    out = copy_export(exports["parent"], tmp_path / "names")
    model = onnx.load(str(out / MODEL_FILE))
    for graph_input in model.graph.input:
        if graph_input.name == "position_ids":
            graph_input.name = "positions"
    for node in model.graph.node:
        node.input[:] = ["positions" if name == "position_ids" else name for name in node.input]
    onnx.save(model, str(out / MODEL_FILE))
    with pytest.raises(BackendError, match=r"graph inputs do not match the export config \(3 layers\): missing \['position_ids'\], unexpected \['positions'\]"):
        open_backend(out)


def test_export_refusals_leave_nothing_behind(parent, tmp_path, monkeypatch):
    with pytest.raises(OutputExistsError, match="output exists"):
        export_onnx(parent, tmp_path)
    # every family the project prunes is exported now; the refusal stays for future ones
    monkeypatch.setattr("converters.onnx.export.SUPPORTED_FAMILIES", ("qwen3_moe", "mixtral"))
    deepseek = build_tiny("deepseek_v3", tmp_path / "deepseek")
    with pytest.raises(OnnxExportError, match="supports qwen3_moe, mixtral, not deepseek_v3; use `packager export gguf`"):
        export_onnx(deepseek, tmp_path / "deepseek.d")
    monkeypatch.undo()
    no_tok = tmp_path / "no_tok"
    shutil.copytree(parent, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(OnnxExportError, match=r"tokenizer\.json: not found"):
        export_onnx(no_tok, tmp_path / "no_tok.d")
    bad = tmp_path / "bad_vocab"
    shutil.copytree(parent, bad)
    config = json.loads((bad / "config.json").read_text())
    config["vocab_size"] = 100
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(OnnxExportError, match=f"tokenizer has {VOCAB} tokens but config.json says vocab_size 100"):
        export_onnx(bad, tmp_path / "bad.d")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedArchitecture):
        export_onnx(unknown, tmp_path / "unknown.d")
    with pytest.raises(OnnxExportError, match="quantization 'int2' is not supported"):
        export_onnx(parent, tmp_path / "q.d", "int2")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".d")]
    assert leftovers == []


def test_failed_export_removes_staging_and_keeps_old_output(parent, exports, tmp_path, monkeypatch):
    out = copy_export(exports["parent"], tmp_path / "out")
    before = (out / MODEL_FILE).read_bytes()
    import converters.onnx.export as export_module

    def broken(*args, **kwargs):
        raise OnnxExportError("simulated failure while writing")

    monkeypatch.setattr(export_module, "_save", broken)
    with pytest.raises(OnnxExportError, match="simulated failure"):
        export_onnx(parent, out, force=True, hash_inputs=False, check=False)
    assert (out / MODEL_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_prints_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "packager.cli", "export", "onnx", str(tmp_path / "nope"), "--out",
                             str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: not a directory; MODEL_DIR must be a Hugging Face checkpoint directory"]
