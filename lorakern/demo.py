"""``python -m lorakern demo``: serve mixed batches of many PEFT adapters on one model and check every sequence.

The embedded default: a small Llama (transformers' ``LlamaForCausalLM`` built from a config in code, random
weights: 4 layers, hidden 256, 8 heads / 4 KV heads, vocab 512) and 64 random LoRA adapters of ranks 4-64 in PEFT
format, written to a temporary directory by PEFT's own ``save_pretrained`` when PEFT is installed (else by
lorakern's writer, the same file format). They differ in rank, alpha, rsLoRA, ``rank_pattern`` /
``alpha_pattern`` and targets (some adapt attention only). :func:`lorakern.attach` wraps the model's seven
projections; every adapter is loaded with ``load_adapter``; the pool holds exactly ``sum(ranks)`` rank rows.

Then, per batch (``--batch`` left-padded prompts, each with an adapter drawn from a named mix — ``distinct``,
``zipf:1.5``, ``uniform`` with 25% base-model sequences, ``identical``):

* prefill: one forward of the padded batch, the base model (outside any adapter context) against the mixed batch
  (inside ``lm.adapters([...])``): tokens/s and LoRA overhead;
* decode: ``--new-tokens`` KV-cache steps of ``[B, 1]``: tokens/s and overhead;
* check: every sequence's prefill logits against a reference that applies its adapter alone — the adapter read
  from its files independently (safetensors + PEFT's scaling rules, written out again here) and merged into a
  float64 copy of the weights, ``W + scale * B @ A``, run on the unpadded sequence — and the tokens of a greedy
  ``generate`` of the mixed batch against the float64 reference's greedy tokens.

Tolerance (a reason, not a guess): the served model runs in float32 on the CPU (bfloat16 on a GPU) and the base
model alone already differs from the float64 reference by its own rounding, measured in the same batch
(``base err``). The LoRA logits may differ by ``tol = 4 x base err + 16 eps(dtype) x max|logit|``. A generated
token may differ only where the reference's logits of the two tokens are within ``2 tol`` (served logits within
``tol`` of the reference cannot swap tokens further apart: a near tie, counted and reported). A check
also fails if the adapters change the logits by less than 10x the tolerance (it could not have failed).

Output: progress on stderr, the table on stdout; exit status 1 if any check fails. The GPU and the fastest backend
are used when present, else the CPU and the torch backend (Triton's CPU interpreter is far too slow to serve a
model; ask for it with ``--backend triton``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

__all__ = ["add_arguments", "main", "DemoConfig"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MIXES = ("distinct", "zipf:1.5", "uniform+base", "identical")
_PEFT_PREFIX = "base_model.model."


@dataclass
class DemoConfig:
    """The embedded model (a small Llama) and workload."""

    vocab: int = 512
    hidden: int = 256
    intermediate: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    min_rank: int = 4
    max_rank: int = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", type=int, default=64, help="number of PEFT adapters to generate (default 64)")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    p.add_argument("--batches", type=int, default=4,
                   help=f"batches to serve, cycling through the mixes {', '.join(MIXES)} (default 4)")
    p.add_argument("--prompt-len", type=int, default=48, help="longest prompt in tokens (default 48)")
    p.add_argument("--new-tokens", type=int, default=8, help="decode steps / generated tokens (default 8)")
    p.add_argument("--backend", choices=("auto", "cuda", "triton", "torch"), default="auto",
                   help="lorakern backend (default: the fastest available on a GPU; torch on the CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to serve (default: cuda when available)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="serving dtype (default: float32 on the CPU, bfloat16 on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the adapters and the batches")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median; default 3)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU: torch intra-op threads (default 1, as `lorakern bench`: on a shared machine more "
                        "threads stall in OpenMP barriers and the timings scatter)")
    p.add_argument("--writer", choices=("auto", "peft", "lorakern"), default="auto",
                   help="who writes the PEFT directories (default: PEFT's save_pretrained when installed)")
    p.add_argument("--keep", metavar="DIR", default=None, help="write the adapters to DIR and keep them")
    p.add_argument("--corrupt", action="store_true", help=argparse.SUPPRESS)  # tests: the check must fail


# ---------------------------------------------------------------------------------------------- adapters
@dataclass
class AdapterSpec:
    name: str
    r: int
    alpha: float
    targets: tuple
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, lora_alpha=self.alpha, target_modules=list(self.targets), use_rslora=self.use_rslora,
                    rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern))


def adapter_specs(n: int, cfg: DemoConfig, g: torch.Generator) -> List[AdapterSpec]:
    """``n`` adapters with ranks in ``[min_rank, max_rank]`` (both ends present) and four flavours of config."""
    ranks = torch.randint(cfg.min_rank, cfg.max_rank + 1, (n,), generator=g).tolist()
    ranks[0], ranks[min(1, n - 1)] = cfg.max_rank, cfg.min_rank
    specs = []
    for i, r in enumerate(ranks):
        kind = i % 4
        name = f"user{i:03d}-r{r}"
        if kind == 0:
            specs.append(AdapterSpec(name, r, 2.0 * r, PROJECTIONS))
        elif kind == 1:
            specs.append(AdapterSpec(name, r, 16.0, PROJECTIONS, use_rslora=True))
        elif kind == 2:
            specs.append(AdapterSpec(name, r, float(r), ATTENTION))
        else:
            specs.append(AdapterSpec(name, r, 2.0 * r, PROJECTIONS, rank_pattern={"down_proj": max(1, r // 2)},
                                     alpha_pattern={"v_proj": 4.0 * r}))
    return specs


def _module_rank(spec: AdapterSpec, proj: str) -> int:
    return spec.rank_pattern.get(proj, spec.r)


def random_modules(spec: AdapterSpec, model, g: torch.Generator) -> Dict[str, tuple]:
    """module name → (A [r_m, K], B [N, r_m]) float32; the LoRA changes a projection's output by ~0.1."""
    out = {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in spec.targets and isinstance(mod, torch.nn.Linear):
            r = _module_rank(spec, leaf)
            A = torch.randn(r, mod.in_features, generator=g) / math.sqrt(mod.in_features)
            B = torch.randn(mod.out_features, r, generator=g) * (0.05 / math.sqrt(r))
            out[name] = (A, B)
    return out


def write_adapters(specs: List[AdapterSpec], model, root: Path, g: torch.Generator, writer: str, log) -> str:
    """Write every adapter as a PEFT directory under ``root``; returns the writer used."""
    if writer in ("auto", "peft"):
        try:
            import peft  # noqa: F401
            writer = "peft"
        except ImportError:
            if writer == "peft":
                raise SystemExit("lorakern demo: --writer peft, but peft is not installed")
            writer = "lorakern"
    if writer == "peft":
        import peft

        cpu_model = copy.deepcopy(model).to("cpu", torch.float32)
    t0 = time.perf_counter()
    for i, spec in enumerate(specs):
        mods = random_modules(spec, model, g)
        path = root / spec.name
        if writer == "peft":
            pm = peft.get_peft_model(copy.deepcopy(cpu_model), peft.LoraConfig(**spec.peft_kwargs()))
            with torch.no_grad():
                for name, (A, B) in mods.items():
                    m = pm.base_model.model.get_submodule(name)
                    m.lora_A["default"].weight.copy_(A)
                    m.lora_B["default"].weight.copy_(B)
            pm.save_pretrained(str(path))
        else:
            from lorakern.pool import save_peft_dir

            save_peft_dir(path, mods, r=spec.r, lora_alpha=spec.alpha, use_rslora=spec.use_rslora,
                          rank_pattern=spec.rank_pattern, alpha_pattern=spec.alpha_pattern)
        if (i + 1) % 16 == 0 or i + 1 == len(specs):
            log(f"  wrote {i + 1}/{len(specs)} adapters ({time.perf_counter() - t0:.1f} s)")
    return writer


# ---------------------------------------------------------------------------------------------- reference
def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rule: a key applies to a module whose name ends with it on a dot boundary (keys are regexes)."""
    for key, v in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return v
    return default


def read_deltas(path: Path) -> Dict[str, torch.Tensor]:
    """module name → ``scale * B @ A`` in float64, read from a PEFT directory with PEFT's scaling rules
    (independently of lorakern's loader: this is the oracle)."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    sd = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, A in sd.items():
        if ".lora_A." not in key:
            continue
        mod = key.split(".lora_A.")[0]
        B = sd[key.replace(".lora_A.", ".lora_B.")]
        name = mod[len(_PEFT_PREFIX):] if mod.startswith(_PEFT_PREFIX) else mod
        r = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[name] = scale * (B.double() @ A.double())
    return out


class Reference:
    """A float64 copy of the base model; ``use(deltas)`` merges one adapter into its weights (None = base)."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).to("cpu", torch.float64).eval()
        self._orig: Dict[str, torch.Tensor] = {}
        self._cur: Optional[str] = None

    @torch.no_grad()
    def use(self, key: Optional[str], deltas: Optional[Dict[str, torch.Tensor]]) -> None:
        if key == self._cur:
            return
        for name, w in self._orig.items():
            self.model.get_submodule(name).weight.copy_(w)
        if deltas:
            for name, d in deltas.items():
                w = self.model.get_submodule(name).weight
                if name not in self._orig:
                    self._orig[name] = w.clone()
                w.add_(d)
        self._cur = key

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids[None]).logits[0]

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, n: int):
        out = self.model.generate(input_ids=ids[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        return out.sequences[0, ids.numel():], [s[0] for s in out.scores]


# ---------------------------------------------------------------------------------------------- serving
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, reps: int, device):
    """(median seconds, last result) over ``reps`` calls after one warm-up call."""
    out = fn()
    ts = []
    for _ in range(max(1, reps)):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2], out


def _decode_loop(model, ids, mask, pos, steps: int):
    """A prefill, then ``steps`` KV-cache decode steps of ``[B, 1]``; returns the decode time (seconds)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    p = pos[:, -1:]
    dev = ids.device
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        p = p + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=p, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(dev)
    return time.perf_counter() - t0


def _batch_adapters(mix: str, b: int, B: int, n: int, g: torch.Generator) -> List[Optional[int]]:
    from lorakern.workloads import make_slots

    if mix == "distinct":
        idx = ((torch.arange(B) + b * B) % n).tolist()
    elif mix == "uniform+base":
        idx = make_slots("uniform", B, n, none_frac=0.25, generator=g).tolist()
    elif mix == "identical":
        idx = [int(torch.randint(0, n, (1,), generator=g))] * B
    else:
        idx = make_slots(mix, B, n, generator=g).tolist()
    return [None if i < 0 else int(i) for i in idx]


def _base_macs(model) -> int:
    """Multiply-adds per token of the model's adapted linear layers (attention scores and the LM head excluded)."""
    return sum(m.in_features * m.out_features for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS)


def _lora_macs(spec: AdapterSpec, model) -> int:
    """Multiply-adds per token of one adapter's LoRA (shrink + expand at each module's own rank)."""
    return sum(_module_rank(spec, n.rsplit(".", 1)[-1]) * (m.in_features + m.out_features)
               for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in spec.targets)


def _fmt_rate(v: float) -> str:
    return f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:.0f}"


def _table(rows: List[dict]) -> str:
    head = ["batch", "mix", "seqs", "distinct", "LoRA MACs", "phase", "tokens", "base tok/s", "LoRA tok/s",
            "overhead", "max err", "tol", "check"]
    cells = [head]
    for r in rows:
        cells.append([str(r["batch"]), r["mix"], str(r["seqs"]), str(r["adapters"]), r["macs"], r["phase"],
                      str(r["tokens"]), r.get("base", ""), r.get("lora", ""), r.get("overhead", ""),
                      r.get("err", ""), r.get("tol", ""), r.get("check", "")])
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    left = {1, 5, 12}
    lines = []
    for k, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w[i]) if i in left else v.rjust(w[i]) for i, v in enumerate(c)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    err = sys.stderr

    def log(msg: str) -> None:
        print(msg, file=err, flush=True)

    try:
        import transformers
    except ImportError:
        log("lorakern demo: needs transformers (pip install 'lorakern[test]' or pip install transformers)")
        return 2
    import lorakern
    from lorakern.backends import select_backend

    transformers.logging.set_verbosity_error()
    if args.adapters < 1 or args.batch < 1 or args.batches < 1 or args.prompt_len < 2 or args.new_tokens < 1:
        log("lorakern demo: --adapters, --batch, --batches, --new-tokens must be >= 1 and --prompt-len >= 2")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        log(f"lorakern demo: --device cuda, but torch sees no CUDA device (torch {torch.__version__})")
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    cfg = DemoConfig()
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads or 1))
    elif args.threads:
        torch.set_num_threads(args.threads)
    if args.backend == "auto":
        backend = "torch" if device.type == "cpu" else select_backend("auto", device, dtype, cfg.max_rank)
        if device.type == "cpu":
            log("note: on the CPU the demo serves with the torch backend (Triton's interpreter is far too slow for a "
                "model; --backend triton forces it)")
    else:
        try:
            backend = select_backend(args.backend, device, dtype, cfg.max_rank, op="lorakern demo")
        except RuntimeError as e:
            log(str(e))
            return 2
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    # --- model
    mcfg = transformers.LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                                    num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                    num_key_value_heads=cfg.kv_heads, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2, attn_implementation="sdpa")
    base = transformers.LlamaForCausalLM(mcfg).eval()
    log(f"lorakern demo: LlamaForCausalLM ({cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads / "
        f"{cfg.kv_heads} KV, vocab {cfg.vocab}, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params) "
        f"on {device}, {str(dtype).replace('torch.', '')}, backend {backend}, {torch.get_num_threads()} thread(s)")

    # --- adapters in PEFT format
    specs = adapter_specs(args.adapters, cfg, g)
    tmp = None
    if args.keep:
        root = Path(args.keep)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="lorakern-demo-")
        root = Path(tmp)
    try:
        log(f"writing {len(specs)} adapters (ranks {min(s.r for s in specs)}-{max(s.r for s in specs)}) to {root}")
        with warnings.catch_warnings():  # transformers' deprecation notices triggered inside PEFT
            warnings.simplefilter("ignore", FutureWarning)
            writer = write_adapters(specs, base, root, g, args.writer, log)
        ref = Reference(base)
        model = copy.deepcopy(base).to(device, dtype)
        sum_r = sum(s.r for s in specs)
        lm = lorakern.attach(model, target_modules=list(PROJECTIONS), max_rank=cfg.max_rank,
                             max_adapters=len(specs), max_rows=sum_r, backend=backend)
        t0 = time.perf_counter()
        handles = [lm.load_adapter(root / s.name, name=s.name) for s in specs]
        log(f"loaded {len(handles)} adapters with load_adapter ({time.perf_counter() - t0:.1f} s; "
            f"pool: {sum_r} rank rows of {lm.pool.row_bytes / 1024:.0f} KiB = sum of the ranks)")
        rows, ok = _serve(args, lm, model, ref, specs, handles, root, device, g, log)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    st = lm.pool.stats()
    print(f"lorakern demo — {cfg.layers}-layer Llama (hidden {cfg.hidden}, vocab {cfg.vocab}) on {device} "
          f"({str(dtype).replace('torch.', '')}), backend {backend}; {len(specs)} adapters, ranks "
          f"{min(s.r for s in specs)}-{max(s.r for s in specs)}, PEFT format (written by {writer})")
    print(_table(rows))
    print(f"pool: {st.resident} adapters resident in {st.rows_used}/{st.rows_total} rank rows "
          f"({st.rows_used * st.row_bytes / 2**20:.1f} MiB), {st.loads} loads, {st.evictions} evictions")
    print("LoRA MACs: the batch's LoRA multiply-adds per token over the base projections' (what the arithmetic "
          "alone costs)\noverhead: LoRA time / base time - 1 (prefill: one forward of the padded batch; decode: "
          "KV-cache steps of [B, 1])\nmax err: max |logits - reference| over the real tokens; reference: each "
          "adapter alone, merged into float64 weights\ntol: 4 x the base model's own error + 16 eps x max|logit|; "
          "generate: greedy tokens of the mixed batch equal to the reference's")
    n_fail = sum(1 for r in rows if r.get("check", "").startswith("FAIL"))
    verdict = "PASS" if ok else f"FAIL ({n_fail} check(s))"
    print(f"result: {verdict} ({time.perf_counter() - t_start:.1f} s)")
    return 0 if ok else 1


@torch.no_grad()
def _serve(args, lm, model, ref, specs, handles, root, device, g, log):
    B, S, D = args.batch, args.prompt_len, args.new_tokens
    eps = torch.finfo(next(model.parameters()).dtype).eps
    deltas_cache: Dict[int, Dict[str, torch.Tensor]] = {}
    rows, ok = [], True
    for b in range(args.batches):
        mix = MIXES[b % len(MIXES)]
        idx = _batch_adapters(mix, b, B, len(specs), g)
        batch_handles = [None if i is None else handles[i] for i in idx]
        lens = torch.randint(max(2, S // 2), S + 1, (B,), generator=g).tolist()
        seqs = [torch.randint(3, lm.config.vocab_size, (n,), generator=g) for n in lens]
        ids = torch.zeros(B, S, dtype=torch.long)
        mask = torch.zeros(B, S, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, S - s.numel():] = s
            mask[i, S - s.numel():] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        distinct = len({i for i in idx if i is not None})
        log(f"batch {b + 1}/{args.batches} ({mix}): {B} sequences, {distinct} distinct adapters, "
            f"{sum(1 for i in idx if i is None)} without")

        def fwd():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits

        t_base, base_logits = _timed(fwd, args.reps, device)
        with lm.adapters(batch_handles) as slots:
            if args.corrupt and b == 0:  # test hook: damage one adapter's rows, the check must catch it
                s0 = int(slots[0])
                r0 = int(lm.pool.ranks[s0])
                lm.pool.rows[lm.pool.page_table[s0, :r0].long()] *= 1.05
            t_lora, lora_logits = _timed(fwd, args.reps, device)
            dec_lora = min(_decode_loop(model, ids, mask, pos, D) for _ in range(max(1, args.reps - 1)))
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=D, min_new_tokens=D,
                                 do_sample=False, pad_token_id=0)[:, S:].cpu()
        dec_base = min(_decode_loop(model, ids, mask, pos, D) for _ in range(max(1, args.reps - 1)))

        # --- check against the per-adapter references
        log(f"  checking {B} sequences against their adapter alone (float64 reference)")
        base_err, lora_err, max_ref, effect = 0.0, 0.0, 0.0, 0.0
        gen_equal, ties, gen_fail = 0, 0, []
        results = []
        order = sorted(range(B), key=lambda i: -1 if idx[i] is None else idx[i])  # merge each adapter once
        ref.use(None, None)
        base_refs = {i: ref.logits(seqs[i]) for i in range(B)}
        for i in order:
            a = idx[i]
            if a is not None and a not in deltas_cache:
                deltas_cache[a] = read_deltas(root / specs[a].name)
            ref.use(None if a is None else specs[a].name, None if a is None else deltas_cache[a])
            n = lens[i]
            r_logits = ref.logits(seqs[i]) if a is not None else base_refs[i]
            got = lora_logits[i, S - n:].double().cpu()
            got_base = base_logits[i, S - n:].double().cpu()
            base_err = max(base_err, float((got_base - base_refs[i]).abs().max()))
            lora_err = max(lora_err, float((got - r_logits).abs().max()))
            max_ref = max(max_ref, float(r_logits.abs().max()))
            effect = max(effect, float((r_logits - base_refs[i]).abs().max()))
            results.append((i, a))
        tol = 4 * base_err + 16 * eps * max_ref
        for i, a in results:
            ref.use(None if a is None else specs[a].name, None if a is None else deltas_cache.get(a))
            want, scores = ref.generate(seqs[i], D)
            got = gen[i]
            if torch.equal(got, want):
                gen_equal += 1
                continue
            j = int((got != want).nonzero()[0])
            gap = float(scores[j][want[j]] - scores[j][got[j]])
            if gap <= 2 * tol:
                # served logits within tol of the reference can swap two tokens only if their reference logits are
                # within 2 tol: a near tie, where either token is right
                ties += 1
            else:
                gen_fail.append((i, j, gap))
        ok_logits = lora_err <= tol
        meaningful = effect >= 10 * tol
        ok_gen = not gen_fail
        ok_batch = ok_logits and ok_gen and meaningful
        ok &= ok_batch
        why = []
        if not ok_logits:
            why.append(f"logits err {lora_err:.2e} > tol")
        if not meaningful:
            why.append(f"LoRA effect {effect:.1e} < 10 x tol")
        if gen_fail:
            why.append(f"{len(gen_fail)} generations differ (first: seq {gen_fail[0][0]} step {gen_fail[0][1]})")
        macs = sum(_lora_macs(specs[a], ref.model) for a in idx if a is not None) / (B * _base_macs(ref.model))
        common = dict(batch=b + 1, mix=mix, seqs=B, adapters=distinct, macs=f"{100 * macs:.0f}%")
        rows.append(dict(common, phase="prefill", tokens=B * S, base=_fmt_rate(B * S / t_base),
                         lora=_fmt_rate(B * S / t_lora), overhead=f"{100 * (t_lora / t_base - 1):+.0f}%",
                         err=f"{lora_err:.1e}", tol=f"{tol:.1e}",
                         check="PASS" if ok_logits and meaningful else
                         "FAIL: " + "; ".join(w for w in why if "generation" not in w)))
        rows.append(dict(common, phase="decode", tokens=B * D, base=_fmt_rate(B * D / dec_base),
                         lora=_fmt_rate(B * D / dec_lora), overhead=f"{100 * (dec_lora / dec_base - 1):+.0f}%",
                         err="", tol="",
                         check=(f"PASS: generate {gen_equal}/{B} equal" + (f", {ties} tie(s)" if ties else ""))
                         if ok_gen else "FAIL: " + "; ".join(w for w in why if "generation" in w)))
        log(f"  prefill {B * S / t_lora:.0f} tok/s (base {B * S / t_base:.0f}), decode {B * D / dec_lora:.0f} tok/s "
            f"(base {B * D / dec_base:.0f}); max err {lora_err:.1e} (tol {tol:.1e}, LoRA effect {effect:.2f}); "
            f"generate {gen_equal}/{B} equal{f', {ties} ties' if ties else ''} -> {'PASS' if ok_batch else 'FAIL'}")
    return rows, ok
