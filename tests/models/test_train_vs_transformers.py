"""Training against an independent reference: from the same Hugging Face BERT and LLaMA
checkpoints (tiny, random, written by the installed transformers), 12 optimizer steps of our
Trainer, serial and Galaxy at world 2 with uneven splits, give the losses of a plain loop of
transformers' own models with torch.optim.AdamW, torch's linear warm-up / decay schedulers and
clip_grad_norm_, on the same batches (dropout 0).

The reference rebuilds what galaxy/train/optim.py and loop.py promise from torch's pieces: weight
decay on matrices and embeddings only (not on biases and norm scales), lr warm-up over
warmup_steps then linear decay to 0 at the last step, the global gradient norm clipped to
max_grad_norm, the loss the mean over label tokens."""
import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import batch_indices
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.plan import build_plan
from galaxy.train.loop import Trainer
from tests.helpers import run_ranks

transformers = pytest.importorskip("transformers")

STEPS, SEQ, VOCAB = 12, 16, 64
SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=32)
TRAIN = dict(seq_length=SEQ, batch_size=8, learning_rate=3e-3, warmup_steps=3, lr_scheduler="linear",
             weight_decay=0.01, max_grad_norm=0.5, seed=5, max_steps=STEPS, bucket_size_mb=0.01)
ARCH = {
    "bert": dict(model="bert", num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "llama": dict(model="llama", num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6),
}
GALAXY = {  # world 2, uneven: heads (whole GQA groups for LLaMA), columns and positions
    "bert": dict(parallel="galaxy", tp_num_attention_heads_list=[3, 1], tp_intermediate_size_list=[32, 16],
                 seq_scatter_list=[10, 6]),
    "llama": dict(parallel="galaxy", tp_num_attention_heads_list=[6, 2], tp_intermediate_size_list=[32, 16],
                  seq_scatter_list=[10, 6]),
}


class Batches:
    """64 fixed rows: BERT masked-LM labels on ~25% of tokens, LLaMA prompt-masked answers."""

    def __init__(self, arch, n=64):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
        pos = torch.arange(SEQ)[None]
        keep = torch.rand(n, SEQ, generator=g) < 0.25 if arch == "bert" else \
            pos >= torch.randint(2, SEQ - 2, (n, 1), generator=g)
        self.labels = self.ids.masked_fill(~keep, -100)
        self.arch = arch

    def __len__(self):
        return len(self.ids)

    def get_batch(self, indices):
        batch = {"input_ids": self.ids[indices], "attention_mask": torch.ones_like(self.ids[indices]),
                 "labels": self.labels[indices]}
        return {**batch, "token_type_ids": torch.zeros_like(self.ids[indices])} if self.arch == "bert" else batch


def config(arch, layout=None):
    return load_config(None, {**SHAPE, **TRAIN, **ARCH[arch], **(layout or {})})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = transformers.BertConfig(**SHAPE, num_attention_heads=4, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
    transformers.BertForMaskedLM(bert).save_pretrained(root / "bert")
    llama = transformers.LlamaConfig(**SHAPE, num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6,
                                     tie_word_embeddings=False)
    transformers.LlamaForCausalLM(llama).save_pretrained(root / "llama")
    return root


def reference_losses(arch, path):
    cfg = config(arch)
    model = getattr(transformers, "BertForMaskedLM" if arch == "bert" else "LlamaForCausalLM").from_pretrained(path)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg["learning_rate"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]), eps=cfg["adam_eps"])
    warmup = cfg["warmup_steps"]
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, 1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=STEPS - warmup)], milestones=[warmup])
    data, losses = Batches(arch), []
    for step in range(STEPS):
        loss = model(**data.get_batch(batch_indices(step, cfg["batch_size"], len(data), cfg["seed"]))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def our_losses(rank, world, arch, path):
    cfg = config(arch, GALAXY[arch] if world > 1 else None)
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx) if arch == "bert" else \
        LlamaForCausalLM(LlamaConfig.from_dict(cfg), ctx)
    model.load_hf(path)
    trainer = Trainer(model, ctx, cfg, Batches(arch), STEPS, log=lambda m: None)
    return [trainer.train_step()["loss"] for _ in range(STEPS)]


def _both(rank, world, root):
    return {arch: our_losses(rank, world, arch, root / arch) for arch in ARCH}


def test_serial_and_galaxy_train_like_transformers_with_adamw(checkpoints):
    galaxy = run_ranks(_both, 2, checkpoints, timeout_s=240)
    for arch in ARCH:
        want = reference_losses(arch, checkpoints / arch)
        assert want[-1] < want[0] - 0.1, want  # the schedule and clipping matter: it learns
        runs = {"serial": our_losses(0, 1, arch, checkpoints / arch), "galaxy rank 0": galaxy[0][arch],
                "galaxy rank 1": galaxy[1][arch]}
        for name, got in runs.items():
            worst = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
            print(f"{arch} {name}: max rel. loss error over {STEPS} steps {worst:.2e}")
            assert len(got) == STEPS and worst < 1e-4, (arch, name, got, want)
