"""GenEval's scoring rules (djghosh13/geneval) as pure functions of detections, plus Flow-GRPO's partial-credit
variant used as a training reward. Any detector that returns :class:`~flowrl.geneval.scoring.Detection` lists can
be plugged in (the embedded shapes detector, or a real-image detector)."""
