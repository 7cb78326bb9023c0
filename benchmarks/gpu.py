"""Galaxy on a CUDA GPU, side by side with transformers, in one run:

  * serial LLaMA training with TinyLlama-1.1B's shape (batch 4 x 2048) and BERT-base MLM
    (batch 32 x 512): Galaxy vs transformers' LlamaForCausalLM / BertForMaskedLM with the same
    settings (sdpa attention, bf16 autocast over fp32 weights, fused AdamW, grad-norm clip 1.0,
    dropout 0), tokens/s and model FLOPs utilisation;
  * every layout's config at world 1 (on one rank every layout is the serial plan: it checks
    each runs on the GPU, at serial's speed);
  * with 2+ GPUs, TP, Galaxy and PP of the LLaMA at world 2 on NCCL: losses against serial's
    and step time.

    python -m benchmarks.gpu                            # on a CUDA machine: docs/results/gpu_<GPU>.csv/svg
    python -m benchmarks.gpu --device cpu --tiny --out_dir /tmp/smoke   # the same code path on CPU, tiny shapes

Model FLOPs per token: 6 x the matmul parameters (attention, MLP, LM head) + the attention
scores and values (6 L H T for causal LLaMA, 12 L H T for BERT); MFU divides by the GPU's dense
bf16 peak (PEAK_TFLOPS, or --peak_tflops).
"""
import argparse
import re
import time

import torch

from benchmarks.common import RESULTS, svg_bars, table, write_results
from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.runtime.launch import spawn
from galaxy.train.loop import Trainer

SETTINGS = dict(dtype="bf16", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_grad_norm=1.0)
LLAMA = dict(model="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
             rms_norm_eps=1e-5, hidden_act="silu", seq_length=2048, batch_size=4)  # TinyLlama-1.1B
BERT = dict(model="bert", hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            vocab_size=30522, max_position_embeddings=512, seq_length=512, batch_size=32, data="synthetic")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, vocab_size=256,
            max_position_embeddings=32, seq_length=32, batch_size=4)
WORLD2 = {"tp": {}, "galaxy": {}, "pp": dict(num_microbatches=4)}  # even splits; pp: two equal stages
PEAK_TFLOPS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("L4", 121))


def config(shape, args, **extra):
    return load_config(None, {**shape, **SETTINGS, **(TINY if args.tiny else {}), **extra})


def flops_per_token(cfg):
    h, layers, seq = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["seq_length"]
    kv = h // cfg["num_attention_heads"] * (cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    llama = cfg["model"] == "llama"
    per_layer = 2 * h * h + 2 * h * kv + (3 if llama else 2) * h * cfg["intermediate_size"]  # q,o + k,v + MLP
    return 6 * (layers * per_layer + h * cfg["vocab_size"]) + (6 if llama else 12) * layers * h * seq


class RandomTokens:
    """Uniform random token rows, every token a label (LLaMA pretraining-style batches)."""

    def __init__(self, vocab, seq_length, n=64):
        self.ids = torch.randint(4, vocab, (n, seq_length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def get_batch(self, indices):
        return {"input_ids": self.ids[indices], "labels": self.ids[indices]}


def dataset(cfg):
    if cfg["model"] == "llama":
        return RandomTokens(cfg["vocab_size"], cfg["seq_length"])
    return SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"], num_samples=4 * cfg["batch_size"])


def galaxy_step(cfg, ctx):
    """One Galaxy optimizer step as a function returning the loss."""
    build = LlamaForCausalLM if cfg["model"] == "llama" else BertForMaskedLM
    model = build((LlamaConfig if cfg["model"] == "llama" else BertConfig).from_dict(cfg), ctx)
    trainer = Trainer(model, ctx, cfg, dataset(cfg), total_steps=1000, log=lambda m: None)
    if ctx.plan.pp_size > 1:
        trainer.forward_backward = PipelineForwardBackward(trainer)
    return lambda: trainer.train_step()["loss"]


def transformers_step(cfg, device):
    """The same model and step in transformers: sdpa, bf16 autocast, fused AdamW on CUDA, clipping."""
    import transformers
    shape = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "max_position_embeddings")}
    if cfg["model"] == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **shape, num_key_value_heads=cfg["num_key_value_heads"], rope_theta=cfg["rope_theta"],
            rms_norm_eps=cfg["rms_norm_eps"], attn_implementation="sdpa"))
    else:
        hf = transformers.BertForMaskedLM(transformers.BertConfig(
            **shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa"))
    hf.to(device).train()
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": False}
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"], **kernel)
    batch = {k: v.to(device) for k, v in dataset(cfg).get_batch(list(range(cfg["batch_size"]))).items()}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = hf(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def timed(step, args, device):
    """Seconds per step over args.steps after args.warmup, and the losses of every step."""
    losses = [step() for _ in range(args.warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / args.steps, losses


def row(args, part, engine, cfg, world, seconds, losses, peak):
    tokens = cfg["batch_size"] * cfg["seq_length"] / seconds
    tflops = flops_per_token(cfg) * tokens / 1e12
    return {"gpu": args.gpu, "part": part, "engine": engine, "world": world, "batch": cfg["batch_size"],
            "seq_length": cfg["seq_length"], "step_ms": round(seconds * 1e3, 1), "tokens_per_s": round(tokens),
            "model_tflops": round(tflops, 1), "mfu": round(tflops / peak, 3) if peak else "",
            "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def side_by_side(args, device, peak):
    """Serial LLaMA-1.1B and BERT-base: Galaxy, then transformers, on this device. Returns the rows
    and Galaxy's serial LLaMA losses (the world-2 layouts' reference)."""
    rows, serial = [], None
    for part, shape in (("llama-1.1b", LLAMA), ("bert-base", BERT)):
        cfg = config(shape, args)
        ctx = ParallelContext.create(build_plan(cfg, 1), 0, device=device)
        for engine in ("galaxy", "transformers"):
            step = galaxy_step(cfg, ctx) if engine == "galaxy" else transformers_step(cfg, device)
            seconds, losses = timed(step, args, device)
            rows.append(row(args, part, engine, cfg, 1, seconds, losses, peak))
            serial = losses if (part, engine) == ("llama-1.1b", "galaxy") else serial
            del step
            _free(device)
    return rows, serial


def layouts_at_world1(args, device, peak):
    rows = []
    for layout in ("serial", "tp", "sp", "galaxy", "galaxy2", "dp", "pp"):
        cfg = config(BERT, args, parallel=layout)
        ctx = ParallelContext.create(build_plan(cfg, 1), 0, device=device)
        seconds, losses = timed(galaxy_step(cfg, ctx), args, device)
        rows.append(row(args, f"bert-base {layout}", "galaxy", cfg, 1, seconds, losses, peak))
        _free(device)
    return rows


def _world2_rank(rank, world, args, device_type):
    """On each rank: every WORLD2 layout of the LLaMA; (layout, seconds, losses) from the reporting rank."""
    out = []
    for layout, extra in WORLD2.items():
        layers = config(LLAMA, args)["num_hidden_layers"]
        stages = {"stage_num_hidden_layers_list": [layers // 2, layers - layers // 2]} if layout == "pp" else {}
        cfg = config(LLAMA, args, parallel=layout, **extra, **stages)
        ctx = ParallelContext.create(build_plan(cfg, world), rank, device=None if device_type == "cuda" else "cpu")
        seconds, losses = timed(galaxy_step(cfg, ctx), args, ctx.device)
        out.append((layout, cfg, seconds, losses))
        _free(ctx.device)
    return out


def world2(args, device, peak, serial_losses):
    backend = "nccl" if device.type == "cuda" else "gloo"
    results = spawn(_world2_rank, 2, (args, device.type), backend=backend, timeout_s=args.timeout_s)
    rows = []
    for layout, cfg, seconds, losses in results[-1]:  # the last rank holds the loss under PP too
        r = row(args, f"llama-1.1b {layout}", "galaxy", cfg, 2, seconds, losses, peak)
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, serial_losses, strict=True))
        r["max_loss_rel_diff_vs_serial"] = f"{worst:.1e}"
        rows.append(r)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of the code path)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak of this GPU (MFU)")
    p.add_argument("--timeout_s", type=float, default=1800)
    p.add_argument("--out_dir", default=None, help=f"default {RESULTS} for a full CUDA run; none otherwise")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device here; this benchmark needs a GPU "
                         "(`--device cpu --tiny` only smoke-tests the code path)")
    measured = device.type == "cuda" and not args.tiny
    if args.out_dir == RESULTS and not measured:
        raise SystemExit(f"benchmarks.gpu: {RESULTS} holds full GPU runs only, not --tiny or CPU runs")
    args.gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((t for name, t in PEAK_TFLOPS if name in args.gpu), None)
    rows, serial = side_by_side(args, device, peak)
    rows += layouts_at_world1(args, device, peak)
    if device.type == "cpu" or torch.cuda.device_count() >= 2:  # on CPU, world 2 runs on gloo
        rows += world2(args, device, peak, serial)
    headers = list(dict.fromkeys(k for r in rows for k in r))
    print(table([[r.get(h, "") for h in headers] for r in rows], headers))
    out_dir = args.out_dir or (RESULTS if measured else None)
    if out_dir:
        groups = ["llama-1.1b", "bert-base"]
        values = {(r["part"], r["engine"]): r["step_ms"] for r in rows if r["part"] in groups}
        svg = svg_bars(groups, ["galaxy", "transformers"], values, f"training step time, {args.gpu}, bf16")
        write_results(out_dir, "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", args.gpu).strip("_"),
                      [{h: r.get(h, "") for h in headers} for r in rows], svg)


if __name__ == "__main__":
    main()
