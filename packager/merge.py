"""Expert merging (`packager prune --reduce merge`, issue 18 part 2): fold each dropped expert
into a kept expert of the same layer before slicing, instead of throwing its weights away.

- Partner: for each dropped expert d, the kept expert k whose outputs are most similar to d's
  (cosine similarity of the concatenated outputs) on calibration tokens: the hidden states
  that enter the layer's MoE block when the parent reads calibration prompts plus their
  reference translations (up to `max_tokens` tokens per layer, every token, not only the
  ones routed to d, so that the comparison covers the same inputs for every expert).
- Weights: routing mass (the pack's `routing-mass` score from the statistics, the paper's
  importance signal). Each kept expert k becomes, matrix by matrix (gate, up, down),
      W_k' = (m_k W_k + sum_{d -> k} m_d W_d) / (m_k + sum_{d -> k} m_d)
  (equal weights if every mass involved is 0).
- Alignment (`align`, `--merge-align`; default "none" = average the matrices as stored). A
  SiLU-gated expert computes the same function whatever the order of its intermediate neurons
  (rows of gate and up, columns of down, permuted together), and independently trained experts
  have no reason to share an order, so averaging as stored mixes unrelated neurons. With
  "activations" or "weights", each dropped expert d is first permuted so that its neuron
  perm[i] sits where k's neuron i is, perm maximising the summed similarity of matched pairs
  (scipy.optimize.linear_sum_assignment on the n x n similarity matrix):
    activations: Pearson correlation of the neurons' intermediate activations
      act(gate x) * (up x) over the calibration tokens above (needs calibration records even
      with a given merge map);
    weights: cosine similarity of each neuron's [gate row, up row, down column].
  Several experts merged into one kept expert are each aligned to k (k is the anchor; no
  expert is aligned to another dropped one). The record keeps the method and, per layer, the
  mean similarity of the matched pairs and of the pairs as stored (the identity permutation).
  The solver is cubic in the intermediate size at worst (on random n x n matrices, one thread:
  2 ms at n=256, 0.08 s at 768, 0.5 s at 2048 per pair).
- Router: the kept experts' router rows stay the parent's rows, bit for bit; the dropped
  rows go as in a plain prune. Tokens the parent sent to a dropped expert now go to their
  best kept experts, as in mask mode; the merged weights make the experts they land on closer
  to what the dropped expert did. Keeping the rows keeps routing among kept experts identical
  to mask mode, keeps the model fingerprint (routers) and lets the lineage check recover the
  kept experts from the router rows. (The alternative, folding router rows with
  log-sum-exp, changes which experts win for tokens that never touched a dropped expert.)
  Caveat: a merged and a dropped checkpoint of the same plan share the router-only model
  fingerprint; their pruning.json `reduce` field tells them apart.

The merge map, in original expert numbering, goes into pruning.json:
    "reduce": "merge", "merge": {"map": {"<layer>": [[dropped, kept], ...]}, "weights": ..., "align": {"method": ...}, ...}
A map is valid when every source is a dropped expert named once and every target is a kept
expert of the same layer (`validate_merge_map`).

Supported: per-expert checkpoints in float dtypes of the SiLU-gated families (Qwen3-MoE,
Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V3 routed experts). Quantized experts, fused layouts and
GPT-OSS (clamped SwiGLU with biases) are refused with one line.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from packager.core.errors import PackagerError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MERGE_FAMILIES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3")
FLOAT_DTYPES = ("F32", "F16", "BF16")
ALIGN_METHODS = ("none", "activations", "weights")

ALIGN_RULES = {
    "activations": "Pearson correlation of intermediate activations act(gate x) * (up x) on the calibration tokens",
    "weights": "cosine similarity of each neuron's weights [gate row, up row, down column]",
}


class MergeError(PackagerError):
    """A merge that cannot be done or a merge map that is not valid."""


def check_align(align: str) -> None:
    """MergeError unless `align` names an alignment method (the CLI checks it before any work)."""
    if align not in ALIGN_METHODS:
        raise MergeError(f"--merge-align {align!r}: choose one of {', '.join(ALIGN_METHODS)}")


def validate_merge_map(merge_map: Mapping, keep: Mapping[int, Sequence[int]], n_experts: Mapping[int, int] | int,
                       where: str = "merge map") -> dict[int, list[tuple[int, int]]]:
    """Normalise {layer: [[dropped, kept], ...]} (or {layer: {dropped: kept}}) and check it.

    Refused: a layer that the plan does not list, an id out of range, a kept expert as a source,
    a source named twice, a target that is not kept."""
    out: dict[int, list[tuple[int, int]]] = {}
    keep = {int(k): [int(e) for e in v] for k, v in keep.items()}
    for raw_layer, pairs in merge_map.items():
        try:
            layer_idx = int(raw_layer)
        except (TypeError, ValueError):
            raise MergeError(f"{where}: key {raw_layer!r} is not a decoder layer index") from None
        if layer_idx not in keep:
            raise MergeError(f"{where}: layer {layer_idx} is not an MoE layer of the plan ({sorted(keep)})")
        n = n_experts if isinstance(n_experts, int) else n_experts[layer_idx]
        items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
        kept = set(keep[layer_idx])
        seen: set[int] = set()
        normalised = []
        for item in items:
            try:
                src, dst = (int(x) for x in item)
            except (TypeError, ValueError):
                raise MergeError(f"{where}: layer {layer_idx}: {item!r} is not a [dropped, kept] pair of expert ids") from None
            for expert_idx in (src, dst):
                if not 0 <= expert_idx < n:
                    raise MergeError(f"{where}: layer {layer_idx}: expert {expert_idx} does not exist (0..{n - 1})")
            if src in kept:
                raise MergeError(f"{where}: layer {layer_idx}: expert {src} is kept by the plan; only dropped experts "
                                 "are merged (a kept expert named twice: once kept, once merged away)")
            if src in seen:
                raise MergeError(f"{where}: layer {layer_idx}: dropped expert {src} is merged twice; name each dropped "
                                 "expert once")
            if dst not in kept:
                raise MergeError(f"{where}: layer {layer_idx}: target {dst} of dropped expert {src} is not kept by the "
                                 "plan; merge into a kept expert")
            seen.add(src)
            normalised.append((src, dst))
        out[layer_idx] = sorted(normalised)
    return out


def _check_supported(reader, arch, config: dict, keep: Mapping[int, Sequence[int]]) -> None:
    model_dir = reader.model_dir
    if arch.family not in MERGE_FAMILIES:
        raise MergeError(f"{model_dir}: merging supports {', '.join(MERGE_FAMILIES)}, not {arch.family}: "
                         "use --reduce drop")
    if config.get("quantization_config"):
        raise MergeError(f"{model_dir}: quantized experts cannot be averaged bit-exactly: merge a float checkpoint "
                         "or use --reduce drop")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise MergeError(f"{model_dir}: hidden_act {act!r}; merging assumes SiLU-gated experts")
    names = set(reader.names())
    for layer_idx in keep:
        n = arch.n_experts(config, layer_idx)
        if arch.detect_layout(layer_idx, n, names) != "per_expert":
            raise MergeError(f"{model_dir}: layer {layer_idx} stores fused experts; merging reads per-expert tensors "
                             "(re-save with per-expert keys or use --reduce drop)")
        for expert_idx in range(n):
            for name in arch.expert_tensor_names(layer_idx, expert_idx).values():
                dtype = reader.info(name).dtype
                if dtype not in FLOAT_DTYPES:
                    raise MergeError(f"{model_dir}: {name} is {dtype}; merging needs float experts ({', '.join(FLOAT_DTYPES)})")


def calibration_hidden_states(model_dir: Path, records: Sequence[dict], moe_layers: Sequence[int],
                              max_tokens: int = 1024, batch_size: int = 16) -> dict[int, "torch.Tensor"]:
    """Inputs of each MoE block (rows = tokens) on prompts + reference translations."""
    import torch

    from packager.core.arch import load_arch
    from packager.calibrate import load_model
    from packager.calibration_data import PromptBuilder
    from packager.pair_data import pad_batch

    loaded = load_model(model_dir)
    arch = load_arch(loaded.config)
    builder = PromptBuilder(model_dir, loaded.tokenizer, "{source}")
    sequences = []
    for record in records:
        prompt = builder.encode(f"{record['src_lang']}-{record['tgt_lang']}", record["src"])[0]
        target = loaded.tokenizer.encode(record["tgt"], add_special_tokens=False)
        sequences.append(prompt + list(target))
    captured: dict[int, list] = {i: [] for i in moe_layers}
    counts = {i: 0 for i in moe_layers}
    current_mask: list = [None]

    def hook_for(layer_idx):
        def hook(module, args):
            hidden = args[0]
            flat = hidden.reshape(-1, hidden.shape[-1])
            mask = current_mask[0]
            if mask is not None and flat.shape[0] == mask.numel():
                flat = flat[mask.reshape(-1)]
            room = max_tokens - counts[layer_idx]
            if room > 0:
                captured[layer_idx].append(flat[:room].detach().float().clone())
                counts[layer_idx] += min(room, flat.shape[0])
        return hook

    hooks = [loaded.model.get_submodule(arch.router_module(i)).register_forward_pre_hook(hook_for(i)) for i in moe_layers]
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                if min(counts.values()) >= max_tokens:
                    break
                ids, attn = pad_batch(sequences[start:start + batch_size], loaded.pad_id)
                current_mask[0] = attn.bool()
                loaded.model(input_ids=ids, attention_mask=attn)
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.cat(parts) if parts else torch.zeros(0) for i, parts in captured.items()}


def _expert_output(weights: dict, x):
    return _intermediate(weights, x) @ weights["down"].T


def _intermediate(weights: dict, x):
    """The expert's intermediate activations act(gate x) * (up x): rows = tokens, columns = neurons."""
    import torch

    return torch.nn.functional.silu(x @ weights["gate"].T) * (x @ weights["up"].T)


def _expert_weights(reader, arch, layer_idx: int, expert_idx: int) -> dict:
    names = arch.expert_tensor_names(layer_idx, expert_idx)
    return {role: reader.get(names[role]).float() for role in ("gate", "up", "down")}


def _neuron_vectors(weights: dict, method: str, x):
    """One unit vector per intermediate neuron (rows): its activations over the calibration tokens,
    centred (so dot products are Pearson correlations), or its weights [gate row, up row, down column]
    (dot products are cosine similarities). A neuron that never varies gets a zero row."""
    import torch

    if method == "activations":
        vectors = _intermediate(weights, x).T.double()
        vectors = vectors - vectors.mean(dim=1, keepdim=True)
    else:
        vectors = torch.cat([weights["gate"], weights["up"], weights["down"].T], dim=1).double()
    norms = vectors.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, vectors / norms.clamp_min(1e-300), torch.zeros_like(vectors))


def match_neurons(kept_vectors, dropped_vectors) -> tuple[np.ndarray, float, float]:
    """The permutation `perm` of the dropped expert's neurons that maximises the summed similarity to the
    kept expert's: dropped neuron perm[i] is matched to kept neuron i. Also the mean similarity of the
    matched pairs and of the pairs as stored (the identity)."""
    from scipy.optimize import linear_sum_assignment

    similarity = (kept_vectors @ dropped_vectors.T).numpy()
    rows, perm = linear_sum_assignment(similarity, maximize=True)   # square: rows == 0..n-1
    return perm, float(similarity[rows, perm].mean()), float(np.diagonal(similarity).mean())


def align_pairs(reader, arch, pairs: Mapping[int, list[tuple[int, int]]], method: str,
                hidden: Mapping[int, "torch.Tensor"] | None = None) -> tuple[dict[int, dict[int, np.ndarray]], dict]:
    """For each (dropped, kept) pair the neuron permutation of the dropped expert that lines it up with
    the kept one (`match_neurons`), and per layer the mean matched and unaligned similarity.
    Several experts merged into one kept expert are each aligned to the kept expert (the anchor)."""
    perms: dict[int, dict[int, np.ndarray]] = {}
    summary: dict[str, dict] = {}
    for layer_idx, layer_pairs in pairs.items():
        x = hidden[layer_idx] if method == "activations" else None
        if x is not None and x.numel() == 0:
            raise MergeError(f"no calibration tokens reached layer {layer_idx}: give calibration data")
        vectors: dict[int, object] = {}

        def vectors_of(expert_idx):
            if expert_idx not in vectors:
                vectors[expert_idx] = _neuron_vectors(_expert_weights(reader, arch, layer_idx, expert_idx), method, x)
            return vectors[expert_idx]

        perms[layer_idx], matched, unaligned = {}, {}, {}
        for dropped, kept in layer_pairs:
            perm, matched[dropped], unaligned[dropped] = match_neurons(vectors_of(kept), vectors_of(dropped))
            perms[layer_idx][dropped] = perm
        if layer_pairs:
            summary[str(layer_idx)] = {
                "mean_matched": round(float(np.mean(list(matched.values()))), 6),
                "mean_unaligned": round(float(np.mean(list(unaligned.values()))), 6),
                "matched": {str(d): round(v, 6) for d, v in sorted(matched.items())},
            }
    return perms, summary


def _permuted(tensor, role: str, perm: np.ndarray | None):
    """A dropped expert's matrix with its neurons reordered: rows of gate/up, columns of down
    (the expert computes the same function; its neuron i becomes its old neuron perm[i])."""
    if perm is None:
        return tensor
    import torch

    index = torch.as_tensor(perm, dtype=torch.long)
    return tensor[:, index] if role == "down" else tensor[index]


def choose_partners(reader, arch, config: dict, keep: Mapping[int, Sequence[int]], hidden: Mapping[int, "torch.Tensor"]
                    ) -> tuple[dict[int, list[tuple[int, int]]], dict[int, dict[int, float]]]:
    """Merge map by cosine similarity of expert outputs on `hidden`, and the similarities used."""
    import torch

    merge_map, similarity = {}, {}
    for layer_idx, kept in keep.items():
        n = arch.n_experts(config, layer_idx)
        x = hidden[layer_idx]
        if x.numel() == 0:
            raise MergeError(f"no calibration tokens reached layer {layer_idx}: give calibration data")
        outputs = {expert_idx: _expert_output(_expert_weights(reader, arch, layer_idx, expert_idx), x).reshape(-1)
                   for expert_idx in range(n)}
        pairs, sims = [], {}
        for dropped in (e for e in range(n) if e not in kept):
            scores = [(float(torch.nn.functional.cosine_similarity(outputs[dropped], outputs[k], dim=0)), k) for k in kept]
            best, partner = max(scores, key=lambda s: (s[0], -s[1]))
            pairs.append((dropped, partner))
            sims[dropped] = round(best, 6)
        merge_map[layer_idx], similarity[layer_idx] = pairs, sims
    return merge_map, similarity


def merged_tensors(reader, arch, keep: Mapping[int, Sequence[int]], merge_map: Mapping[int, list[tuple[int, int]]],
                   mass: Mapping[int, Sequence[float]], perms: Mapping[int, Mapping[int, np.ndarray]] | None = None
                   ) -> dict[str, bytes]:
    """Input tensor name of a kept expert's weight -> bytes of its merged weight (same dtype and shape);
    a dropped expert with a permutation in `perms` (`align_pairs`) is reordered before averaging."""
    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    out: dict[str, bytes] = {}
    for layer_idx, pairs in merge_map.items():
        into: dict[int, list[int]] = {}
        for src, dst in pairs:
            into.setdefault(dst, []).append(src)
        for dst, sources in sorted(into.items()):
            members = [dst] + sorted(sources)
            masses = np.array([max(float(mass[layer_idx][e]), 0.0) for e in members], dtype=np.float64)
            weights = masses / masses.sum() if masses.sum() > 0 else np.full(len(members), 1.0 / len(members))
            target_names = arch.expert_tensor_names(layer_idx, dst)
            for role, name in target_names.items():
                info = reader.info(name)
                acc = None
                for w, e in zip(weights, members):
                    perm = (perms or {}).get(layer_idx, {}).get(e) if e != dst else None
                    tensor = _permuted(reader.get(arch.expert_tensor_names(layer_idx, e)[role]), role, perm)
                    tensor = tensor.to(torch.float64) * float(w)
                    acc = tensor if acc is None else acc + tensor
                merged = acc.to(dtypes[info.dtype]).contiguous()
                out[name] = merged.view(torch.uint8).numpy().tobytes() if merged.dtype != torch.float32 else merged.numpy().tobytes()
    return out


def routing_mass(stats, langs: Sequence[str], direction: str, layers: Sequence[int]) -> dict[int, list[float]]:
    from packager.planning import layer_scores

    scores = layer_scores(stats, list(langs), direction, "routing-mass", ("sequence",), 0)
    return {layer_idx: [float(v) for v in row] for layer_idx, row in zip(layers, scores)}


def read_records(paths: Sequence[Path], limit: int) -> list[dict]:
    from packager.pair_data import PAIR_KEYS, iter_pair_records

    records = []
    for path in paths:
        for _, record in iter_pair_records(path, MergeError, "calibration"):
            records.append({k: record[k] for k in PAIR_KEYS})
            if len(records) >= limit:
                return records
    return records


def merge_prune(model_dir: str | os.PathLike, plan, out_dir: str | os.PathLike, *, stats, calib: Sequence[Path] = (),
                merge_map: Mapping | None = None, align: str = "none", max_tokens: int = 1024, max_records: int = 256,
                force: bool = False, progress: bool = False) -> Path:
    """A pruned checkpoint whose kept experts absorbed the dropped ones (module docstring)."""
    from packager.core.arch import load_arch
    from packager.core.checkpoint import CheckpointReader
    from packager.core.fingerprint import model_fingerprint
    from packager.core.plan_file import Plan, validate_plan
    from packager.prune import prune_checkpoint

    check_align(align)
    model_dir = Path(model_dir)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    with CheckpointReader(model_dir) as reader:
        config = reader.config
        arch = load_arch(config)
        fingerprint = model_fingerprint(reader)
        validate_plan(plan, arch, config, fingerprint)
        if stats.meta.get("model_fingerprint") != fingerprint:
            raise MergeError(f"statistics come from another model than {model_dir}: calibrate this model")
        keep = {layer_idx: sorted(ids) for layer_idx, ids in plan.keep.items()}
        _check_supported(reader, arch, config, keep)
        n_experts = {layer_idx: arch.n_experts(config, layer_idx) for layer_idx in keep}
        similarity, hidden = None, None
        if merge_map is None or align == "activations":
            records = read_records(calib, max_records)
            if not records:
                raise MergeError("merging needs calibration records (--calib) to pick partners, or a --merge-map"
                                 if merge_map is None else
                                 "--merge-align activations needs calibration records (--calib)")
            hidden = calibration_hidden_states(model_dir, records, sorted(keep), max_tokens=max_tokens)
        if merge_map is not None:
            pairs = validate_merge_map(merge_map, keep, n_experts)
            partner_rule = "given (--merge-map)"
        else:
            pairs, similarity = choose_partners(reader, arch, config, keep, hidden)
            pairs = validate_merge_map(pairs, keep, n_experts)
            partner_rule = (f"highest cosine similarity of expert outputs on {min(int(h.shape[0]) for h in hidden.values())}"
                            f"+ calibration tokens per layer ({len(records)} records)")
        langs = plan.meta.get("languages") or []
        direction = plan.meta.get("direction", "en-x")
        if not langs:
            raise MergeError(f"{plan.where}: meta has no 'languages'; merging weights experts by the pack's routing mass")
        mass = routing_mass(stats, langs, direction, sorted(keep))
        perms, align_record = None, {"method": "none"}
        if align != "none":
            perms, layers = align_pairs(reader, arch, pairs, align, hidden)
            tokens = f" ({min(int(hidden[i].shape[0]) for i in keep)}+ tokens per layer)" if align == "activations" else ""
            align_record = {"method": align, "match": ALIGN_RULES[align] + tokens,
                            "solver": "scipy.optimize.linear_sum_assignment (maximum total similarity)",
                            "anchor": "each dropped expert aligned to its kept partner", "layers": layers}
        replacements = merged_tensors(reader, arch, keep, pairs, mass, perms)
    record = {
        "map": {str(layer_idx): [list(p) for p in pairs[layer_idx]] for layer_idx in sorted(pairs)},
        "partner": partner_rule,
        "weights": f"routing mass ({','.join(langs)}, {direction}, span sequence) of the kept expert and of each expert merged into it",
        "router": "kept experts' router rows unchanged (the parent's); dropped rows removed",
        "mass": {str(layer_idx): [round(m, 8) for m in mass[layer_idx]] for layer_idx in sorted(mass)},
        "align": align_record,
    }
    if similarity is not None:
        record["similarity"] = {str(layer_idx): {str(d): s for d, s in sims.items()} for layer_idx, sims in similarity.items()}
    return prune_checkpoint(model_dir, plan, out_dir, force=force, progress=progress, replacements=replacements,
                            extra_provenance={"reduce": "merge", "merge": record})


def check_merge_record(pruning: dict, keep: Mapping[int, Sequence[int]], where: str) -> None:
    """Lineage: a merge record in pruning.json must be a valid map for the recovered kept experts."""
    if pruning.get("reduce", "drop") != "merge":
        return
    merge = pruning.get("merge")
    if not isinstance(merge, dict) or not isinstance(merge.get("map"), dict):
        raise MergeError(f"{where}: reduce is 'merge' but there is no merge map")
    counts = {int(k): int(v) for k, v in (pruning.get("parent_expert_counts") or {}).items()}
    n_experts = counts or {layer_idx: max([e for e in ids] + [d for d, _ in merge["map"].get(str(layer_idx), [])]) + 1
                           for layer_idx, ids in keep.items()}
    validate_merge_map(merge["map"], keep, n_experts, where)
