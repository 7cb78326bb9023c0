"""profile_flops.py on BERT-base (with the MLM head) against the count by hand in docs/flops.md."""
import profile_flops

BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "vocab_size": 30522, "seq_length": 128, "batch_size": 1}


def bert_mlm_forward_flops(B, T, H, L, A, I, V):
    """docs/flops.md: embeddings + L encoder layers + MLM head, flops.py's conventions, eval mode."""
    embeddings = 9 * T * H
    layer = 8 * T * H * H + 4 * T * H * I + 4 * T * T * H + 5 * A * T * T + 21 * T * H + 9 * T * I
    head = 2 * T * H * H + 16 * T * H + 2 * T * H * V + T * V
    return B * (embeddings + L * layer + head)


def test_bert_base_forward_flops_match_hand_count(capsys):
    argv = [arg for key, value in BASE.items() for arg in (f"--{key}", str(value))]
    flops, _, params = profile_flops.main(["--model", "bert", "--config", "train_config/bert/full.json",
                                           "--depth", "2"] + argv)
    expected = bert_mlm_forward_flops(B=1, T=128, H=768, L=12, A=12, I=3072, V=30522)
    assert expected == 28_584_516_864
    assert abs(flops - expected) / expected < 0.02
    assert 109e6 < params < 111e6  # BERT-base with a tied MLM decoder
    assert "encoder (BertEncoder)" in capsys.readouterr().out
