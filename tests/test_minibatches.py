"""An epoch's minibatches drawn a chunk at a time are those drawn one by one, from the same data stream."""

import os
import signal
import time

import pytest
import torch
from conftest import CUDA

from iwae.data import Dataset, epoch_batches
from iwae.training import minibatches
from iwae.training.minibatches import EpochMinibatches, draws_ahead


def one_by_one(dataset: Dataset, batches: torch.Tensor, generator: torch.Generator, start: int
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Minibatches ``start`` .. n - 1 as ``Dataset.minibatch`` draws them, and the stream's state before each
    (and after the last)."""
    xs, states = [], [generator.get_state()]
    for idx in batches[start:]:
        xs.append(dataset.minibatch(idx, generator))
        states.append(generator.get_state())
    return xs, states


@pytest.mark.parametrize(("device", "ahead"), [("cpu", False), ("cpu", True), pytest.param("cuda", False, marks=CUDA)])
@pytest.mark.parametrize("binarization", ["dynamic", "static"])
@pytest.mark.parametrize("start", [0, 3])
def test_chunks_draw_what_one_minibatch_at_a_time_draws(monkeypatch: pytest.MonkeyPatch, binarization: str,
                                                        start: int, device: str, ahead: bool) -> None:
    # chunks of 4 minibatches of 2 x 5 examples
    monkeypatch.setattr(minibatches, "CPU_CHUNK_BYTES" if device == "cpu" else "GPU_CHUNK_BYTES", 4 * 2 * 5 * 7 * 4)
    dataset = Dataset("random", torch.rand(57, 7), torch.rand(3, 7), binarization).to(device)
    seeds = [torch.Generator(device).manual_seed(s) for s in (0, 1)]
    batches = torch.stack([epoch_batches(57, 5, generator) for generator in seeds])  # 11 minibatches per seed
    expected = [one_by_one(dataset, batches[s], torch.Generator(device).set_state(g.get_state()), start)
                for s, g in enumerate(seeds)]
    chunked = EpochMinibatches(dataset.train, batches, seeds, binarization == "dynamic", start, ahead)
    assert chunked.chunk == 4
    for i, step in enumerate(range(start, 11)):
        if ahead and step > start:  # past the first chunk, the one after the chunk in use is drawn (or drawing)
            assert (chunked.next is not None) == (chunked.drawn.end < 11)
        # a checkpoint before this step records each stream where drawing one by one leaves it
        for s, state in enumerate(chunked.stream_states(step)):
            assert torch.equal(state, expected[s][1][i]), (step, s)
        x = chunked(step)
        assert x.shape == (2, 5, 7)
        for s in range(2):
            assert torch.equal(x[s], expected[s][0][i]), (step, s)
    for s, state in enumerate(chunked.stream_states(11)):  # the epoch's end
        assert torch.equal(state, expected[s][1][-1])
        assert torch.equal(seeds[s].get_state(), expected[s][1][-1])


def test_black_pixels_stay_black_where_a_uniform_is_zero() -> None:
    """The chunk's uniforms are compared as binarize compares them (u < x): seed 1's 2,753,121st uniform is 0.0."""
    width, batch, steps = 1024, 64, 48  # 3,145,728 uniforms
    batches = torch.zeros(1, steps, batch, dtype=torch.int64)
    for grey, expected in ((0.0, 0.0), (1.0, 1.0)):
        chunked = EpochMinibatches(torch.full((1, width), grey), batches, [torch.Generator().manual_seed(1)], True, 0)
        assert all(torch.equal(chunked(step), torch.full((1, batch, width), expected)) for step in range(steps))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_chunk_holds_no_more_than_the_epoch_has_left(device: str) -> None:
    train = torch.rand(57, 7, device=device)
    batches = epoch_batches(57, 5, torch.Generator(device).manual_seed(0)).unsqueeze(0)  # 11 minibatches
    chunked = EpochMinibatches(train, batches, [torch.Generator(device)], True, 8)
    assert chunked.chunk == 3 and chunked.buffers[0][0].shape[0] == 3


def test_chunks_are_drawn_ahead_on_a_cpu_that_torchs_threads_leave_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minibatches.threads, "usable_cpus", lambda: 2)
    monkeypatch.delenv(minibatches.threads.LOCAL_RANKS, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert draws_ahead(torch.device("cpu"))
        assert not draws_ahead(torch.device("cuda"))
        monkeypatch.setenv(minibatches.threads.LOCAL_RANKS, "2")  # two ranks of one thread on two CPUs
        assert not draws_ahead(torch.device("cpu"))
        monkeypatch.delenv(minibatches.threads.LOCAL_RANKS)
        torch.set_num_threads(2)
        assert not draws_ahead(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)


def test_a_forked_child_draws_ahead_as_its_parent_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child forked after its parent drew ahead has no drawing thread of its parent's: it makes its own."""
    monkeypatch.setattr(minibatches, "CPU_CHUNK_BYTES", 2 * 5 * 7 * 4)  # chunks of 2 minibatches of 5 x 7

    def epoch() -> torch.Tensor:
        train = torch.rand(57, 7, generator=torch.Generator().manual_seed(0))
        batches = epoch_batches(57, 5, torch.Generator().manual_seed(1)).unsqueeze(0)
        chunked = EpochMinibatches(train, batches, [torch.Generator().manual_seed(2)], True, 0, ahead=True)
        return torch.stack([chunked(step) for step in range(11)])

    expected = epoch()
    pid = os.fork()
    if pid == 0:  # the child (no OpenMP team of its own after a fork): exit 0 if it drew the parent's minibatches
        torch.set_num_threads(1)
        os._exit(0 if torch.equal(epoch(), expected) else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child waited for a drawing thread it does not have")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_the_drawing_thread_runs_its_work_in_order_and_wakes_after_idling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minibatches, "IDLE_S", 0.02)
    drawer = minibatches._Drawer()
    done: list[int] = []
    futures = [drawer.submit(done.append, i) for i in range(5)]
    assert [future.result(timeout=5) for future in futures] == [None] * 5 and done == list(range(5))
    time.sleep(0.1)  # idle for longer than IDLE_S: the thread waits to be woken
    assert drawer.submit(lambda a, b: a + b, 2, 3).result(timeout=5) == 5

    def fails() -> None:
        raise ValueError("a drawing that failed")

    with pytest.raises(ValueError, match="a drawing that failed"):  # raised where the result is taken
        drawer.submit(fails).result(timeout=5)
    assert drawer.submit(int, "7").result(timeout=5) == 7  # and the thread goes on


def test_the_cpu_generator_draws_in_one_call_what_it_draws_in_several() -> None:
    # what EpochMinibatches relies on to draw a chunk's uniforms in one call on a CPU
    for sizes in ([1, 1], [5, 17], [15, 1], [16, 16], [2897, 3111, 0, 40], [3, 70_000]):
        one, several = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        whole = torch.empty(sum(sizes)).uniform_(generator=one)
        parts = torch.cat([torch.empty(size).uniform_(generator=several) for size in sizes])
        assert torch.equal(whole, parts) and torch.equal(one.get_state(), several.get_state()), sizes


@pytest.mark.parametrize("ahead", [False, True])
def test_one_seeds_rows_are_those_of_its_whole_minibatches(ahead: bool) -> None:
    """A rank's share of each minibatch (``rows``) is cut with the chunk, as the rows of the whole minibatch."""
    train, generator = torch.rand(57, 7), torch.Generator().manual_seed(3)
    batches = epoch_batches(57, 5, generator).unsqueeze(0)  # 11 minibatches
    whole = EpochMinibatches(train, batches, [torch.Generator().manual_seed(4)], True, 2, ahead)
    share = EpochMinibatches(train, batches, [torch.Generator().manual_seed(4)], True, 2, ahead, rows=slice(1, 4))
    for step in range(2, 11):
        x = share(step)
        assert x.shape == (3, 7) and torch.equal(x, whole(step)[0, 1:4])
