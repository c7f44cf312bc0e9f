"""When a run has converged: the plateau rule the study reports for every run, and the trainer's stop on it.

A validation curve has flattened at step s when its best BLEU rose by less than `gain` from s to the last validation,
and that flat stretch covers at least the run's last quarter (s <= 0.75 x the last step). Judged over the curve as it
stands, so a pause in an early rise is not a plateau once the run has risen again; a trainer that stops on the rule
therefore waits for `--stop_when_flat_after` updates, past the early pauses.
"""

PLATEAU_GAIN = 0.3  # BLEU: the study's default; a single validation on Multi30k moves by about this much


def plateau_step(curve: list[tuple[int, float]], gain: float = PLATEAU_GAIN) -> int | None:
    """The first validation step from which the best BLEU of `curve` ((step, BLEU) pairs in step order) gained
    less than `gain` until its end, if that stretch covers the curve's last quarter; None while it is climbing."""
    best, so_far = [], float("-inf")
    for _, bleu in curve:
        so_far = max(so_far, bleu)
        best.append(so_far)
    for (step, _), best_then in zip(curve, best):
        if best[-1] - best_then < gain:
            return step if step <= 0.75 * curve[-1][0] else None
    return None
