"""BART's shape: the model section of a BART config (galaxy.config.load), and Hugging Face's
BART config.json both ways. Light on purpose: a config is read without the model's torch code."""
from dataclasses import dataclass

from galaxy.keys import check_transformer, from_keys, key, settle
from galaxy.seeding import DEFAULT_SEED


@dataclass(frozen=True)
class BartConfig:
    """Field names are the flat config's (galaxy.config.load); HF's d_model = hidden_size,
    encoder_layers = num_hidden_layers, decoder_layers = num_decoder_layers, ffn_dim = intermediate_size."""
    vocab_size: int = key(50265, "shared token embeddings of encoder, decoder and LM head")
    hidden_size: int = key(768, "width of every layer's input and output")
    num_hidden_layers: int = key(6, "encoder layers")
    num_decoder_layers: int = key(None, "decoder layers (default: as many as the encoder)")
    num_attention_heads: int = key(12, "attention heads per layer, encoder and decoder (divides hidden_size)")
    intermediate_size: int = key(3072, "MLP columns per layer")
    hidden_act: str = key("gelu", "MLP activation, as Hugging Face names it")
    hidden_dropout_prob: float = key(0.1, "dropout after embeddings, attention output and MLP output")
    attention_probs_dropout_prob: float = key(0.0, "dropout on attention probabilities")
    max_position_embeddings: int = key(1024, "learned positions: the longest sequence")
    layer_norm_eps: float = key(1e-5, "LayerNorm epsilon")
    initializer_range: float = key(0.02, "standard deviation of the initial weights")
    seed: int = key(DEFAULT_SEED, "the run seed: initial weights derive from it (galaxy.seeding)")
    scale_embedding: bool = key(False, "multiply token embeddings by sqrt(hidden_size)")
    pad_token_id: int = key(0, "the padding token, whose embedding row stays zero")
    activation_checkpointing: bool = key(False, "recompute each layer in backward instead of keeping it")
    overlap_tiles: int | list[int] = key(1, "> 1 or tile sizes: tiled overlap in the encoder's (BERT's) layers")

    def __post_init__(self):
        check_transformer(self, dropouts=("hidden_dropout_prob", "attention_probs_dropout_prob"))
        if self.num_decoder_layers is None:
            settle(self, num_decoder_layers=self.num_hidden_layers)

    from_dict = classmethod(from_keys)

    @classmethod
    def from_hf(cls, d):
        """From a Hugging Face BART config.json's dict."""
        return cls.from_dict({ours: d.get(theirs) for ours, theirs in HF_CONFIG.items()})

    def to_hf(self):
        return {"architectures": ["BartForConditionalGeneration"], "model_type": "bart",
                "decoder_attention_heads": self.num_attention_heads, "decoder_ffn_dim": self.intermediate_size,
                **{theirs: getattr(self, ours) for ours, theirs in HF_CONFIG.items()}}


# our config field -> HF BartConfig key (HF's LayerNorm eps is fixed at 1e-5; decoder heads/ffn = encoder's here)
HF_CONFIG = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "encoder_layers",
             "num_decoder_layers": "decoder_layers", "num_attention_heads": "encoder_attention_heads",
             "intermediate_size": "encoder_ffn_dim", "hidden_act": "activation_function",
             "hidden_dropout_prob": "dropout", "attention_probs_dropout_prob": "attention_dropout",
             "max_position_embeddings": "max_position_embeddings", "initializer_range": "init_std",
             "scale_embedding": "scale_embedding", "pad_token_id": "pad_token_id"}
