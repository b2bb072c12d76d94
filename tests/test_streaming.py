"""Streaming training batches (data.model.cache: false): every row once per epoch, buffer by buffer,
and a position that resumes the very batches an uninterrupted run draws.

The activations come from a fake producer whose rows say where they come from (row value = context
seq * 100 + row index in the context), so what the stream yields can be checked exactly."""
import pytest
import torch

from workbench.data.streaming import StreamingActivations
from workbench.data.types import ActivationChunk, TokenBatch
from workbench.saes import build_sae
from workbench.train.trainer import Trainer, TrainConfig

D, L, N_CONTEXTS, PER_CHUNK = 8, 16, 60, 7


def rows_of(c):
    return 5 + c % 3  # contexts give different numbers of rows, as special tokens and padding do


def ids_of(c):
    return [c * 100 + r for r in range(rows_of(c))]


class Producer:
    def __init__(self):
        self.starts = []

    def __call__(self, start):
        self.starts.append(start)
        first = start // PER_CHUNK * PER_CHUNK  # may start before `start`, as a harvest batch does
        for c0 in range(first, N_CONTEXTS, PER_CHUNK):
            seqs = range(c0, min(c0 + PER_CHUNK, N_CONTEXTS))
            ids = [i for c in seqs for i in ids_of(c)]
            acts = torch.zeros(len(ids), D)
            acts[:, 0] = torch.tensor(ids, dtype=torch.float32)
            acts[:, 1:] = torch.randn(len(ids), D - 1, generator=torch.Generator().manual_seed(c0))
            seq = torch.tensor([c for c in seqs for _ in range(rows_of(c))])
            batch = TokenBatch(torch.zeros(len(seqs), L, dtype=torch.long), torch.ones(len(seqs), L, dtype=torch.long),
                               torch.tensor(list(seqs)))
            yield ActivationChunk(acts, torch.zeros(len(ids), dtype=torch.long), seq, torch.zeros(len(ids), dtype=torch.long), batch)


def stream(producer=None, **kw):
    args = dict(batch_size=8, buffer_tokens=64, n_tokens=10_000, context_length=L, seed=0)  # 4 contexts a buffer
    return StreamingActivations(producer or Producer(), **{**args, **kw})


def take(it, n):
    return [next(it) for _ in range(n)]


def test_each_epoch_yields_each_row_once_buffer_by_buffer():
    s = stream()
    per_buffer = [sum(rows_of(c) for c in range(b, min(b + 4, N_CONTEXTS))) // 8 for b in range(0, N_CONTEXTS, 4)]
    batches = take(iter(s), sum(per_buffer))
    ids = torch.cat(batches)[:, 0].long().tolist()
    assert len(ids) == len(set(ids))
    at = 0
    for b, n in enumerate(per_buffer):
        contexts = {i // 100 for i in ids[at:at + n * 8]}
        assert contexts <= set(range(4 * b, 4 * b + 4))  # a buffer holds its own contexts only
        at += n * 8
    dropped = sum(rows_of(c) for c in range(N_CONTEXTS)) - len(ids)
    assert 0 <= dropped < 8 * len(per_buffer)  # at most a partial batch per buffer
    assert s.position["epoch"] == 1 and s.position["buffer"] == 0


def test_n_tokens_ends_the_epoch_and_the_next_one_reshuffles():
    s = stream(n_tokens=40, buffer_tokens=1024)  # one buffer: the first 40 rows, 5 batches
    first, second = take(iter(s), 5), None
    it = iter(s)
    second = take(it, 5)
    expected = sorted(i for c in range(N_CONTEXTS) for i in ids_of(c))[:40]
    for epoch in (first, second):
        assert sorted(torch.cat(epoch)[:, 0].long().tolist()) == expected
    assert not torch.equal(torch.cat(first), torch.cat(second))


def test_a_saved_position_continues_with_the_same_batches():
    reference = take(iter(stream()), 40)  # past several buffers and the end of an epoch
    for k in (0, 1, 3, 4, 7, 13, 30):
        a = stream()
        it = iter(a)
        take(it, k)
        b = stream()
        b.load_state_dict(a.state_dict())
        resumed = take(iter(b), 40 - k)
        assert all(torch.equal(x, y) for x, y in zip(resumed, reference[k:])), k


def test_a_position_from_other_settings_is_refused():
    with pytest.raises(ValueError, match="batch_size=8 but this one has 16"):
        stream(batch_size=16).load_state_dict(stream().state_dict())


def test_too_little_text_for_one_batch_says_so():
    with pytest.raises(ValueError, match="gives 5 activation rows, fewer than one batch of 8"):
        next(iter(stream(n_tokens=5)))


@pytest.mark.parametrize("prefetch", [False, True], ids=["in-loop", "prefetch"])
def test_trainer_checkpoints_the_stream_and_resumes_it_exactly(tmp_path, prefetch):
    """With prefetch the reading thread is a batch ahead when the run stops: the checkpoint must hold
    the position after the batch last trained on."""
    def trainer(run_dir):
        sae = build_sae({"architecture": "topk", "d_in": D, "d_sae": 32, "k": 4, "seed": 0})
        return Trainer(sae, TrainConfig(total_steps=20, lr=1e-3, checkpoint_every=5, progress_bar=False,
                                        prefetch=prefetch), run_dir)

    straight = trainer(tmp_path / "a")
    straight.fit(stream())

    interrupted = trainer(tmp_path / "b")
    # The loop stops after step 12 (its lr schedule was built for 20 steps): an interruption, with
    # checkpoints at steps 5, 10 and 12.
    interrupted.cfg.total_steps = 12
    interrupted.fit(stream())
    producer = Producer()
    resumed = Trainer.resume(tmp_path / "b", TrainConfig(total_steps=20, lr=1e-3, checkpoint_every=5,
                                                         progress_bar=False, prefetch=prefetch))
    resumed.fit(stream(producer))
    assert producer.starts[0] > 0  # the model is not run again from the start of the text
    a, b = straight.saes["topk"].state_dict(), resumed.saes["topk"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
