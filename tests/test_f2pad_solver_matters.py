"""The end-to-end IoU bar of F2PAD's tests is the solver's doing: with both iteration caps at 0 (starts, |A|
threshold, colour growth and trust rules only) the same assertion fails, so a solver that does nothing fails them."""

from __future__ import annotations

import pytest
import torch

from anomalib_mlff.post_processing.f2pad import ClassicalInpainter, refine
from anomalib_mlff.post_processing.f2pad.scorers import build_scorer
from tests.f2pad_fixtures import IMAGENET, defect_image, padim, patchcore
from tests.test_f2pad_refine import SMALL, assert_refinement_beats_initial, initial_mask, iou, no_solver, prior


@pytest.mark.slow
@pytest.mark.parametrize("model", [patchcore, padim], ids=["patchcore", "padim"])
def test_without_iterations_the_refinement_assertion_fails(model) -> None:  # noqa: ANN001
    image, truth = defect_image()
    start_mask = initial_mask(model(), image, truth)
    scorer = build_scorer(model(), IMAGENET, num_candidates=5)
    solved = refine(image[None], start_mask[None], scorer, ClassicalInpainter(), prior(), SMALL)
    unsolved = refine(image[None], start_mask[None], scorer, ClassicalInpainter(), prior(), no_solver(SMALL))
    assert int(unsolved.iterations[0]) == 0 < int(solved.iterations[0])
    assert_refinement_beats_initial(solved, start_mask, truth)
    with pytest.raises(AssertionError):
        assert_refinement_beats_initial(unsolved, start_mask, truth)
    assert iou(unsolved.pred_mask[0], truth) < iou(start_mask, truth) + 0.1  # below the bar, not only the colour check
    assert iou(solved.pred_mask[0], truth) > iou(unsolved.pred_mask[0], truth) + 0.1
    assert not torch.equal(solved.pred_mask, unsolved.pred_mask)
