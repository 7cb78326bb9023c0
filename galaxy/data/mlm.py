"""BERT masked-language-model corruption (Devlin et al. 2019, section 3.1)."""
import torch

IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy ignores


def mask_tokens(input_ids, *, vocab_size, mask_id, special_ids, generator, mlm_probability=0.15):
    """Select ~mlm_probability of the non-special tokens for prediction.

    Of the selected tokens 80% become mask_id, 10% a random non-special id and
    10% stay unchanged. Returns (inputs, labels): labels hold the original id at
    selected positions and IGNORE_INDEX elsewhere. special_ids (pad, cls, sep,
    mask, unk, ...) are never selected nor drawn as replacements.

    The random draws have fixed shapes and order, so the result depends only on
    the generator's state and input_ids, not on the device or batch it is in.
    """
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    specials = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long)
    candidates = torch.ones(vocab_size, dtype=torch.bool)
    candidates[specials] = False
    replacement_pool = candidates.nonzero().squeeze(1)
    if len(replacement_pool) == 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no non-special ids to draw")

    shape = input_ids.shape
    select_u = torch.rand(shape, generator=generator)
    action_u = torch.rand(shape, generator=generator)
    random_tokens = replacement_pool[torch.randint(len(replacement_pool), shape, generator=generator)]

    selected = (select_u < mlm_probability) & ~torch.isin(input_ids, specials)
    labels = torch.where(selected, input_ids, IGNORE_INDEX)
    inputs = torch.where(selected & (action_u < 0.8), mask_id, input_ids)
    inputs = torch.where(selected & (action_u >= 0.8) & (action_u < 0.9), random_tokens, inputs)
    return inputs, labels
