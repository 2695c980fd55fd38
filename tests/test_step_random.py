"""StepRandom: a micro-step's draws are made for the global batch and sliced per rank, so the
examples of a batch get the same draws whatever the number of processes."""

import torch

from diffcore.context import StepRandom


def test_randint_is_the_global_draw_sliced_per_rank():
    whole = StepRandom(7, 3).randint(5, 8)
    halves = [StepRandom(7, 3, rank=r, world_size=2).randint(5, 4) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    assert whole.dtype == torch.long and 0 <= int(whole.min()) and int(whole.max()) < 5
    assert len(set(whole.tolist())) > 1


def test_randint_draws_what_call_with_torch_randint_draws():
    # methods moved from call(lambda ...) to randint: their draws, and so their resumes, stay the same
    via_call = StepRandom(7, 3).call(lambda n, g: torch.randint(0, 5, (n,), generator=g, device=g.device), 8)
    assert torch.equal(StepRandom(7, 3).randint(5, 8), via_call)
