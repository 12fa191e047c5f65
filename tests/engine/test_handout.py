"""HandOut: batches drawn in order, trained in any order, and a checkpoint that resumes with every drawn prompt
trained exactly once."""

import pytest

from rlhf_engine.data.prompts import PromptStream
from rlhf_engine.engine.handout import HandOut


def handout(per_batch=3, n=7):
    return HandOut(PromptStream([[i] for i in range(n)], seed=0), per_batch)


def test_batches_carry_consecutive_wire_ids_and_the_streams_prompts():
    h, stream = handout(), PromptStream([[i] for i in range(7)], seed=0)
    for b in range(4):  # across an epoch boundary
        drawn = h.draw()
        assert list(drawn) == [3 * b + j for j in range(3)]
        assert [p.prompt_id for p in drawn.values()] == [p.prompt_id for p in stream.next_batch(3)]


def test_training_a_prompt_twice_or_one_never_drawn_is_refused():
    h = handout()
    h.draw()
    h.trained([1])
    for ids in ([1], [3]):
        with pytest.raises(ValueError, match=f"prompt {ids[0]} was not in flight"):
            h.trained(ids)


def test_resume_draws_the_oldest_untrained_batch_again_and_skips_what_was_trained():
    h = handout()
    batches = [h.draw() for _ in range(3)]  # ids 0..8
    h.trained([0, 1, 2, 4, 6, 8])  # batch 0 whole, batches 1 and 2 in part (streamed)
    state = h.state_dict()
    assert state["batch"] == 1 and state["trained_prompts"] == [4, 6, 8]
    resumed = handout()
    resumed.load_state_dict(state, step=2)
    again = [resumed.draw() for _ in range(2)]
    assert list(again[0]) == [3, 5] and list(again[1]) == [7]
    assert [p.prompt_id for p in again[0].values()] == [batches[1][3].prompt_id, batches[1][5].prompt_id]
    # a checkpoint before the skipped ids were drawn again still skips them
    resumed2 = handout()
    resumed2.load_state_dict(state, step=2)
    resumed2.draw()
    resumed2.trained([3])
    assert resumed2.state_dict() == {"batch": 1, "prompts": state["prompts"], "trained_prompts": [3, 4, 6, 8]}


def test_every_prompt_trained_exactly_once_across_any_checkpoint():
    """Train out of order (two batches ahead), checkpoint and resume before any step: the trained dataset
    prompts and those left in flight are those of a run without interruption."""
    order = [[0, 1, 3], [2, 4, 6], [5, 7, 8], [9, 10, 12], [11, 13, 14]]  # wire ids each step trains

    def run(stop_before=None):
        h, trained, in_flight = handout(), [], {}
        for step, pids in enumerate(order):
            if step == stop_before:  # the resumed run has nothing in flight: it draws again
                state = h.state_dict()
                h, in_flight = handout(), {}
                h.load_state_dict(state, step)
            while h.next_batch < step + 2:
                in_flight.update(h.draw())
            h.trained(pids)  # refuses an id not in flight: a redrawn batch must hold every untrained one
            trained += [in_flight.pop(p).prompt_id for p in pids]
        return sorted(trained), sorted(in_flight)

    full = run()
    assert full[1] == [15, 16, 17]
    for stop in range(1, len(order)):
        assert run(stop) == full, stop
