"""Packing (positions restart, no attention across examples), batch order, collation."""
import torch

from qlora.data.batching import BatchStream, collate, epoch_batches, pack, single
from qlora.data.formats import IGNORE_INDEX, Example
from qlora.train.model import builtin_model


def _example(n, start):
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 + 1:] + [start + n], n // 2 + 1, n - n // 2)


def test_pack_restarts_positions_and_never_splits_an_example():
    examples = [_example(n, 10 * i) for i, n in enumerate([5, 3, 6, 2, 7])]
    rows = pack(examples, max_seq_len=10)
    assert [len(r) for r in rows] == [8, 8, 7]
    assert rows[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[0].input_ids == examples[0].input_ids + examples[1].input_ids
    assert rows[0].labels == examples[0].labels + examples[1].labels
    assert sum(len(r) for r in rows) == sum(len(e) for e in examples)


def test_packed_row_computes_each_example_as_if_alone():
    """Logits of every example inside a packed row equal its logits run alone: no attention
    crosses an example boundary and each example's positions start at 0."""
    model = builtin_model(init_seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(0, 256, (n,), generator=gen).tolist(), [1] * n, 1, n) for n in (7, 12, 5)]
    batch = collate(pack(examples, max_seq_len=32), pad_id=258, packed=True)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 24)
    with torch.no_grad():
        # use_cache=False: transformers reads packing from the position ids only without a cache
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            # same fp32 math on the same rows; only the attention's masked-out entries differ,
            # and they contribute exact zeros, so the difference is reduction-order rounding
            torch.testing.assert_close(packed[start:start + len(e)], alone, rtol=1e-5, atol=1e-5)
            start += len(e)


def test_collate_pads_right_with_ignored_labels():
    rows = [single(_example(4, 0)), single(_example(2, 50))]
    batch = collate(rows, pad_id=99, packed=False)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3], [50, 51, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"][1, 2:].tolist() == [IGNORE_INDEX] * 2
    packed = collate([pack([_example(3, 0)], 8)[0], pack([_example(5, 0)], 8)[0]], 99, packed=True)
    # padding is its own segment starting at position 0
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]


def test_batch_stream_is_a_function_of_seed_epoch_and_position():
    lengths = [(7 * i) % 13 + 1 for i in range(50)]
    stream = BatchStream(lengths, global_batch=4, seed=3, group_by_length=True)
    taken = [stream.next() for _ in range(30)]  # crosses into epoch 2 (12 batches per epoch)
    assert all(len(b) == 4 for b in taken)
    assert sorted(i for b in taken[:12] for i in b) == sorted(set(i for b in taken[:12] for i in b))
    assert taken[:12] != taken[12:24]  # each epoch reshuffles
    resumed = BatchStream(lengths, global_batch=4, seed=3, group_by_length=True, position=17)
    assert [resumed.next() for _ in range(13)] == taken[17:]


def test_group_by_length_reduces_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 200, (512,), generator=gen).tolist()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 8, seed=0, epoch=0, group_by_length=False)
    assert sorted(i for b in grouped for i in b) == list(range(512))
    assert padding(grouped) < padding(plain) / 5


def test_steps_for_epochs_is_whole_passes_rounded_up():
    from qlora.data.batching import BatchStream, steps_for_epochs

    lengths = [5] * 10  # global batch 3: 3 micro-batches an epoch, the 10th sequence dropped
    for epochs, accumulation in [(2, 2), (1, 1), (0.5, 1), (3, 4)]:
        steps = steps_for_epochs(len(lengths), 3, accumulation, epochs)
        stream = BatchStream(lengths, 3, seed=0, group_by_length=False)
        for _ in range(steps * accumulation):
            stream.next()
        # the last step may run into the next epoch, never ends short of the passes asked for
        assert epochs * 3 <= stream.position < epochs * 3 + accumulation
