import torch

from galaxy.data import IGNORE_INDEX, mask_tokens

VOCAB, MASK, SPECIALS = 1000, 4, [0, 1, 2, 3, 4]


def _corrupt(ids, seed):
    return mask_tokens(ids, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                       generator=torch.Generator().manual_seed(seed))


def test_proportions_follow_bert_80_10_10():
    ids = torch.randint(5, VOCAB, (400, 500), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1], ids[:, -50:-1] = 2, 3, 0  # [CLS] ... [SEP] and padding
    inputs, labels = _corrupt(ids, seed=1)
    selected = labels != IGNORE_INDEX
    ordinary = ~torch.isin(ids, torch.tensor(SPECIALS))
    assert abs(selected.sum() / ordinary.sum() - 0.15) < 0.005
    assert not selected[~ordinary].any()                  # specials and pad never chosen
    assert torch.equal(labels[selected], ids[selected])   # labels keep the originals
    assert torch.equal(inputs[~selected], ids[~selected])  # unselected untouched
    n = selected.sum()
    masked = (inputs == MASK) & selected
    kept = (inputs == ids) & selected
    replaced = selected & ~masked & ~kept
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01   # includes the rare random draw of the same id
    assert abs(replaced.sum() / n - 0.1) < 0.01
    assert not torch.isin(inputs[replaced], torch.tensor(SPECIALS)).any()


def test_same_generator_state_same_result():
    ids = torch.randint(5, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    a, b = _corrupt(ids, seed=7), _corrupt(ids, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], _corrupt(ids, seed=8)[1])
