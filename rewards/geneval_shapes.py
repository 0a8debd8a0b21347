"""GenEval-style reward for the embedded shapes domain: classical detector + GenEval scoring rules.

Columns: ``reward`` = Flow-GRPO's partial-credit score (the training reward, see
:func:`flowrl.geneval.scoring.partial_credit`), ``strict`` = GenEval's strict correctness (0/1, for evaluation and
logging). Both come from the same detections of :func:`flowrl.shapes.detect.detect`.
"""

from __future__ import annotations

import numpy as np

from flowrl.geneval.scoring import evaluate_strict, partial_credit
from flowrl.shapes.detect import detect


class GenEvalShapesReward:
    """Batched reward over uint8 images ``[B, H, W, 3]``; needs each prompt's GenEval metadata record.

    Raises:
        ValueError: if a metadata record is missing (the prompt set must be GenEval metadata JSON lines).
    """

    name = "geneval_shapes"

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> dict[str, np.ndarray]:
        if metadata is None or len(metadata) != len(images) or any(m is None or "include" not in m for m in metadata):
            raise ValueError("geneval_shapes needs a GenEval metadata record (with 'include') for every image")
        reward = np.zeros(len(images), dtype=np.float32)
        strict = np.zeros(len(images), dtype=np.float32)
        for i, (img, md) in enumerate(zip(images, metadata)):
            dets = detect(img)
            strict[i] = float(evaluate_strict(md, dets)[0])
            reward[i] = partial_credit(md, dets)
        return {"reward": reward, "strict": strict}
