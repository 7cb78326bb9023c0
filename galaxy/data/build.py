"""The data section of a config (DataConfig), the dataset it names for its architecture:
build_data(cfg, ctx), and the pairs it holds out for evaluation, if any: held_out_data(cfg)."""
from dataclasses import dataclass

from galaxy.keys import at_least, key, one_of
from galaxy.data.denoising import BartDenoisingData
from galaxy.data.instruction import InstructionData, PretrainTextData
from galaxy.data.pretrain import BertPretrainData, SyntheticMLM
from galaxy.data.retrieval import RetrievalPairs
from galaxy.data.tokenizer import holds_tokenizer, tokenizer_from
from galaxy.errors import ConfigError

DEFAULT_TOKENIZER = "data/python_docs/spm_bert.model"


@dataclass(frozen=True)
class DataConfig:
    data: str = key("corpus", "corpus | synthetic (BERT: random tokens) | instruction (LLaMA: prompt/answer pairs)")
    data_file: str = key("data/python_docs/pretrain.jsonl", "the JSON-lines corpus, instructions or question/passage "
                                                            "pairs")
    tokenizer_file: str = key(None, "a SentencePiece .model, a Hugging Face tokenizer.json or BERT vocab.txt, or a "
                                    "directory holding one (default: load_checkpoint's directory when it holds one, "
                                    f"else {DEFAULT_TOKENIZER})")
    seq_length: int = key(128, "tokens per sequence (alias: pad_size, max_seq_length)")
    batch_size: int = key(8, "global batch size per optimizer micro-step")

    def __post_init__(self):
        at_least(self, ("seq_length", "batch_size"), 1)
        one_of(self, "data", ("corpus", "synthetic", "instruction"))


def tokenizer_path(cfg):
    """tokenizer_file; else the tokenizer a load_checkpoint directory brings; else the shipped one."""
    checkpoint = cfg.checkpoint.load_checkpoint
    return cfg.data.tokenizer_file or (checkpoint if checkpoint and holds_tokenizer(checkpoint) else DEFAULT_TOKENIZER)


def load_tokenizer(cfg):
    path = tokenizer_path(cfg)
    tok = tokenizer_from(path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise SystemExit(f"galaxy: tokenizer {path} has {tok.vocab_size} pieces, "
                         f"config vocab_size is {cfg.model.vocab_size}")
    return tok


def bert_data(cfg, ctx):
    data = cfg.data
    if data.data == "synthetic":
        return SyntheticMLM(cfg.model.vocab_size, data.seq_length, cfg.loop.seed)
    return BertPretrainData(data.data_file, load_tokenizer(cfg), data.seq_length, cfg.loop.seed)


def llama_data(cfg, ctx):
    data, tok = cfg.data, load_tokenizer(cfg)
    if data.data == "instruction":  # sequence shards and pipeline stages need every batch at seq_length
        fixed = ctx.plan.seq_sharded or ctx.plan.pp_size > 1
        return InstructionData(data.data_file, tok, data.seq_length, pad_to_max_length=fixed)
    return PretrainTextData(data.data_file, tok, data.seq_length)  # data "corpus" (check_training_data)


def bart_data(cfg, ctx):
    return BartDenoisingData(cfg.data.data_file, load_tokenizer(cfg), cfg.data.seq_length, cfg.loop.seed)


def retrieval_data(cfg, ctx, held_out=False):
    return RetrievalPairs(cfg.data.data_file, load_tokenizer(cfg), cfg.data.seq_length, held_out)


BUILDERS = {"bert": bert_data, "bert_retrieval": retrieval_data, "llama": llama_data, "bart": bart_data}
# the config's data kinds each builder trains on (retrieval reads the instruction file's pairs)
DATA_KINDS = {"bert": ("corpus", "synthetic"), "bert_retrieval": ("instruction",), "llama": ("instruction", "corpus"),
              "bart": ("corpus",)}


def check_training_data(cfg):
    """The config's data is a kind its model trains on, checked before any tokenizer or file is read."""
    kinds = DATA_KINDS[cfg.model_name]
    if cfg.data.data not in kinds:
        raise ConfigError(f"config key 'data' is {cfg.data.data!r}: {cfg.model_name} trains on data "
                          f"{' or '.join(map(repr, kinds))}")


def build_data(cfg, ctx):
    """cfg's dataset for its model; ctx's plan says whether every batch must be seq_length long."""
    return BUILDERS[cfg.model_name](cfg, ctx)


def held_out_data(cfg, ctx):
    """The samples cfg's data keeps from training for the model's evaluate(), or None."""
    return retrieval_data(cfg, ctx, held_out=True) if cfg.model_name == "bert_retrieval" else None
