"""Serial BART: determinism, training, decoder causality, encoder padding, and agreement with
Hugging Face's BartForConditionalGeneration (skipped when transformers is not installed)."""
import dataclasses
import json

import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import BartDenoisingData, Tokenizer
from galaxy.models.bart import BartConfig, BartForConditionalGeneration
from galaxy.plan import Plan
from galaxy.train.loop import Trainer

TINY = BartConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_decoder_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=24, hidden_dropout_prob=0.0)


def batch(seed=0, batch_size=3, enc_len=16, dec_len=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (batch_size, enc_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # one padded sequence
    return ids, mask, torch.randint(5, 60, (batch_size, dec_len), generator=g)


def test_forward_is_deterministic_and_profilable_positionally():
    a, b = BartForConditionalGeneration(TINY).eval(), BartForConditionalGeneration(TINY).eval()
    ids, mask, dec = batch()
    logits = a(ids, mask, dec)  # the call profile_flops.py makes
    assert logits.shape == (3, 12, 60)
    assert torch.equal(logits, b(ids, mask, dec))  # same seed-by-name init, same numbers
    assert torch.equal(logits, a(ids, mask, dec))


def test_changing_a_later_decoder_token_leaves_earlier_logits_alone():
    model = BartForConditionalGeneration(TINY).eval()
    ids, mask, dec = batch()
    changed = dec.clone()
    changed[:, 7] = (changed[:, 7] + 1 - 5) % 55 + 5
    before, after = model(ids, mask, dec), model(ids, mask, changed)
    torch.testing.assert_close(after[:, :7], before[:, :7], rtol=0, atol=1e-6)
    assert (after[:, 7:] - before[:, 7:]).abs().amax(dim=(0, 2)).min() > 1e-4  # position 7 onwards do see it


def test_padded_encoder_positions_are_not_attended():
    model = BartForConditionalGeneration(TINY).eval()
    ids, mask, dec = batch()
    changed = ids.clone()
    changed[1, 10:] = 7  # only under the padding mask
    torch.testing.assert_close(model(changed, mask, dec), model(ids, mask, dec), rtol=0, atol=1e-6)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    ids, mask, dec = batch()
    results = []
    for checkpointing in (False, True):
        model = BartForConditionalGeneration(dataclasses.replace(TINY, activation_checkpointing=checkpointing)).train()
        loss_sum, _ = model(ids, mask, dec, labels=dec)
        loss_sum.backward()
        results.append((loss_sum, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=0, atol=1e-7, msg=name)


def test_short_denoising_training_lowers_the_loss():
    cfg = load_config("train_config/bart/full.json", dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, seq_length=32, batch_size=8,
        learning_rate=3e-3, warmup_steps=1, lr_scheduler="constant", hidden_dropout_prob=0.0))
    data = BartDenoisingData(cfg["data_file"], Tokenizer(cfg["tokenizer_file"]), cfg["seq_length"], cfg["seed"])
    model = BartForConditionalGeneration(BartConfig.from_dict(cfg))
    trainer = Trainer(model, ParallelContext(Plan()), cfg, data, total_steps=8, log=lambda m: None)
    losses = [trainer.train_step()["loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.2, losses  # 9.00 -> 8.65 when written


def test_pipeline_layout_is_refused():
    with pytest.raises(ValueError, match="pipeline"):
        BartForConditionalGeneration(TINY, ParallelContext(Plan(pp_size=2, stage_layers=(1, 1))))


def test_matches_hugging_face_both_ways(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BartConfig(
        vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=24,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
        scale_embedding=True, pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=3)
    torch.manual_seed(0)
    hf = transformers.BartForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        hf.final_logits_bias.normal_()
    hf.save_pretrained(tmp_path / "hf")
    ours = BartForConditionalGeneration(BartConfig.from_hf(json.loads((tmp_path / "hf" / "config.json").read_text())))
    assert ours.load_hf(tmp_path / "hf") == []
    ids, mask, dec = batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(ours.eval()(ids, mask, dec), want, rtol=1e-5, atol=1e-5)
        ours.save_hf(tmp_path / "ours")
        back = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, want,
                                   rtol=1e-5, atol=1e-5)
