"""Band-by-band merge of a scene: holds only the boxes a later band can still reach. Pure numpy."""

from __future__ import annotations

import numpy as np

from pipeline.ops.boxes import Candidates, MergeOptions, merge_detections, touching_groups


class BandMerger:
    """Merges a scene band by band (tile rows, top to bottom), holding only open groups.

    A group of touching boxes is sealed once no box of a later band can reach it: all its
    boxes end above the next band's top edge. Sealed groups are merged and handed back;
    the rest wait for the next band. Memory follows the boxes of about one band of tiles,
    whatever the scene's size, and the result equals :func:`merge_detections` over all
    boxes at once (tested).
    """

    def __init__(self, options: MergeOptions | None = None) -> None:
        self.options = options or MergeOptions()
        self.pending = Candidates.empty()

    def add(self, band: Candidates, next_top: float | None) -> Candidates:
        """Add one band; ``next_top`` is the next band's top row (None after the last).

        Returns the boxes now final: the kept candidates, with their output boxes.
        """
        candidates = Candidates.concat([self.pending, band])
        if len(candidates) == 0:
            return Candidates.empty()
        if next_top is None:
            sealed = np.ones(len(candidates), dtype=bool)
        else:
            groups = touching_groups(candidates.boxes)
            lowest = np.zeros(groups.max() + 1)
            np.maximum.at(lowest, groups, candidates.boxes[:, 3])
            sealed = lowest[groups] <= next_top
        self.pending = candidates.select(~sealed)
        final = candidates.select(sealed)
        kept, out_boxes = merge_detections(
            final.boxes, final.scores, final.class_ids, final.is_cut, self.options
        )
        merged = final.select(kept)
        return Candidates(out_boxes, merged.scores, merged.class_ids, merged.is_cut)
