"""BERT's shape: the model section of a BERT config (galaxy.config.load) and of a Hugging Face
BERT config.json. Light on purpose: a config is read without the model's torch code."""
from dataclasses import dataclass

from galaxy.keys import check_transformer, from_keys, key
from galaxy.seeding import DEFAULT_SEED


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = key(30522, "token embeddings (a tokenizer may not hold more pieces)")
    hidden_size: int = key(768, "width of every layer's input and output")
    num_hidden_layers: int = key(12, "transformer layers")
    num_attention_heads: int = key(12, "attention heads per layer (divides hidden_size)")
    intermediate_size: int = key(3072, "MLP columns per layer")
    hidden_act: str = key("gelu", "MLP activation, as Hugging Face names it")
    hidden_dropout_prob: float = key(0.1, "dropout after embeddings, attention output and MLP output")
    attention_probs_dropout_prob: float = key(0.1, "dropout on attention probabilities")
    max_position_embeddings: int = key(512, "learned positions: the longest sequence")
    type_vocab_size: int = key(2, "token type (segment) embeddings")
    layer_norm_eps: float = key(1e-12, "LayerNorm epsilon")
    initializer_range: float = key(0.02, "standard deviation of the initial weights")
    seed: int = key(DEFAULT_SEED, "the run seed: initial weights derive from it (galaxy.seeding)")
    activation_checkpointing: bool = key(False, "recompute each layer in backward instead of keeping it")
    overlap_tiles: int | list[int] = key(1, "> 1 or tile sizes: Galaxy's tiled overlap (galaxy.comm.overlap)")

    def __post_init__(self):
        check_transformer(self, dropouts=("hidden_dropout_prob", "attention_probs_dropout_prob"))

    from_dict = classmethod(from_keys)
