"""Serial LLaMA against an independent reference, checkpoints, masking, generation, precision."""
import json

import pytest
import torch
import torch.nn.functional as F

from galaxy.config.load import load_config
from galaxy.inference.generate import greedy_generate, kv_caches
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.train.loop import Trainer, label_tokens
from galaxy.tuning.apply import apply_tuning
from tests.helpers import rel_err
from tests.models.llama.common import MODEL, RandomInstructions
from tests.models.llama.reference import reference_logits, write_random_checkpoint

CONFIGS = {
    # 8 query heads share 2 key/value heads; a LLaMA-3-like rope_theta
    "gqa": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu"),
    # plain multi-head attention, default rope_theta, lm_head tied to the embeddings
    "mha_tied": dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu"),
}
SMALL = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)


def _ids(batch, length, vocab, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_reference(tmp_path, name):
    path = write_random_checkpoint(tmp_path, CONFIGS[name])
    model = LlamaForCausalLM.from_pretrained(path)
    ids = _ids(2, 19, CONFIGS[name]["vocab_size"])
    with torch.no_grad():
        got = model(ids)
    assert rel_err(got, reference_logits(path, ids)) < 1e-5


@pytest.mark.parametrize("rope", [{"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
                                  {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}}])
def test_other_rope_types_are_refused_by_name(rope):
    """Both Hugging Face formats (transformers 5's rope_parameters, the older rope_scaling); plain RoPE
    in place of an unknown scaling would give wrong logits without a word."""
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        LlamaConfig.from_dict({**CONFIGS["gqa"], **rope})


def test_save_load_round_trip(tmp_path):
    path = write_random_checkpoint(tmp_path / "hf", CONFIGS["mha_tied"])
    model = LlamaForCausalLM.from_pretrained(path)
    model.save_hf(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and "model.layers.2.self_attn.k_proj.weight" in index
    again = LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    ids = _ids(1, 7, 97)
    assert torch.equal(model(ids), again(ids))


def test_prompt_tokens_carry_no_loss():
    """<s> p p p | a a </s>: only the answer and </s> are predicted, each from the token before."""
    model = LlamaForCausalLM(SMALL)
    ids = torch.tensor([[1, 10, 11, 12, 20, 21, 2]])
    labels = torch.tensor([[-100, -100, -100, -100, 20, 21, 2]])
    loss_sum, n = model(ids, labels=labels)
    logits = model(ids)[0]
    want = sum(F.cross_entropy(logits[t - 1], ids[0, t]) for t in (4, 5, 6))
    assert n == 3 == label_tokens(model, labels)
    assert abs(loss_sum.item() - want.item()) < 1e-5 * want.item()
    other_prompt = ids.clone()
    other_prompt[0, 1] = 30  # the prompt is not a target, but it still conditions the answer
    assert model(other_prompt, labels=labels)[0].item() != loss_sum.item()


def test_padding_mask():
    """Right padding leaves the real positions alone; a fully masked row stays finite."""
    model = LlamaForCausalLM(SMALL)
    ids = _ids(1, 9, 50)
    padded = torch.cat([ids, torch.full((1, 3), 3)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        assert rel_err(model(padded, attention_mask=mask)[:, :9], model(ids)) < 1e-6
        left = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], 1).long()
        assert torch.isfinite(model(padded, attention_mask=left)).all()


def test_generation_with_cache_equals_recomputation():
    model = LlamaForCausalLM(SMALL).eval()
    prompt = _ids(2, 5, 50, seed=3)
    got = greedy_generate(model, prompt, max_new_tokens=8)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, ids)
    first = ids[0, 5].item()  # a row that hits eos stops the batch of one
    assert greedy_generate(model, prompt[:1], 8, eos_id=first).shape[1] == 6


def test_side_tuned_model_generates_with_the_cache_as_without():
    """The side network reads each layer's output token by token, so cached decoding sees what a
    full recomputation sees (checked on logits: a tiny random model's greedy tokens repeat)."""
    cfg = load_config(None, {**vars(SMALL), "use_side": True, "side_reduction_factor": 4})
    model = LlamaForCausalLM(SMALL).eval()
    apply_tuning(model, cfg, model.ctx)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "side" in name:  # side_upsample starts at 0: make the side path matter
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
        seq = _ids(1, 9, 50, seed=4)
        full = model(seq)
        with kv_caches(model):
            steps = [model(seq[:, :6])] + [model(seq[:, i:i + 1], past_length=i) for i in range(6, 9)]
        plain = LlamaForCausalLM(SMALL).eval()(seq)
    assert rel_err(torch.cat(steps, 1), full) < 1e-5
    assert rel_err(plain, full) > 1e-2  # the side network changed the output


def _loss_and_grads(cfg, ids):
    model = LlamaForCausalLM(cfg)
    model.train()
    loss_sum, n = model(ids, labels=ids)
    (loss_sum / n).backward()
    return loss_sum.item(), {k: p.grad for k, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients():
    ids = _ids(2, 11, 50)
    loss, grads = _loss_and_grads(SMALL, ids)
    cfg = LlamaConfig(**{**vars(SMALL), "activation_checkpointing": True})
    loss_ckpt, grads_ckpt = _loss_and_grads(cfg, ids)
    assert loss == loss_ckpt
    for k in grads:
        assert torch.equal(grads[k], grads_ckpt[k]), k


def test_bf16_autocast_keeps_fp32_weights():
    model = LlamaForCausalLM(SMALL)
    ids = _ids(2, 11, 50)
    fp32 = model(ids, labels=ids)[0].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, n = model(ids, labels=ids)
    (loss_sum / n).backward()
    assert abs(loss_sum.item() - fp32) < 2e-2 * fp32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_pure_trains_bf16_parameters_and_optimizer_state():
    losses, states = {}, {}
    for dtype in ("fp32", "bf16_pure"):
        cfg = load_config(None, {**MODEL, "dtype": dtype})
        model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
        trainer = Trainer(model, model.ctx, cfg, RandomInstructions(cfg["vocab_size"], cfg["seq_length"]), 2,
                          log=lambda m: None)
        losses[dtype] = [trainer.train_step()["loss"] for _ in range(2)]
        states[dtype] = [t.dtype for s in trainer.opt.state.values() for k, t in s.items() if k != "step"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and set(states["bf16_pure"]) == {torch.bfloat16}
    for got, want in zip(losses["bf16_pure"], losses["fp32"], strict=True):
        assert abs(got - want) < 2e-2 * want, losses
