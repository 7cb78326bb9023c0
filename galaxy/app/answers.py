"""What inference answers: a question (`Ask`: the task and its options) turns the model's
output into one answer per text, and `answer_json` into the JSON a user reads.

    embed      BERT (and a retrieval fine-tune of it): the last hidden states mean-pooled over the
               attention mask and L2-normalised, as sentence-transformers computes all-MiniLM-L6-v2's
               sentence embeddings
    fill-mask  BERT with its MLM head: the top_k tokens and probabilities at every mask token
    generate   LLaMA: the greedy continuation of the text, up to max_new_tokens (and eos)
    denoise    BART: the greedy decoder output for the text (its [MASK] spans filled in), the whole
               sequence BART was trained to reconstruct ([CLS] ... [SEP]), not a continuation

A task's forward runs this rank's part of the model; on the ranks that hold the output (every
rank; with pipeline stages, the last stage's) it returns the per-text results, the same on each.
"""
from dataclasses import dataclass

from galaxy.inference.generate import greedy_denoise, greedy_generate
from galaxy.models.bert.model import sentence_embedding

TASKS = {"embed": ("bert", "bert_retrieval"), "fill-mask": ("bert",), "generate": ("llama",),
         "denoise": ("bart",)}  # task: the models that answer it


def check_task(task, model):
    """The reason `model` cannot answer `task`, or None."""
    if task not in TASKS:
        return f"unknown task {task!r}; the tasks are {sorted(TASKS)}"
    if model not in TASKS[task]:
        return f"task {task!r} needs a {' or '.join(TASKS[task])} model; this one is {model}"
    return None


@dataclass(frozen=True)
class Ask:
    """One question put to every text of a batch; built alike on every rank."""
    task: str
    top_k: int = 5
    max_new_tokens: int = 32
    mask_id: int = None  # fill-mask: the tokenizer's mask token
    eos_id: int = None  # generate, denoise: stop once it is produced (denoise: BART's decoding starts from it)
    bos_id: int = None  # denoise: the first token of what BART reconstructs

    def forward(self, model):
        """f(input_ids, attention_mask, hidden_states=None, chunk=0): this rank's part of the model,
        then the task's results where the output is held (a pipeline's other stages return what
        they hand on)."""
        if self.task in ("generate", "denoise"):
            run = self._generate if self.task == "generate" else self._denoise
            return lambda ids, mask, hidden_states=None, chunk=0: run(model, ids, mask)
        body = model.bert if self.task == "embed" else model  # embed reads the encoder, not the MLM head
        finish = self._embed if self.task == "embed" else self._fill_mask

        def forward(ids, mask, hidden_states=None, chunk=0):
            out = body(ids, mask, hidden_states=hidden_states, chunk=chunk)
            return finish(out, ids, mask) if model.ctx.is_last_stage else out
        return forward

    @staticmethod
    def _embed(hidden, ids, mask):
        return list(sentence_embedding(hidden.float(), mask).cpu())

    def _fill_mask(self, logits, ids, mask):
        """Per text: [(position, token ids, probabilities)] of its mask tokens, top_k each."""
        def top(b, p):
            scores, tokens = logits[b, p].float().softmax(-1).topk(self.top_k)
            return p, tokens.tolist(), scores.tolist()
        masks = (ids == self.mask_id) & mask.bool()
        return [[top(b, p) for p in row.nonzero().flatten().tolist()] for b, row in enumerate(masks)]

    def _generate(self, model, ids, mask):
        """Each text alone (no padding), its new token ids."""
        prompts = [row[keep].unsqueeze(0) for row, keep in zip(ids, mask.bool(), strict=True)]
        return [greedy_generate(model, p, self.max_new_tokens, self.eos_id)[0, p.shape[1]:].tolist() for p in prompts]

    def _denoise(self, model, ids, mask):
        """Each text's decoded ids, up to its eos (the batch decodes at once: every row is padded alike)."""
        out = greedy_denoise(model, ids, mask, self.max_new_tokens, start_id=self.eos_id, eos_id=self.eos_id,
                             bos_id=self.bos_id).tolist()
        return [row[:row.index(self.eos_id) + 1] if self.eos_id in row else row for row in out]


def answer_json(ask, result, tok):
    """The JSON fields of one text's answer."""
    if ask.task == "embed":
        return {"embedding": result.tolist()}
    if ask.task == "fill-mask":
        return {"masks": [{"position": p, "top": [{"token_id": i, "token": tok.token(i), "score": s}
                                                  for i, s in zip(ids, scores, strict=True)]}
                          for p, ids, scores in result]}
    return {"text" if ask.task == "denoise" else "completion": tok.decode(result), "token_ids": result}
